"""Lazy array sources and a loader that streams them, one array at a time, into their shardings.

A checkpoint reader produces :class:`ArraySource` objects: things with a ``shape``,
a ``dtype`` and ``read(index) -> np.ndarray`` that read *only* the requested slice
(TensorStore for T5X / Orbax, an in-memory array for msgpack or npz values).
Layout conversions (one layer out of a scanned stack, moving the layers axis,
stacking unscanned layers, transposing) are sources too, so they also read only what is
needed: a stacked source reads, for each device's shard, only that shard's slice of each
layer, so a layer stack is never materialised whole on the host.

:func:`place` is the one routine every reader ends in: it checks the mapped names and
shapes against the model once (one error listing every missing, unexpected and mis-shaped
name), then :func:`materialize` s each source into a ``jax.Array`` with
``jax.make_array_from_callback``: each device's shard is read from disk and cast (e.g. to
bf16) on its own, so the host never holds a full fp32 copy of the model, one array after
the other (or reads them to numpy with ``shardings=ON_HOST``).
Measured (tests/test_checkpoint_memory.py, 8 CPU devices, so every shard is in host
RAM): restoring a 256 MiB fp32 T5X checkpoint to bf16 peaks at ~0.56x its size (the
bf16 result is 0.5x), against ~1.3x for restore-the-fp32-tree-then-shard.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax.checkpoints.common import check_tree, flatten, unflatten

Index = tuple  # a tuple of slices (and, internally, ints)


def normalize_index(index: Index, shape: Sequence[int]) -> tuple[slice, ...]:
  """Pads ``index`` to ``len(shape)`` full slices; jax passes ``slice(None)`` for unsharded dims."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for ix, n in zip(index, shape):
    start, stop, step = ix.indices(n)
    if step != 1:
      raise ValueError(f'strided reads are not supported (index {index})')
    out.append(slice(start, stop))
  return tuple(out)


class ArraySource:
  """A named, lazily read array: ``shape``, ``dtype`` and ``read(index) -> np.ndarray``."""
  name: str = '?'
  shape: tuple[int, ...] = ()
  dtype: Any = None

  def read(self, index: Index = ()) -> np.ndarray:
    raise NotImplementedError

  def children(self) -> Sequence['ArraySource']:
    """Sources this one reads from (layout conversions); empty for stored arrays."""
    return ()

  def check(self) -> None:
    """Raises now (file missing, shape differs from what was recorded) rather than mid-load."""
    for child in self.children():
      child.check()

  def release(self) -> None:
    """Frees host memory held for reading (caches, memory maps) once the array is placed."""
    for child in self.children():
      child.release()

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.name!r}, shape={self.shape}, dtype={self.dtype})'


class NumpySource(ArraySource):
  """An array already in host memory (a msgpack-inlined value, an npz entry)."""

  def __init__(self, array: Any, name: str):
    self._array = np.asarray(array)  # also accepts np.memmap views without copying them
    self.name = name
    self.shape = tuple(int(d) for d in self._array.shape)
    self.dtype = self._array.dtype

  def read(self, index: Index = ()) -> np.ndarray:
    return np.asarray(self._array[normalize_index(index, self.shape)])


class LazyNpzSource(ArraySource):
  """One entry of an ``.npz`` archive, decompressed only when read (then kept for later slices)."""

  def __init__(self, npz: Any, key: str, shape: Sequence[int], dtype: Any, name: str):
    self._npz, self._key = npz, key
    self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
    self._cached: Optional[np.ndarray] = None

  def read(self, index: Index = ()) -> np.ndarray:
    if self._cached is None:
      self._cached = np.asarray(self._npz[self._key])
    return self._cached[normalize_index(index, self.shape)]

  def release(self) -> None:
    """Drops the decompressed copy (called once the array has been placed on devices)."""
    self._cached = None


class TensorStoreSource(ArraySource):
  """A TensorStore array (zarr / zarr3, file or OCDBT kvstore); each ``read`` fetches one slice.

  The store is opened lazily and without a chunk cache, so memory is the slice read
  plus the chunks it touches while they are decoded.
  """

  def __init__(self, spec: Mapping[str, Any], name: str,
               shape: Optional[Sequence[int]] = None, dtype: Any = None):
    self.spec = dict(spec)
    self.name = name
    self._store = None
    if shape is None or dtype is None:
      store = self._open()
      shape, dtype = store.shape, store.dtype.numpy_dtype
    self.shape = tuple(int(d) for d in shape)
    self.dtype = np.dtype(dtype)

  def _open(self):
    if self._store is None:
      import tensorstore as ts  # pylint: disable=g-import-not-at-top
      try:
        self._store = ts.open(self.spec, open=True, read=True,
                              context=ts.Context({'cache_pool': {'total_bytes_limit': 0}})
                              ).result()
      except ValueError as e:
        raise FileNotFoundError(
            f'cannot open the TensorStore array for {self.name!r} (spec {self.spec}): {e}'
        ) from e
    return self._store

  def check(self) -> None:
    store = self._open()
    if tuple(store.shape) != self.shape:
      raise ValueError(f'{self.name}: the array on disk has shape {tuple(store.shape)} but the '
                       f'checkpoint index records {self.shape} ({self.spec})')

  def read(self, index: Index = ()) -> np.ndarray:
    store = self._open()
    return np.asarray(store[normalize_index(index, self.shape)].read().result())


