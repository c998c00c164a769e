"""ViT / SigLIP image towers from big_vision ``.npz`` checkpoints, streamed into their shardings.

big_vision writes a checkpoint with ``np.savez``: one ``.npy`` member per leaf, named by
its '/'-joined path (``big_vision.utils.tree_flatten_with_names``; bfloat16 is stored as
2-byte void and viewed back, as ``utils.recover_dtype`` does). ``utils.load_params``
accepts three roots, all handled here: ``params/...`` (optax-era train checkpoints),
``opt/target/...`` (flax.optim-era) and the bare tree (released checkpoints). Two-tower
(SigLIP) and PaliGemma checkpoints keep the image tower under ``img/``
(``params/img/Transformer/...``); ``path.npz:img`` selects a sub-tree explicitly, like
big_vision's own ``load_params``.

Scanned ViTs stack the blocks under ``Transformer/encoderblock`` with the layers axis
first (``nn.scan(variable_axes={'params': 0})``); either layout loads into either of our
layouts. Like ``big_vision.models.vit.fix_old_checkpoints``, the original ViT's
``Transformer/posembed_input/pos_embedding`` and ``Transformer/pos_embedding`` become
``pos_embedding``, and a position embedding that still carries the [cls] slot is split.
A classifier ``head`` / ``pre_logits`` and, when the model has none, ``MAPHead_0`` and
``cls`` are not needed by an image tower and are skipped.

Arrays stored uncompressed (``np.savez``, what big_vision writes) are memory-mapped, so
each device reads only its slice; compressed members are inflated one at a time.
"""
from __future__ import annotations

import math
import os
import re
import struct
import zipfile
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from adalink_jax.checkpoints.common import (check_tree, flatten, missing_checkpoint_error,
                                            unflatten)
from adalink_jax.checkpoints.streaming import (ArraySource, LayerSlice, LazyNpzSource,
                                               Stacked, normalize_index, place_all)

ROOTS = ('', 'params/', 'opt/target/')
TOWERS = ('', 'img/')
_ANCHOR = 'Transformer/encoder_norm/scale'  # every ViT has it; used to find the tree's root
_NOT_AN_IMAGE_TOWER_PART = ('head/', 'pre_logits/')

_HOW_TO_GET = (
    'Pass a big_vision .npz checkpoint (optionally "path.npz:img" for one tower), e.g. '
    'gs://big_vision/siglip/webli_en_so400m_224_57633886.npz or a PaliGemma '
    'pt_224.npz; copy it locally with `gsutil cp <gs path> <dir>`.')


class _MemmapNpySource(ArraySource):
  """An uncompressed ``.npy`` member of an ``.npz``, memory-mapped: reads touch only the slice."""

  def __init__(self, path: str, offset: int, shape, dtype, name: str, view_as=None):
    self._path, self._offset, self._stored = path, offset, np.dtype(dtype)
    self._view_as = view_as
    self._map: Optional[np.memmap] = None
    self.name, self.shape = name, tuple(int(d) for d in shape)
    self.dtype = np.dtype(view_as) if view_as is not None else self._stored

  def read(self, index=()):
    if math.prod(self.shape) == 0:
      return np.zeros(self.shape, self.dtype)[normalize_index(index, self.shape)]
    if self._map is None:
      self._map = np.memmap(self._path, self._stored, 'r', self._offset, self.shape or (1,))
    arr = self._map if self.shape else self._map.reshape(())
    out = np.array(arr[normalize_index(index, self.shape)])  # copy out of the mapping
    return out.view(self._view_as) if self._view_as is not None else out

  def release(self) -> None:
    self._map = None  # unmaps once the array sits on the devices


def _member_data_offset(fh, info: zipfile.ZipInfo) -> int:
  """File offset where a stored zip member's bytes begin (after its local header)."""
  fh.seek(info.header_offset)
  header = fh.read(30)
  if header[:4] != b'PK\x03\x04':
    raise ValueError(f'{info.filename}: bad zip local header')
  name_len, extra_len = struct.unpack('<HH', header[26:30])
  return info.header_offset + 30 + name_len + extra_len


