"""A content hash of a parameter tree, computed where the arrays are, equal on any mesh.

Each leaf is reduced on its own devices to a few 32-bit "lane" sums: its bits are taken as
unsigned words (4-byte types bitcast, 2-byte types widened, 1-byte types widened, 8-byte
types split in two), each word is mixed with its *global* position by a murmur3 finaliser
keyed per lane, and the mixed words are summed mod 2^32. Integer addition mod 2^32 is exact
and order-free, so the sums do not depend on how the leaf is sharded, on the mesh shape or
on the number of processes; the reduction returns a replicated scalar per lane that every
process reads. No process ever holds a whole array, and the host sees only the sums.
Each device walks its own block in chunks (``shard_map``; global positions from the block's
offset) and the blocks' sums are added over the mesh axes that shard the leaf, so device
temporaries stay a few chunks (measured on CPU: none for 4-byte leaves, plus one same-width
copy of the block for 1- and 2-byte leaves).

The host then combines ``(path, dtype, shape, lane sums)`` of every leaf in sorted path
order with sha256. Because the mix of a word with its position is a bijection of the word,
changing any single element changes every lane; moving values between positions changes a
lane with probability 1 - 2^-32 per lane (``LANES`` independent lanes).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from adalink_jax.checkpoints.common import flatten

VERSION = 'adalink-fingerprint-v1'
# One seed per lane: independent keyings of the positions (arbitrary odd constants).
_SEEDS = (0x9E3779B9, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)
LANES = len(_SEEDS)
_STEP = 0x9E3779B1  # multiplies an index before it is folded into the position key
CHUNK = 1 << 20  # elements per step of the on-device loop (a few MiB of temporaries)


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words: shape ``x.shape`` (``x.shape + (2,)`` for 8-byte types)."""
  dt = jnp.dtype(x.dtype)
  if dt == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = (jnp.iinfo(dt).bits if jnp.issubdtype(dt, jnp.integer) else
          jnp.finfo(dt).bits if jnp.issubdtype(dt, jnp.floating) else None)
  if bits not in (8, 16, 32, 64):
    raise TypeError(f'fingerprint: dtype {dt} is not supported (bool and 8/16/32/64-bit ints '
                    'and floats are); cast the leaf first')
  if bits >= 32:  # 64-bit types give a trailing axis of 2 words
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  narrow = jnp.uint16 if bits == 16 else jnp.uint8
  return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _same_width_bits(x: jax.Array) -> jax.Array:
  """2-byte and 1-byte leaves as uint16 / uint8 of the same bits (what :func:`_words` widens)."""
  bits = jnp.dtype(x.dtype).itemsize * 8
  if x.dtype == jnp.bool_ or bits > 16 or jnp.dtype(x.dtype).kind == 'u':
    return x
  return jax.lax.bitcast_convert_type(x, jnp.uint16 if bits == 16 else jnp.uint8)


def _position_key(shape: tuple[int, ...], seed: int) -> jax.Array:
  """A per-lane key of every position of ``shape``, chained one axis at a time (global path).

  No index is ever flattened: a flat index of a large stacked leaf would overflow 32 bits.
  """
  key = jnp.full((), seed, jnp.uint32)
  for axis in range(len(shape)):
    idx = jax.lax.broadcasted_iota(jnp.uint32, shape[:axis + 1], axis)
    key = _fmix32(key[..., None] + idx * jnp.uint32(_STEP))  # [*shape[:axis + 1]]
  return key


def _lane_sums(x: jax.Array) -> jax.Array:
  """``[LANES]`` uint32: sum over positions of fmix32(word ^ key_lane(position)) mod 2^32.

  The definition, on the global array; used for shardings other than Named / single-device.
  """
  words = _words(x)
  return jnp.stack([
      jnp.sum(_fmix32(words ^ _position_key(words.shape, s)), dtype=jnp.uint32)
      for s in _SEEDS])


def _chunk_lanes(chunk: jax.Array, start: jax.Array, local_shape: tuple[int, ...],
                 offsets: list[jax.Array]) -> jax.Array:
  """``[LANES]`` sums of ``chunk`` = elements ``start:start+len`` of a flattened local block.

  Each element's global index along axis d is its local index plus ``offsets[d]``; the
  keys are chained exactly as in :func:`_position_key`, so the sums equal the definition.
  """
  rem = jnp.asarray(start, jnp.uint32) + jax.lax.iota(jnp.uint32, chunk.shape[0])
  index = []
  for n, off in zip(reversed(local_shape), reversed(offsets)):
    index.insert(0, rem % jnp.uint32(n) + off)
    rem = rem // jnp.uint32(n)
  words = _words(chunk)  # [c] or [c, 2] for 8-byte types
  sums = []
  for seed in _SEEDS:
    key = jnp.full(chunk.shape[:1], seed, jnp.uint32)
    for idx in index:
      key = _fmix32(key + idx * jnp.uint32(_STEP))
    if words.ndim == 2:
      key = _fmix32(key[:, None] + jax.lax.iota(jnp.uint32, 2)[None] * jnp.uint32(_STEP))
    sums.append(jnp.sum(_fmix32(words ^ key), dtype=jnp.uint32))
  return jnp.stack(sums)