class LayerSlice(ArraySource):
  """Layer ``layer`` of a stacked source whose layers axis is ``axis`` (that axis removed)."""

  def __init__(self, base: ArraySource, axis: int, layer: int):
    if not 0 <= layer < base.shape[axis]:
      raise IndexError(f'{base.name}: layer {layer} out of range for shape {base.shape} '
                       f'(layers axis {axis})')
    self.base, self.axis, self.layer = base, axis, layer
    self.name = f'{base.name}[layer {layer} of axis {axis}]'
    self.shape = base.shape[:axis] + base.shape[axis + 1:]
    self.dtype = base.dtype

  def children(self):
    return (self.base,)

  def read(self, index: Index = ()) -> np.ndarray:
    idx = list(normalize_index(index, self.shape))
    idx.insert(self.axis, slice(self.layer, self.layer + 1))
    return np.squeeze(self.base.read(tuple(idx)), axis=self.axis)


class LayersFirst(ArraySource):
  """A stacked source with its layers axis moved from ``axis`` to 0 (t5x scan axis 1 -> ours 0)."""

  def __init__(self, base: ArraySource, axis: int):
    self.base, self.axis = base, axis
    self.name = f'{base.name}[layers axis {axis} -> 0]'
    rest = base.shape[:axis] + base.shape[axis + 1:]
    self.shape = (base.shape[axis],) + rest
    self.dtype = base.dtype

  def children(self):
    return (self.base,)

  def read(self, index: Index = ()) -> np.ndarray:
    idx = normalize_index(index, self.shape)
    src_idx = list(idx[1:])
    src_idx.insert(self.axis, idx[0])
    return np.moveaxis(self.base.read(tuple(src_idx)), self.axis, 0)


class Transposed(ArraySource):
  """``np.transpose(base, axes)`` (default: all axes reversed); reads only the matching slice."""

  def __init__(self, base: ArraySource, axes: Optional[Sequence[int]] = None):
    self.base = base
    self.axes = tuple(reversed(range(len(base.shape)))) if axes is None else tuple(axes)
    self.name = f'{base.name}.T' if axes is None else f'{base.name}[axes {self.axes}]'
    self.shape = tuple(base.shape[a] for a in self.axes)
    self.dtype = base.dtype

  def children(self):
    return (self.base,)

  def read(self, index: Index = ()) -> np.ndarray:
    idx = normalize_index(index, self.shape)
    src_idx = [slice(None)] * len(self.axes)
    for out_axis, src_axis in enumerate(self.axes):
      src_idx[src_axis] = idx[out_axis]
    return np.transpose(self.base.read(tuple(src_idx)), self.axes)


class Stacked(ArraySource):
  """Unscanned per-layer sources stacked on a new leading layers axis."""

  def __init__(self, parts: Sequence[ArraySource], name: str):
    shapes = {p.shape for p in parts}
    if len(shapes) != 1:
      raise ValueError(f'{name}: per-layer arrays have different shapes '
                       f'{[(p.name, p.shape) for p in parts]}')
    self.parts, self.name = list(parts), name
    self.shape = (len(parts),) + parts[0].shape
    self.dtype = parts[0].dtype

  def children(self):
    return tuple(self.parts)

  def read(self, index: Index = ()) -> np.ndarray:
    idx = normalize_index(index, self.shape)
    chosen = self.parts[idx[0]]
    return np.stack([p.read(idx[1:]) for p in chosen], axis=0)


class Converted(ArraySource):
  """``fn(*parts)`` (a transpose / reshape / split of stored tensors), computed once when first read.

  For layout changes a slice cannot express (splitting heads, [cls] + posemb): the parts are
  read whole, converted, and the result kept until :meth:`release` (one array at a time).
  """

  def __init__(self, parts: Sequence[ArraySource], fn: Callable, shape, dtype, name: str):
    self.parts, self.fn, self.name = list(parts), fn, name
    self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    self._cached: Optional[np.ndarray] = None

  def children(self):
    return tuple(self.parts)

  def read(self, index: Index = ()) -> np.ndarray:
    if self._cached is None:
      self._cached = np.asarray(self.fn(*[p.read() for p in self.parts]))
      for p in self.parts:
        p.release()
    return self._cached[normalize_index(index, self.shape)]

  def release(self) -> None:
    self._cached = None
    super().release()