def npz_sources(path: str) -> dict[str, ArraySource]:
  """Every array of an ``.npz`` as a lazy source, keyed by its name (``.npy`` dropped)."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise missing_checkpoint_error(path, 'big_vision .npz checkpoint', _HOW_TO_GET)
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path} is not an .npz (zip) archive; big_vision tensorstore checkpoint '
                     'directories are not supported here, convert them to .npz first')
  sources: dict[str, ArraySource] = {}
  npz = np.load(path, allow_pickle=False)
  with zipfile.ZipFile(path) as zf, open(path, 'rb') as fh:
    for info in zf.infolist():
      if not info.filename.endswith('.npy'):
        continue
      name = info.filename[:-len('.npy')]
      with zf.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(member)
        header_len = member.tell()
      # np.save writes bfloat16 as 2-byte void; big_vision's recover_dtype views it back.
      view_as = jnp.bfloat16 if dtype.type is np.void and dtype.itemsize == 2 else None
      if dtype.hasobject:
        raise ValueError(f'{path}:{name} holds Python objects; not a parameter array')
      if info.compress_type == zipfile.ZIP_STORED and not fortran:
        offset = _member_data_offset(fh, info) + header_len
        sources[name] = _MemmapNpySource(path, offset, shape, dtype, name, view_as)
      else:
        src = LazyNpzSource(npz, name, shape, dtype, name)
        if view_as is not None:
          src = _Viewed(src, view_as)
        sources[name] = src
  return sources


class _Viewed(ArraySource):
  """A source whose raw 2-byte values are reinterpreted (bfloat16 saved as void)."""

  def __init__(self, base: ArraySource, dtype):
    self.base, self.name, self.shape, self.dtype = base, base.name, base.shape, np.dtype(dtype)

  def children(self):
    return (self.base,)

  def read(self, index=()):
    return self.base.read(index).view(self.dtype)


class _Slice(ArraySource):
  """``base[..., start:stop, ...]`` along one axis (splitting [cls] out of a position embedding)."""

  def __init__(self, base: ArraySource, axis: int, start: int, stop: int):
    self.base, self.axis, self.start = base, axis, start
    self.name = f'{base.name}[{start}:{stop} on axis {axis}]'
    self.shape = base.shape[:axis] + (stop - start,) + base.shape[axis + 1:]
    self.dtype = base.dtype

  def children(self):
    return (self.base,)

  def read(self, index=()):
    idx = list(normalize_index(index, self.shape))
    sl = idx[self.axis]
    idx[self.axis] = slice(sl.start + self.start, sl.stop + self.start)
    return self.base.read(tuple(idx))


class _Sum(ArraySource):
  """Elementwise ``a + b`` of two same-shaped sources (old checkpoints' [cls] + its posemb)."""

  def __init__(self, a: ArraySource, b: ArraySource):
    if a.shape != b.shape:
      raise ValueError(f'cannot add {a.name} {a.shape} and {b.name} {b.shape}')
    self.a, self.b, self.name, self.shape = a, b, f'{a.name} + {b.name}', a.shape
    self.dtype = np.result_type(a.dtype, b.dtype)

  def children(self):
    return (self.a, self.b)

  def read(self, index=()):
    return self.a.read(index).astype(self.dtype) + self.b.read(index).astype(self.dtype)


def _split_submodel(path: Any) -> tuple[str, Optional[str]]:
  """``'/x/model.npz:img'`` -> (``'/x/model.npz'``, ``'img'``), as big_vision's load_params."""
  path = os.fspath(path)
  m = re.fullmatch(r'(.*?\.npz)(?::([\w/]+))?', path)
  return (m.group(1), m.group(2)) if m else (path, None)


def _find_root(names, submodel: Optional[str], path: str) -> str:
  if submodel is not None:
    roots = [f'{r}{submodel.strip("/")}/' for r in ROOTS]
  else:
    roots = [f'{r}{t}' for t in TOWERS for r in ROOTS]
  found = [r for r in roots if f'{r}{_ANCHOR}' in names or
           f'{r}Transformer/encoder_norm/bias' in names]
  if not found:
    sample = sorted(names)[:12]
    raise ValueError(f'{path}: no ViT found (looked for "<root>{_ANCHOR}" with root in '
                     f'{roots}); the archive starts with {sample}. Pass "path.npz:<tower>" '
                     'to pick a sub-model.')
  return found[0]


def _old_layout_fixes(ck: dict[str, ArraySource], expected: Mapping[str, Any]) -> None:
  """big_vision's fix_old_checkpoints, as renames/derived sources (nothing is read here)."""
  for old in ('Transformer/posembed_input/pos_embedding', 'Transformer/pos_embedding'):
    if old in ck and 'pos_embedding' not in ck:
      ck['pos_embedding'] = ck.pop(old)
  pe = ck.get('pos_embedding')
  if pe is not None and len(pe.shape) == 3:
    n = pe.shape[1]
    if int(math.isqrt(n - 1)) ** 2 + 1 == n and 'pos_embedding' in expected \
        and tuple(expected['pos_embedding'].shape)[1] == n - 1:
      ck['pos_embedding'] = _Slice(pe, 1, 1, n)
      if 'cls' in ck:
        ck['cls'] = _Sum(ck['cls'], _Slice(pe, 1, 0, 1))
  if 'probe' in ck:  # MAP head inlined at the top (ViT-G development variants)
    for k in list(ck):
      if k.split('/')[0] in ('probe', 'MlpBlock_0', 'MultiHeadDotProductAttention_0',
                             'LayerNorm_0'):
        ck[f'MAPHead_0/{k}'] = ck.pop(k)


def map_big_vision_to_model(ck: Mapping[str, ArraySource], expected: Mapping[str, Any]
                            ) -> tuple[dict[str, ArraySource], dict[str, str], list[str]]:
  """One source per expected ViT parameter -> (sources, notes, unused checkpoint names)."""
  used: set[str] = set()
  notes: dict[str, str] = {}
  mapped: dict[str, ArraySource] = {}
  for ours, leaf in expected.items():
    m_block = re.fullmatch(r'Transformer/encoderblock_(\d+)/(.+)', ours)
    m_scan = re.fullmatch(r'Transformer/encoderblock/(.+)', ours)
    if ours in ck and not m_scan:
      mapped[ours] = ck[ours]
      used.add(ours)
    elif m_block and f'Transformer/encoderblock/{m_block.group(2)}' in ck:
      name = f'Transformer/encoderblock/{m_block.group(2)}'
      base, i = ck[name], int(m_block.group(1))
      if not base.shape or i >= base.shape[0]:
        notes[ours] = f'{name} has shape {base.shape}: no layer {i}'
        continue
      mapped[ours] = LayerSlice(base, 0, i)
      used.add(name)
    elif m_scan:
      rest = m_scan.group(1)
      names = [f'Transformer/encoderblock_{i}/{rest}' for i in range(int(leaf.shape[0]))]
      if ours in ck:
        mapped[ours] = ck[ours]
        used.add(ours)
      elif all(n in ck for n in names):
        mapped[ours] = Stacked([ck[n] for n in names], f'Transformer/encoderblock_*/{rest}')
        used.update(names)
      elif any(n in ck for n in names):
        notes[ours] = (f'only blocks {[i for i, n in enumerate(names) if n in ck]} of '
                       f'{len(names)} are in the checkpoint')
  unused = []
  for name in sorted(set(ck) - used):
    if name.startswith(_NOT_AN_IMAGE_TOWER_PART):
      continue  # a classifier on top of the tower
    if name.startswith('MAPHead_0/') and not any(n.startswith('MAPHead_0/') for n in expected):
      continue  # the model pools otherwise (PaLI keeps every token)
    if name == 'cls' and 'cls' not in expected:
      continue
    unused.append(name)
  return mapped, notes, unused


def load_big_vision_params(path: Any, expected: Mapping[str, Any], *,
                           shardings: Any = None, dtype: Any = None,
                           skip: Optional[Callable[[str], bool]] = None) -> dict[str, Any]:
  """Loads a big_vision ViT / SigLIP / PaliGemma image tower into the layout of ``expected``.

  path: ``.npz`` file, optionally ``file.npz:<sub-tree>`` (e.g. ``:img``); without it the
    tower is found under ``''``, ``params/``, ``opt/target/`` or their ``img/`` sub-tree.
  expected: our ViT's parameter tree (``jax.eval_shape`` of ``init``; e.g. a PaLI model's
    ``params['img']``), scanned or not.
  shardings / dtype / skip: as in :func:`adalink_jax.checkpoints.t5x.load_t5x_params`
    (default dtype: each ``expected`` leaf's).
  Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped name.
  """
  file, submodel = _split_submodel(path)
  sources = npz_sources(file)
  root = _find_root(sources, submodel, file)
  ck = {n[len(root):]: s for n, s in sources.items() if n.startswith(root)}
  exp_flat = flatten(expected)
  wanted = {n: v for n, v in exp_flat.items() if skip is None or not skip(n)}
  _old_layout_fixes(ck, wanted)
  mapped, notes, unused = map_big_vision_to_model(ck, wanted)
  check_tree(wanted, mapped, source=f'big_vision checkpoint {file} (tree "{root}")',
             extra_unexpected=[root + n for n in unused], notes=notes)
  out = {n: v for n, v in exp_flat.items() if n not in wanted}
  out.update(place_all(mapped, exp_flat, shardings, dtype))
  return unflatten(out)
