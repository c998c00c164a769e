"""Pieces every command line shares: flag parsing that names config typos in one line, config
modules loaded from their path, the demo's frozen backbone found the same way by each CLI, and
the host-allocator setting applied before JAX starts."""
from __future__ import annotations

import difflib
import importlib.util
import sys
from types import ModuleType
from typing import Any, Optional, Sequence

from absl import flags

from adalink_jax import env


def load_config_module(path: str) -> ModuleType:
  """The config file ``path`` (``configs/x.py`` or ``configs/x.py:arg``) as a module."""
  file = path.split(':')[0]
  spec = importlib.util.spec_from_file_location('_adalink_config', file)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f'config file {file!r} not found')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _keys(node: Any) -> list[str]:
  return list(node.keys()) if hasattr(node, 'keys') else []


def unknown_override(argv: Sequence[str], flag: str = 'config') -> Optional[str]:
  """A one-line message for the first ``--config.a.b=v`` naming a field the config lacks."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{flag}=')), None)
  if not path:
    return None
  try:
    arg = path.split(':', 1)[1] if ':' in path else None
    config = load_config_module(path).get_config(arg)
  except Exception:  # pylint: disable=broad-except  (absl reports config-file errors itself)
    return None
  for a in argv:
    if not a.startswith(f'--{flag}.'):
      continue
    field = a[len(flag) + 3:].split('=', 1)[0]
    node, done = config, []
    for part in field.split('.'):
      keys = _keys(node)
      if part not in keys:
        where = '.'.join([flag] + done)
        close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
        hint = (f'did you mean {", ".join(f"{where}.{c}" for c in close)}?' if close
                else f'{where} has: {", ".join(sorted(keys))}')
        return f'unknown config field {flag}.{field} (in {a}): {hint}'
      node, done = node[part], done + [part]
  return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, but an unknown ``--config.*`` field is one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    msg = unknown_override(argv)
    print(f'error: {msg or e}', file=sys.stderr)
    sys.exit(2)


def resolve_demo_backbone(config: Any, config_path: str) -> None:
  """For ``configs/demo.py``: point ``config.init.native`` at the demo's frozen backbone,
  making it first if needed (so train, evaluate and export all find the same one)."""
  if not (config.data.kind == 'demo' and config.data.mode == 'vqa' and not config.init.native):
    return
  from adalink_jax import demo_assets  # pylint: disable=g-import-not-at-top
  pretrain = load_config_module(config_path).pretrain_config(config)
  with config.unlocked():
    config.init.native = demo_assets.ensure(config, pretrain)


def define_host_allocator_flag() -> None:
  """``--host_allocator``, for commands that run steps (see :func:`apply_host_allocator`)."""
  flags.DEFINE_enum('host_allocator', 'auto', env.HOST_ALLOCATOR_CHOICES,
                    'reuse: glibc keeps freed memory for the next step (XLA:CPU re-faults '
                    'every page of its large buffers at every step otherwise); system: '
                    "malloc's defaults; auto: reuse when computing on the CPU")


def apply_host_allocator() -> bool:
  """Applies ``--host_allocator`` (:func:`adalink_jax.env.reuse_freed_host_memory`); call it
  first thing in ``main``, before anything starts JAX's backend."""
  return env.reuse_freed_host_memory(flags.FLAGS.host_allocator)
