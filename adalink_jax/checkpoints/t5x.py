"""Frozen T5 backbones from T5X checkpoints, streamed into their target shardings.

Layouts read (as written by ``t5x/checkpoints.py``):

* **Legacy T5X** (``Checkpointer``): ``<model_dir>/checkpoint_<step>/checkpoint`` is a
  flax msgpack of ``{'version': 3, 'optimizer': {'target': params, 'state': ...}}``.
  Each partitioned array is replaced by a TensorStore spec (a dict with ``driver``,
  ``kvstore`` and ``metadata``) whose relative ``kvstore.path`` is the '/'-joined name
  with dots, e.g. ``target.encoder.layers_0.attention.query.kernel``: a zarr array in
  that subdirectory. Arrays that were not partitioned sit in the msgpack itself.
* **Orbax T5X** (``OrbaxCheckpointManagerInterface``): ``checkpoint_<step>/state/`` is an
  Orbax PyTree checkpoint of the same ``{'target': ..., 'state': ...}`` dict: one zarr
  array per leaf in ``state/target.encoder....`` (``use_ocdbt=False``, T5X's setting) or
  the same keys inside an OCDBT key-value store (``manifest.ocdbt``; Orbax's default).

Parameter names below ``target/`` are the minimal t5x / flaxformer T5 names, which
``adalink_jax.models.t5`` uses as is. Layer stacks may be unscanned (``layers_<i>``) or
scanned: t5x ``scalable_t5`` and flaxformer stack the layers under ``encoder/encoder``
(older scalable_t5: ``encoder/layers``) with the layers axis at position 1
(``param_scan_axis=1`` / ``scan_axis=1``); our scanned models put it at position 0.
Scanned t5x/flaxformer models have one relative-position bias per layer; ours (like T5
1.1 and HF) share one per stack, so such a checkpoint loads only if its per-layer biases
are identical. Optimizer state is never read.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from adalink_jax.checkpoints.common import (CheckpointMismatchError, flatten,
                                            missing_checkpoint_error, resolve_inside)
from adalink_jax.checkpoints.streaming import (ArraySource, LayerSlice, LayersFirst,
                                               NumpySource, Stacked, TensorStoreSource, place)

MSGPACK_FILE = 'checkpoint'   # legacy: the msgpack file inside checkpoint_<step>/
ORBAX_ITEM = 'state'          # orbax: the PyTree item directory inside checkpoint_<step>/
TARGET = 'target'
T5X_SCAN_AXIS = 1             # t5x scalable_t5 param_scan_axis / flaxformer scan_axis default

_HOW_TO_GET = (
    'Pass a T5X model directory (holding checkpoint_<step>/), one checkpoint_<step>/ '
    'directory, or its msgpack file "checkpoint". Public T5X checkpoints are listed in '
    't5x/docs/models.md (e.g. gs://t5-data/pretrained_models/t5x/flan_t5_base/'
    'checkpoint_1184000); copy one locally with `gsutil -m cp -r <gs path> <dir>`.')


# ------------------------------------------------------------------ finding the checkpoint


def _is_step_dir(d: str) -> bool:
  return (os.path.isfile(os.path.join(d, MSGPACK_FILE))
          or os.path.isdir(os.path.join(d, ORBAX_ITEM)))


def find_checkpoint_dir(path: Any, step: Optional[int] = None) -> str:
  """Resolves a model dir / ``checkpoint_<step>`` dir / msgpack file to one step directory.

  With a model directory, ``step`` picks the step (default: the latest complete one;
  temporary ``checkpoint_<n>.tmp-*`` / ``.orbax-checkpoint-tmp-*`` directories are ignored).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(path):
    return os.path.dirname(path)
  if not os.path.isdir(path):
    raise missing_checkpoint_error(path, 'T5X checkpoint', _HOW_TO_GET)
  if _is_step_dir(path):
    if step is not None and not re.fullmatch(rf'checkpoint_0*{step}', os.path.basename(path)):
      raise ValueError(f'{path} is the checkpoint of one step; do not also pass step={step}')
    return path
  steps = {}
  for entry in os.listdir(path):
    m = re.fullmatch(r'checkpoint_(\d+)', entry)
    if m and _is_step_dir(os.path.join(path, entry)):
      steps[int(m.group(1))] = os.path.join(path, entry)
  if not steps:
    raise missing_checkpoint_error(
        path, f'T5X checkpoint (a checkpoint_<step>/ holding "{MSGPACK_FILE}" or '
        f'"{ORBAX_ITEM}/")', _HOW_TO_GET)
  if step is None:
    return steps[max(steps)]
  if step not in steps:
    raise missing_checkpoint_error(
        os.path.join(path, f'checkpoint_{step}'), f'T5X checkpoint of step {step}',
        f'Steps available in {path}: {sorted(steps)}.')
  return steps[step]