def _index_key(index: Index) -> tuple:
  return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def materialize(source: ArraySource, sharding: Optional[jax.sharding.Sharding] = None,
                dtype: Any = None) -> jax.Array:
  """Reads ``source`` shard by shard straight into ``sharding`` (default: first device).

  Each device's slice is read (and cast to ``dtype`` if given) independently; devices
  that hold the same slice (replication) share one read.
  """
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(source.dtype)
  cache: dict[tuple, np.ndarray] = {}

  def read(index: Index) -> np.ndarray:
    key = _index_key(normalize_index(index, source.shape))
    if key not in cache:
      cache[key] = np.ascontiguousarray(source.read(index).astype(out_dtype, copy=False))
    return cache[key]

  array = jax.make_array_from_callback(source.shape, sharding, read, dtype=out_dtype)
  cache.clear()
  source.release()
  return array


ON_HOST = 'host'  # ``shardings=ON_HOST``: numpy arrays on the host instead of jax.Arrays


def _flat_shardings(shardings: Any, wanted: Mapping[str, Any], where: str) -> Optional[dict]:
  """A shardings tree -> flat dict with an entry for every name of ``wanted`` (checked before
  any read). Entries for other names (e.g. adapters a caller's tree also covers) are unused."""
  if not isinstance(shardings, Mapping):
    return None
  flat = flatten(shardings)
  missing = sorted(set(wanted) - set(flat))
  if missing:
    raise ValueError(f'{where}: the shardings tree does not match the params: no sharding for '
                     f'{missing[:3]}{" ..." if len(missing) > 3 else ""}; pass one Sharding, or '
                     'a tree with (at least) the paths of the params')
  return flat


def _read_host(source: ArraySource, dtype: Any) -> np.ndarray:
  value = source.read()
  source.release()
  return value if dtype is None else value.astype(dtype, copy=False)


def place(sources: Mapping[str, ArraySource], expected: Mapping[str, Any], *,
          shardings: Any = None, dtype: Any = None, skip: Optional[Callable[[str], bool]] = None,
          where: str = 'checkpoint', notes: Optional[Mapping[str, str]] = None,
          unexpected: Sequence[str] = (),
          on_checked: Optional[Callable[[], None]] = None) -> dict[str, Any]:
  """The one placement routine of every reader: check names and shapes once, then stream.

  sources: flat ``{our '/'-joined name: ArraySource}`` a reader mapped from its file.
  expected: the model's parameter tree (nested or flat; arrays, ``jax.ShapeDtypeStruct`` or
    flax boxes). Each leaf's dtype is the default target dtype.
  shardings: ``None`` (first device), one ``Sharding`` for all, a tree / flat dict with
    ``expected``'s names, or :data:`ON_HOST` for numpy arrays.
  dtype: one cast for every floating array (e.g. ``jnp.bfloat16``); integer / bool keep theirs.
  skip: ``name -> True`` for leaves no checkpoint has (adapters): returned as in ``expected``.
  where / notes / unexpected: for the error: the checkpoint's description, ``{name: text}``
    shown next to a name, and source-side names the reader could not map.
  on_checked: called once names and shapes fit, before anything is read (a reader's checks
    of settings that shapes cannot show, e.g. the activation in config.json).
  Raises :class:`~adalink_jax.checkpoints.common.CheckpointMismatchError` listing every
  missing, unexpected and mis-shaped name before anything is read; then every file is
  checked, then arrays are placed one at a time (each device's shard read on its own), so
  the host never holds a full copy of a sharded array.
  Returns a nested dict shaped like ``expected``.
  """
  exp_flat = flatten(expected)
  wanted = {n: v for n, v in exp_flat.items() if skip is None or not skip(n)}
  check_tree(wanted, sources, source=where, extra_unexpected=unexpected, notes=notes)
  if on_checked is not None:
    on_checked()
  on_host = isinstance(shardings, str) and shardings == ON_HOST
  flat_sh = None if on_host else _flat_shardings(shardings, exp_flat, where)
  for src in sources.values():
    src.check()
  out = {n: v for n, v in exp_flat.items() if n not in wanted}
  for name in sorted(sources):
    src, leaf = sources[name], wanted[name]
    leaf = leaf.unbox() if hasattr(leaf, 'unbox') else leaf
    cast = dtype if dtype is not None else getattr(leaf, 'dtype', None)
    if cast is not None and not jnp.issubdtype(src.dtype, jnp.floating):
      cast = None  # integer / bool arrays keep their type
    if on_host:
      out[name] = _read_host(src, cast)
    else:
      out[name] = materialize(src, flat_sh[name] if flat_sh is not None else shardings, cast)
  return unflatten(out)


def current_rss_bytes() -> int:
  """Resident set size of this process now (Linux ``/proc``), for memory reporting."""
  with open(f'/proc/{os.getpid()}/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
