"""Process-wide environment set-up that must happen before heavy imports or the first computation.

TensorFlow is used for data loading only. It must never grab accelerator memory
(JAX owns the GPU/TPU) and its C++ start-up chatter must not reach our logs, so
every TF import in this project goes through :func:`import_tensorflow`.

:func:`reuse_freed_host_memory` keeps glibc from handing XLA:CPU's large buffers back to the
kernel after every step (see there); entry points call it before JAX starts its backend.
"""
import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import pkgutil
import sys
from importlib import metadata

HOST_ALLOCATOR_CHOICES = ('auto', 'reuse', 'system')


@contextlib.contextmanager
def _native_stderr_silenced():
  """Sends file descriptor 2 to /dev/null: TF's C++ start-up lines bypass Python logging."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow():
  """Imports TensorFlow with accelerators hidden and logging quieted; returns the module."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  # Python exceptions still propagate; only native (C++) writes to stderr are dropped.
  with _native_stderr_silenced():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.get_logger().setLevel(logging.ERROR)
    # Hide every accelerator from TF before it initialises them.
    for kind in ('GPU', 'TPU'):
      try:
        tf.config.set_visible_devices([], kind)
      except (RuntimeError, ValueError):
        pass  # Already initialised, or the kind does not exist in this build.
  return tf


# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_NEVER = -1  # mallopt(3): 'Setting M_TRIM_THRESHOLD to -1 disables trimming completely'


def accelerator_plugins() -> list[str]:
  """The PJRT plugins JAX would find (CUDA/ROCm plugins, libtpu), without starting a backend."""
  found = [e.name for e in metadata.entry_points(group='jax_plugins')]
  if importlib.util.find_spec('jax_plugins') is not None:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  if importlib.util.find_spec('libtpu') is not None:
    found.append('libtpu')
  return sorted(set(found))


def computes_on_cpu(jax_platforms: str | None) -> bool:
  """Whether this process will run its computations on the CPU: ``jax_platforms`` (JAX's
  setting, e.g. ``'cpu'`` or ``'cuda,cpu'``) names the CPU first, or it is unset and no
  accelerator plugin is installed."""
  if jax_platforms:
    return jax_platforms.split(',')[0].strip() == 'cpu'
  return not accelerator_plugins()


def reuse_freed_host_memory(mode: str = 'auto', jax_platforms: str | None = None) -> bool:
  """Lets glibc keep freed memory in the process for reuse instead of returning it to the kernel.

  Why: XLA:CPU allocates a step's large buffers (attention scores, MLP activations, the
  backward's residuals) afresh at every execution. glibc serves every block above 32 MiB
  with its own ``mmap`` and ``munmap``s it on free, so each step page-faults every page of
  those buffers again (a 100 MB buffer: 24,576 faults, ~18 ms on this project's 2-core
  machine -- five times the cost of writing it). At T5-base, batch 8 x 512 tokens, that is
  half of the train step. Here all threads share the main arena (``M_ARENA_MAX=1``: a
  per-thread arena cannot hold a block above 64 MiB and falls back to ``mmap``), ``mmap``
  is off (``M_MMAP_MAX=0``) and the heap top is never trimmed, so freed pages are reused.
  The costs: the process keeps its peak host memory until it exits -- a training or
  evaluation process reaches that peak again at every step anyway -- and threads contend for
  the one arena's lock, which a toy model whose buffers are all small pays for (the embedded
  demo's run: 21.3 s instead of 17.4 s; T5-small, whose LM-head logits are 33 MB, is 19%
  faster with it, T5-base twice as fast).

  ``mode``: ``'reuse'`` applies it, ``'system'`` leaves malloc as it is, ``'auto'`` applies
  it only when the computations run on the CPU (:func:`computes_on_cpu` of ``jax_platforms``,
  by default JAX's own setting), so accelerator hosts keep glibc's defaults. It must run
  before JAX starts its backend: threads that have allocated already keep their own arenas.
  Returns whether it was applied (False also where the C library is not glibc).
  """
  if mode not in HOST_ALLOCATOR_CHOICES:
    raise ValueError(f'host allocator {mode!r}; choose one of {", ".join(HOST_ALLOCATOR_CHOICES)}')
  if jax_platforms is None:
    import jax  # pylint: disable=g-import-not-at-top  (importing does not start a backend)
    jax_platforms = jax.config.jax_platforms
  if mode == 'system' or (mode == 'auto' and not computes_on_cpu(jax_platforms)):
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  if not hasattr(libc, 'mallopt') or not hasattr(libc, 'gnu_get_libc_version'):
    return False  # not glibc (musl, macOS): its allocator has its own policy
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_NEVER)))
