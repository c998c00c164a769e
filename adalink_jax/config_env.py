"""The ``ADALINK_*`` environment variables: read by the CLI entry points only, explicitly.

The library reads no environment variable; ``adalink_jax.train`` and ``adalink_jax.evaluate``
call :func:`fill_config` once, in ``main``, so that these variables fill the ``config.data``
fields left empty (a value given in the config file or by a flag wins):

==========================  =====================================================
``ADALINK_DATA_<KEY>``      ``config.data.data_dirs.<key>`` (e.g. ``ADALINK_DATA_VQAV2``)
``ADALINK_TFDS_DATA_DIR``   ``config.data.tfds_data_dir``
``ADALINK_VOCAB``           ``config.data.vocab``
``ADALINK_EXTRA_IDS``       ``config.data.extra_ids`` (sentinel ids; default 100)
``ADALINK_DEMO_DIR``        ``config.data.assets_dir`` (the demo's backbone and vocabulary)
==========================  =====================================================

``ADALINK_IMAGE_SIZE`` and ``ADALINK_PROMPT_STYLE`` are read by
:func:`adalink_jax.data.config_from_env` (library use); in the CLIs the config's
``data.image_size`` and task names decide. No TensorFlow here: the demo stays light.
"""
from __future__ import annotations

from typing import Any, Mapping

DATA_DIR_PREFIX = 'ADALINK_DATA_'
# variable -> config.data field (ints converted).
FIELDS = {'ADALINK_TFDS_DATA_DIR': 'tfds_data_dir', 'ADALINK_VOCAB': 'vocab',
          'ADALINK_EXTRA_IDS': 'extra_ids', 'ADALINK_IMAGE_SIZE': 'image_size',
          'ADALINK_PROMPT_STYLE': 'prompt_style', 'ADALINK_DEMO_DIR': 'assets_dir'}
_INTS = ('extra_ids', 'image_size')
# Fields fill_config sets; image_size and prompt_style are the config's own.
_CLI_FIELDS = ('tfds_data_dir', 'vocab', 'extra_ids', 'assets_dir')


def data_values(environ: Mapping[str, str]) -> dict[str, Any]:
  """``config.data``-shaped values the variables of ``environ`` set (``data_dirs`` a dict)."""
  out: dict[str, Any] = {'data_dirs': {
      k[len(DATA_DIR_PREFIX):].lower(): v for k, v in environ.items()
      if k.startswith(DATA_DIR_PREFIX) and v}}
  for var, field in FIELDS.items():
    if environ.get(var):
      value = environ[var]
      try:
        out[field] = int(value) if field in _INTS else value
      except ValueError:
        raise ValueError(f'{var}={value!r} is not an integer') from None
  return out


def fill_config(config: Any, environ: Mapping[str, str]) -> None:
  """Fills the empty ``config.data`` fields the ``ADALINK_*`` variables set (table above).

  ``ADALINK_DATA_<KEY>`` naming no field of ``config.data.data_dirs`` is an error (a typo would
  otherwise be ignored); configs without ``data_dirs`` (the demo) ignore those variables.
  """
  d, values = config.data, data_values(environ)
  dirs = d.get('data_dirs')
  if dirs is not None:
    for key, folder in values['data_dirs'].items():
      if key not in dirs:
        raise ValueError(f'{DATA_DIR_PREFIX}{key.upper()} names no field of '
                         f'config.data.data_dirs; known keys: {sorted(dirs)}')
      if not dirs[key]:
        dirs[key] = folder
  for field in _CLI_FIELDS:
    if field not in values or d.get(field) not in (None, ''):
      continue
    if field == 'assets_dir' and 'assets_dir' not in d:
      continue  # a seqio config: no demo assets
    if field == 'extra_ids' and d.get('kind') != 'seqio':
      continue
    with d.unlocked():  # extra_ids is no experiment-config field: only its variable sets it
      d[field] = values[field]
