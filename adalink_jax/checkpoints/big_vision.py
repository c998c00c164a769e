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

Another resolution (PaLI-style transfer at 448 / 896 px): a learned ``pos_embedding`` whose
square grid differs from the model's is resampled bilinearly, exactly as big_vision's
``vit.resample_posemb`` does when ``vit.load`` restores into a model of another image size
(:class:`ResampledPosemb`); the log says so.

Arrays stored uncompressed (``np.savez``, what big_vision writes) are memory-mapped, so
each device reads only its slice; compressed members are inflated one at a time.
"""
from __future__ import annotations

import logging
import math
import os
import re
import struct
import zipfile
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from adalink_jax.checkpoints.common import flatten, missing_checkpoint_error
from adalink_jax.checkpoints.streaming import (ArraySource, LayerSlice, LazyNpzSource,
                                               Stacked, normalize_index, place)

log = logging.getLogger(__name__)

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


def _square_side(n: int) -> Optional[int]:
  side = math.isqrt(n)
  return side if side > 0 and side * side == n else None


def resample_posemb(old: np.ndarray, gs_new: int) -> np.ndarray:
  """big_vision's ``vit.resample_posemb``: ``[1, g*g, d] -> [1, gs_new*gs_new, d]``.

  The ``[g, g, d]`` grid is zoomed by ``gs_new / g`` on both spatial axes with
  ``scipy.ndimage.zoom(order=1)`` (bilinear; corner positions are kept). bfloat16 / float16
  grids are zoomed in float32 (scipy has no half-precision kernels).
  """
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  gs_old = math.isqrt(old.shape[1])
  grid = old.reshape(gs_old, gs_old, -1)
  if grid.dtype not in (np.float32, np.float64):
    grid = grid.astype(np.float32)
  zoom = (gs_new / gs_old, gs_new / gs_old, 1)
  return scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, gs_new * gs_new, -1)


class ResampledPosemb(ArraySource):
  """A ``[1, g*g, d]`` position embedding read whole and resampled to ``[1, G*G, d]`` once.

  Only this one (small) array is held: it is computed on the first shard's read, sliced for
  every shard, and dropped by ``release`` once placed, like any other source.
  """

  def __init__(self, base: ArraySource, gs_new: int, where: str = ''):
    self.base, self.gs_old, self.gs_new = base, math.isqrt(base.shape[1]), gs_new
    self.where = where or base.name
    self.name = f'{base.name} resampled {self.gs_old}x{self.gs_old} -> {gs_new}x{gs_new}'
    self.shape = (1, gs_new * gs_new, base.shape[2])
    self.dtype = np.dtype(np.float64 if np.dtype(base.dtype) == np.float64 else np.float32)
    self._cached: Optional[np.ndarray] = None

  def children(self):
    return (self.base,)

  def read(self, index=()):
    if self._cached is None:
      self._cached = resample_posemb(self.base.read(), self.gs_new)
      self.base.release()
      log.info('%s: pos_embedding grid resampled from %dx%d to %dx%d for the model\'s image '
               'size (bilinear, as big_vision vit.resample_posemb)', self.where,
               self.gs_old, self.gs_old, self.gs_new, self.gs_new)
    return self._cached[normalize_index(index, self.shape)]

  def release(self):
    self._cached = None
    super().release()


def resample_pos_embedding(mapped: dict[str, ArraySource], wanted: Mapping[str, Any],
                           notes: dict[str, str], where: str = '') -> None:
  """Replaces ``mapped['pos_embedding']`` by a :class:`ResampledPosemb` when only its grid differs.

  Both must be ``[1, n, d]`` with the same ``d`` and square ``n``; anything else is left for
  the shape check to report, with a note saying why it was not resampled.
  """
  src, want = mapped.get('pos_embedding'), wanted.get('pos_embedding')
  if src is None or want is None:
    return
  want = want.unbox() if hasattr(want, 'unbox') else want
  have, need = tuple(src.shape), tuple(int(d) for d in want.shape)
  if have == need:
    return
  if (len(have) == len(need) == 3 and have[0] == need[0] == 1 and have[2] == need[2]
      and _square_side(have[1]) and _square_side(need[1])):
    mapped['pos_embedding'] = ResampledPosemb(src, _square_side(need[1]), where)
    return
  why = ('not resampled: only a [1, g*g, d] grid resamples to another square grid of the same '
         'width d (big_vision vit.resample_posemb)')
  notes['pos_embedding'] = f"{notes['pos_embedding']}; {why}" if 'pos_embedding' in notes else why


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
  if pe is not None and len(pe.shape) == 3 and 'pos_embedding' in expected:
    n, want = pe.shape[1], int(tuple(expected['pos_embedding'].shape)[1])
    # [cls] + g*g slots: split when the model wants that grid or another square one (resampled).
    if _square_side(n - 1) and (want == n - 1 or (want != n and _square_side(want))):
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
    ``params['img']``), scanned or not. A model of another image size (same patch size)
    gets the checkpoint's position-embedding grid resampled to its own (logged).
  shardings / dtype / skip: as in :func:`adalink_jax.checkpoints.t5x.load_t5x_params`
    (default dtype: each ``expected`` leaf's).
  Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped name.
  """
  file, submodel = _split_submodel(path)
  sources = npz_sources(file)
  root = _find_root(sources, submodel, file)
  ck = {n[len(root):]: s for n, s in sources.items() if n.startswith(root)}
  wanted = {n: v for n, v in flatten(expected).items() if skip is None or not skip(n)}
  _old_layout_fixes(ck, wanted)
  mapped, notes, unused = map_big_vision_to_model(ck, wanted)
  resample_pos_embedding(mapped, wanted, notes, f'{file} ({root}pos_embedding)')
  return place(mapped, expected, shardings=shardings, dtype=dtype, skip=skip,
               where=f'big_vision checkpoint {file} (tree "{root}")', notes=notes,
               unexpected=[root + n for n in unused])