# ------------------------------------------------------------------ reading the layouts


def _is_ts_spec(value: Any) -> bool:
  # The same test t5x uses to tell a TensorStore spec from a nested state dict.
  return isinstance(value, Mapping) and {'driver', 'kvstore', 'metadata'} <= set(value)


def _absolute_spec(spec: Mapping[str, Any], ckpt_dir: str) -> dict[str, Any]:
  """The relative spec t5x writes -> one that opens the local zarr array (t5x's own rules)."""
  kvstore = dict(spec['kvstore'])
  if 'path' in kvstore:            # tensorstore >= 0.1.14 specs
    rel = kvstore['path']
  elif 'path' in spec:             # older specs kept the path at the top level
    rel = spec['path']
  else:
    raise ValueError(f'TensorStore spec without a path: {spec}')
  if kvstore.get('driver') not in ('file', 'gfile', 'gcs'):
    raise ValueError(f'unsupported TensorStore kvstore driver in {spec}')
  if not isinstance(rel, str):
    raise ValueError(f'TensorStore spec with a non-string path {rel!r} in {ckpt_dir}/'
                     f'{MSGPACK_FILE}; re-save the checkpoint with t5x')
  # Written on GCS or with gfile: the array files sit next to the msgpack all the same.
  # The msgpack is data: a path such as '../x' or '/x' would read arrays outside the checkpoint.
  where = resolve_inside(ckpt_dir, rel.rstrip('/'), f'{ckpt_dir}/{MSGPACK_FILE}')
  out = {'driver': spec.get('driver', 'zarr'), 'kvstore': {'driver': 'file', 'path': where + '/'}}
  if spec.get('dtype') == 'uint16':
    raise ValueError(f'{rel}: uint16-encoded bfloat16 (T5X checkpoint version < 3) is not '
                     'supported; re-save the checkpoint with a current t5x')
  return out


def _legacy_sources(ckpt_dir: str) -> dict[str, ArraySource]:
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ckpt_dir, MSGPACK_FILE), 'rb') as f:
    raw = f.read()
  if raw.startswith(b'model_checkpoint_path'):
    raise ValueError(f'{ckpt_dir}/{MSGPACK_FILE} is a TensorFlow (Mesh TF) checkpoint index, '
                     'not a T5X checkpoint; convert it with t5x first')
  contents = serialization.msgpack_restore(raw)
  if not isinstance(contents, Mapping):
    raise ValueError(f'{ckpt_dir}/{MSGPACK_FILE} does not hold a T5X state dict')
  # version >= 1 wraps the optimizer state; version 0 is a bare flax state dict.
  state = contents['optimizer'] if contents.get('version', 0) and 'optimizer' in contents \
      else contents
  sources: dict[str, ArraySource] = {}
  for name, value in flatten(state, is_leaf=_is_ts_spec).items():
    if _is_ts_spec(value):
      shape = value['metadata'].get('shape')
      dtype = jnp.dtype(value['dtype']) if 'dtype' in value else None
      sources[name] = TensorStoreSource(_absolute_spec(value, ckpt_dir), name, shape, dtype)
    elif isinstance(value, (np.ndarray, np.generic, int, float)):
      sources[name] = NumpySource(np.asarray(value), name)
  return sources


def _orbax_sources(item_dir: str) -> dict[str, ArraySource]:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(item_dir, 'manifest.ocdbt')):
    base = {'driver': 'ocdbt', 'base': f'file://{item_dir}/'}
    keys = [k.decode() for k in ts.KvStore.open(base).result().list().result()]
    kvstore = lambda key: {**base, 'path': key + '/'}
  else:
    keys = [f'{e}/{marker}' for e in os.listdir(item_dir)
            for marker in ('.zarray', 'zarr.json')
            if os.path.isfile(os.path.join(item_dir, e, marker))]
    kvstore = lambda key: {'driver': 'file', 'path': os.path.join(item_dir, key) + '/'}
  sources: dict[str, ArraySource] = {}
  for key in keys:
    array_key, _, marker = key.rpartition('/')
    driver = {'.zarray': 'zarr', 'zarr.json': 'zarr3'}.get(marker)
    if driver is None or '/' in array_key:
      continue
    # Orbax names a leaf by its keys joined with '.', as legacy T5X does.
    name = array_key.replace('.', '/')
    sources[name] = TensorStoreSource({'driver': driver, 'kvstore': kvstore(array_key)}, name)
  # Older Orbax kept small ("aggregated") values in a msgpack file in the item directory.
  aggregate = os.path.join(item_dir, MSGPACK_FILE)
  if os.path.isfile(aggregate):
    from flax import serialization  # pylint: disable=g-import-not-at-top
    with open(aggregate, 'rb') as f:
      for name, value in flatten(serialization.msgpack_restore(f.read()), is_leaf=_is_ts_spec).items():
        if isinstance(value, (np.ndarray, np.generic)) and name not in sources:
          sources[name] = NumpySource(np.asarray(value), name)
  return sources