def _local_lanes(x: jax.Array, spec: tuple, chunk: int) -> jax.Array:
  """Inside shard_map: this device's block ``x`` -> its ``[LANES]`` sums, ``chunk`` elements at
  a time (integer reductions are not fused with their producers on every backend, so the
  mixed words of a whole block would otherwise be materialised per lane)."""
  local_shape = tuple(x.shape)
  offsets = [jnp.uint32(0) if names is None else
             jax.lax.axis_index(names).astype(jnp.uint32) * jnp.uint32(n)
             for names, n in zip(spec, local_shape)]
  # Same-width unsigned view first (free): some backends widen bf16 to f32 for other ops.
  flat = _same_width_bits(x).reshape(-1)
  full, tail = divmod(flat.shape[0], chunk)

  def body(i, acc):
    start = i * chunk
    # The barrier keeps XLA from hoisting the widening of 2-byte words out of the loop
    # (which would materialise a uint32 copy of the whole block).
    part = jax.lax.optimization_barrier(jax.lax.dynamic_slice_in_dim(flat, start, chunk))
    return acc + _chunk_lanes(part, start, local_shape, offsets)

  acc = jnp.zeros((LANES,), jnp.uint32)
  if full:
    acc = jax.lax.fori_loop(0, full, body, acc)
  if tail:
    acc = acc + _chunk_lanes(flat[full * chunk:], full * chunk, local_shape, offsets)
  return acc


@functools.lru_cache(maxsize=None)
def _sharded_reducer(mesh: jax.sharding.Mesh, spec: tuple, ndim: int, chunk: int):
  spec = tuple(spec) + (None,) * (ndim - len(spec))
  sharded_axes = tuple(a for names in spec if names is not None
                       for a in ((names,) if isinstance(names, str) else names))

  def per_device(x):
    lanes = _local_lanes(x, spec, chunk)
    # Devices along unsharded mesh axes hold copies: sum over the sharding axes only.
    return jax.lax.psum(lanes, sharded_axes) if sharded_axes else lanes

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(*spec),), out_specs=P(),
                     check_vma=False)
  return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=None)
def _reducer(out_sharding: Any):
  return jax.jit(_lane_sums, out_shardings=out_sharding)


def _replicated_like(x: jax.Array) -> jax.sharding.Sharding:
  """A sharding that replicates a result on every device ``x`` lives on (all processes')."""
  devices = sorted(x.sharding.device_set, key=lambda d: d.id)
  mesh = jax.sharding.Mesh(np.array(devices), ('all',))
  return jax.sharding.NamedSharding(mesh, P())


def _reduce(leaf: jax.Array, chunk: int) -> jax.Array:
  """Picks the chunked per-device reduction when the leaf's layout is known as a mesh spec."""
  sharding = leaf.sharding
  if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
      sharding.mesh, jax.sharding.Mesh):
    return _sharded_reducer(sharding.mesh, tuple(sharding.spec), leaf.ndim, chunk)(leaf)
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    mesh = jax.sharding.Mesh(np.array(list(sharding.device_set)), ('all',))
    return _sharded_reducer(mesh, (), leaf.ndim, chunk)(leaf)
  return _reducer(_replicated_like(leaf))(leaf)


def leaf_lanes(leaf: Any, chunk: int = CHUNK) -> np.ndarray:
  """``[LANES]`` uint32 sums of one leaf, computed on its devices (host arrays go to device 0)."""
  if hasattr(leaf, 'unbox'):
    leaf = leaf.unbox()
  if not isinstance(leaf, jax.Array):
    host_dtype = np.asarray(leaf).dtype
    leaf = jnp.asarray(leaf)
    if leaf.dtype != host_dtype:  # e.g. float64 without jax_enable_x64: would hash a rounding
      raise TypeError(f'fingerprint: a host array of dtype {host_dtype} becomes {leaf.dtype} on '
                      'the device; cast it (or enable jax_enable_x64) before hashing')
  devices = leaf.sharding.device_set
  if not any(d.process_index == jax.process_index() for d in devices):
    raise ValueError(f'fingerprint: an array of shape {leaf.shape} lives only on devices of '
                     f'other processes ({sorted(d.id for d in devices)}); every process must '
                     'hold part of it to take part in the hash')
  out = _reduce(leaf, chunk)
  return np.asarray(out.addressable_data(0), np.uint32)


def fingerprint(frozen: Mapping, chunk: int = CHUNK) -> str:
  """sha256 hex of ``(path, dtype, shape, lane sums)`` of every leaf, in sorted path order.

  frozen: nested mapping of ``jax.Array`` (any sharding, any number of processes: every
  process must call this, as for any computation on a global array), numpy arrays or flax
  partitioning boxes. Same value on every host and for the same bits on any mesh; the
  dtype is part of it (a bf16 copy is a different backbone). chunk: elements per step of
  the on-device loop (bounds its temporaries; does not change the value).
  """
  h = hashlib.sha256(VERSION.encode())
  for name, leaf in sorted(flatten(dict(frozen)).items()):
    lanes = leaf_lanes(leaf, chunk)
    leaf = leaf.unbox() if hasattr(leaf, 'unbox') else leaf
    h.update(f'\n{name}|{jnp.dtype(leaf.dtype).name}|{list(leaf.shape)}|'.encode())
    h.update(lanes.astype('<u4').tobytes())
  return h.hexdigest()