def t5x_array_sources(path: Any, step: Optional[int] = None
                      ) -> tuple[str, dict[str, ArraySource]]:
  """Every array of a T5X checkpoint as lazy sources -> (checkpoint dir, ``{'target/...': src}``)."""
  ckpt_dir = find_checkpoint_dir(path, step)
  if os.path.isfile(os.path.join(ckpt_dir, MSGPACK_FILE)):
    return ckpt_dir, _legacy_sources(ckpt_dir)
  return ckpt_dir, _orbax_sources(os.path.join(ckpt_dir, ORBAX_ITEM))


# ------------------------------------------------------------------ mapping onto the model

_OURS_LAYER = re.compile(r'(encoder|decoder)/layers_(\d+)/(.+)')
_OURS_SCANNED = re.compile(r'(encoder|decoder)/layers/(.+)')
_RELPOS_NAMES = ('relpos_bias/rel_embedding', 'relative_posemb/rel_embedding')


def _scanned_prefix(ck: Mapping[str, ArraySource], stack: str) -> Optional[str]:
  """Where a scanned checkpoint keeps ``stack``'s stacked layers (flaxformer / scalable_t5)."""
  for sub in (stack, 'layers'):
    if any(n.startswith(f'{stack}/{sub}/') for n in ck):
      return f'{stack}/{sub}'
  return None


def _shared_relpos(ck: Mapping[str, ArraySource], stack: str, scan_axis: int, used: set,
                   notes: dict, ours: str) -> Optional[ArraySource]:
  """One shared bias from per-layer biases, only if every layer holds the same values."""
  per_layer: list[tuple[str, ArraySource]] = []
  for name, src in ck.items():
    m = re.fullmatch(rf'{stack}/layers_(\d+)/(.+)', name)
    if m and m.group(2) in _RELPOS_NAMES:
      per_layer.append((name, src))
  prefix = _scanned_prefix(ck, stack)
  for rel in _RELPOS_NAMES:
    if prefix and f'{prefix}/{rel}' in ck:
      base = ck[f'{prefix}/{rel}']
      per_layer += [(f'{prefix}/{rel}', LayerSlice(base, scan_axis, i))
                    for i in range(base.shape[scan_axis])]
  if not per_layer:
    return None
  values = [src.read() for _, src in per_layer]
  if all(np.array_equal(values[0], v) for v in values[1:]):
    used.update(n for n, _ in per_layer)
    return per_layer[0][1]
  diff = max(float(np.max(np.abs(values[0].astype(np.float32) - v.astype(np.float32))))
             for v in values[1:])
  notes[ours] = (f'the checkpoint has {len(values)} different per-layer relative position '
                 f'biases (max |difference| {diff:.3g}); this T5 shares one bias per stack '
                 '(T5 1.1 / HF), so this is a different architecture')
  return None


def map_t5x_to_model(ckpt: Mapping[str, ArraySource], expected: Mapping[str, Any], *,
                     scan_axis: int = T5X_SCAN_AXIS
                     ) -> tuple[dict[str, ArraySource], dict[str, str], list[str]]:
  """Builds one source per expected model parameter from T5X ``target/...`` arrays.

  expected: flat ``{model name: leaf with .shape}``.
  Returns (``{model name: source}``, notes for names that could not be mapped,
  unused checkpoint names under ``target/``).
  """
  ck = {n[len(TARGET) + 1:]: s for n, s in ckpt.items() if n.startswith(TARGET + '/')}
  if not ck:
    raise CheckpointMismatchError(unexpected=sorted(ckpt)[:50], source='T5X checkpoint',
                                  notes={n: 'no "target/" parameters at all' for n in ckpt})
  used: set[str] = set()
  notes: dict[str, str] = {}
  mapped: dict[str, ArraySource] = {}

  def take(name: str) -> ArraySource:
    used.add(name)
    return ck[name]

  for ours, leaf in expected.items():
    src = None
    m_layer, m_scan = _OURS_LAYER.fullmatch(ours), _OURS_SCANNED.fullmatch(ours)
    m_relpos = re.fullmatch(r'(encoder|decoder)/relpos_bias/rel_embedding', ours)
    if m_layer:
      stack, i, rest = m_layer.group(1), int(m_layer.group(2)), m_layer.group(3)
      prefix = _scanned_prefix(ck, stack)
      if ours in ck:
        src = take(ours)
      elif prefix and f'{prefix}/{rest}' in ck:
        base = ck[f'{prefix}/{rest}']
        if len(base.shape) <= scan_axis or i >= base.shape[scan_axis]:
          notes[ours] = (f'{TARGET}/{prefix}/{rest} has shape {base.shape}: no layer {i} on '
                         f'layers axis {scan_axis}')
        else:
          src = LayerSlice(take(f'{prefix}/{rest}'), scan_axis, i)
    elif m_scan:
      stack, rest = m_scan.group(1), m_scan.group(2)
      num_layers = int(leaf.shape[0]) if len(leaf.shape) else 0
      names = [f'{stack}/layers_{i}/{rest}' for i in range(num_layers)]
      prefix = _scanned_prefix(ck, stack)
      if names and all(n in ck for n in names):
        src = Stacked([take(n) for n in names], f'{TARGET}/{stack}/layers_*/{rest}')
      elif prefix and f'{prefix}/{rest}' in ck:
        base = ck[f'{prefix}/{rest}']
        if len(base.shape) <= scan_axis:
          notes[ours] = f'{TARGET}/{prefix}/{rest} has no layers axis {scan_axis}: {base.shape}'
        else:
          src = LayersFirst(take(f'{prefix}/{rest}'), scan_axis)
      elif any(n in ck for n in names):
        notes[ours] = (f'only layers {[i for i, n in enumerate(names) if n in ck]} of '
                       f'{num_layers} are in the checkpoint')
    elif ours in ck:
      src = take(ours)
    elif m_relpos:
      src = _shared_relpos(ck, m_relpos.group(1), scan_axis, used, notes, ours)
    if src is not None:
      mapped[ours] = src
  unused = sorted(f'{TARGET}/{n}' for n in set(ck) - used)
  return mapped, notes, unused


# ------------------------------------------------------------------ the loader


def load_t5x_params(path: Any, expected: Mapping[str, Any], *, step: Optional[int] = None,
                    shardings: Any = None, dtype: Any = None,
                    scan_axis: int = T5X_SCAN_AXIS,
                    skip: Optional[Callable[[str], bool]] = None) -> dict[str, Any]:
  """Loads a T5X checkpoint's ``target`` params into the layout of ``expected``.

  path: model dir, ``checkpoint_<step>`` dir or its msgpack file (legacy or Orbax T5X).
  expected: the model's parameter tree (``jax.eval_shape`` of ``init``, unboxed or with
    flax partitioning boxes); scanned or unscanned, whatever the checkpoint's layout.
  shardings: ``None`` (first device), one ``Sharding``, or a tree like ``expected``
    (e.g. ``partitioning.param_shardings``). Each array is read slice by slice straight
    into its sharding, one array at a time.
  dtype: cast on load (e.g. ``jnp.bfloat16``); default: the dtype of each ``expected`` leaf.
  scan_axis: layers axis of scanned checkpoint stacks (1 for t5x / flaxformer).
  skip: ``name -> True`` for parameters that are not in the checkpoint (adapters); they
    are returned as given in ``expected``.
  Returns a nested dict of ``jax.Array`` shaped like ``expected``.
  Raises CheckpointMismatchError (every missing / unexpected / mis-shaped name) and
  FileNotFoundError (no checkpoint, or an array file missing).
  """
  ckpt_dir, sources = t5x_array_sources(path, step)
  wanted = {n: v for n, v in flatten(expected).items() if skip is None or not skip(n)}
  mapped, notes, unused = map_t5x_to_model(sources, wanted, scan_axis=scan_axis)
  return place(mapped, expected, shardings=shardings, dtype=dtype, skip=skip,
               where=f'T5X checkpoint {ckpt_dir}', notes=notes, unexpected=unused)
