"""The backbone fingerprint: computed on device, the same on every mesh and process count.

The tree mixes fp32, bf16, int32 and a scalar; it is hashed unsharded on one device,
sharded over 8 devices (fsdp over 8, a 4x2 mesh, replicated) and, in a two-process
``jax.distributed`` run on 127.0.0.1, sharded ACROSS the processes so that each one holds
only half of every array. The lane sums are also recomputed here in numpy (uint64 arithmetic
reduced mod 2^32) from the documented formula.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adalink_jax.checkpoints import fingerprint as fp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tree():
  """Deterministic host arrays (re-created in the child processes)."""
  rng = np.random.default_rng(11)
  return {
      'decoder': {'kernel': rng.standard_normal((16, 24)).astype(np.float32)},
      'encoder': {'embedding': rng.standard_normal((32, 8)).astype(ml_dtypes.bfloat16),
                  'ids': rng.integers(-1000, 1000, (8, 4, 2)).astype(np.int32)},
      'scale': np.array(1.5, np.float32),
  }


SPECS = {  # leading axis sharded over whatever the mesh offers
    'decoder/kernel': ('x', 'y'), 'encoder/embedding': ('x', None),
    'encoder/ids': ('x', 'y', None), 'scale': (),
}


def _placed(tree, mesh, sharded=True):
  out = {}
  for name, spec in SPECS.items():
    stack, *leaf = name.split('/')
    value = tree[stack][leaf[0]] if leaf else tree[stack]
    sharding = NamedSharding(mesh, P(*spec) if sharded else P())
    arr = jax.device_put(value, sharding)
    if leaf:
      out.setdefault(stack, {})[leaf[0]] = arr
    else:
      out[stack] = arr
  return out


# ------------------------------------------------------------------ numpy restatement

M32 = (1 << 32) - 1


def _np_fmix(h):
  h = h ^ (h >> 16)
  h = (h * 0x85EBCA6B) & M32
  h = h ^ (h >> 13)
  h = (h * 0xC2B2AE35) & M32
  return h ^ (h >> 16)


def _np_lanes(a):
  a = np.asarray(a)
  words = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]).astype(np.uint64)
  out = []
  for seed in fp._SEEDS:  # pylint: disable=protected-access
    key = np.uint64(seed)
    for axis, n in enumerate(a.shape):
      idx = np.arange(n, dtype=np.uint64)
      key = _np_fmix((np.asarray(key)[..., None] + idx * fp._STEP) & M32)  # pylint: disable=protected-access
    out.append(int(np.sum(_np_fmix(words ^ key), dtype=np.uint64) & M32))
  return out


def test_lane_sums_equal_numpy_restatement():
  for name, value in [('f32', make_tree()['decoder']['kernel']),
                      ('bf16', make_tree()['encoder']['embedding']),
                      ('i32 3-d', make_tree()['encoder']['ids']),
                      ('scalar', make_tree()['scale'])]:
    want = _np_lanes(value)
    # The chunked per-device loop (one chunk, or chunks of 7 elements plus a tail) and the
    # definition on the global array all give the restated sums.
    assert fp.leaf_lanes(jnp.asarray(value)).tolist() == want, name
    assert fp.leaf_lanes(jnp.asarray(value), chunk=7).tolist() == want, name
    assert np.asarray(jax.jit(fp._lane_sums)(value)).tolist() == want, name  # pylint: disable=protected-access


def test_device_temporaries_are_bounded_by_the_chunk():
  # Compiled only, nothing allocated: a 256 MiB fp32 leaf on one device is reduced with
  # temporaries of a few chunks, where the plain reduction materialises 4 uint32 copies.
  one = Mesh(np.array(jax.devices()[:1]), ('x',))
  leaf = jax.ShapeDtypeStruct((16, 2048, 2048), jnp.float32, sharding=NamedSharding(one, P()))
  chunked = fp._sharded_reducer(one, (), 3, fp.CHUNK).lower(leaf).compile()  # pylint: disable=protected-access
  temp = chunked.memory_analysis().temp_size_in_bytes
  assert temp < 8 * fp.CHUNK * 4 < (256 << 20) / 4, temp


# ------------------------------------------------------------------ invariance and sensitivity


@pytest.fixture(scope='module')
def one_device_hash():
  tree = make_tree()
  one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('x', 'y'))
  return fp.fingerprint(_placed(tree, one))


def test_same_hash_on_every_mesh(one_device_hash):
  tree = make_tree()
  devs = np.array(jax.devices())
  assert len(devs) == 8
  meshes = {'fsdp8': Mesh(devs.reshape(8, 1), ('x', 'y')),
            '4x2': Mesh(devs.reshape(4, 2), ('x', 'y')),
            '2x4': Mesh(devs.reshape(2, 4), ('x', 'y'))}
  hashes = {k: fp.fingerprint(_placed(tree, m)) for k, m in meshes.items()}
  hashes['4x2, chunks of 5'] = fp.fingerprint(_placed(tree, meshes['4x2']), chunk=5)
  hashes['replicated'] = fp.fingerprint(_placed(tree, meshes['4x2'], sharded=False))
  hashes['host numpy'] = fp.fingerprint(tree)
  assert len(_placed(tree, meshes['fsdp8'])['decoder']['kernel'].addressable_shards) == 8
  assert set(hashes.values()) == {one_device_hash}, hashes
  assert len(one_device_hash) == 64 and int(one_device_hash, 16)


def test_hash_changes_with_content_order_and_dtype(one_device_hash):
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('x', 'y'))

  def variant(edit):
    tree = make_tree()
    edit(tree)
    return fp.fingerprint(_placed(tree, mesh))

  def one_element(t):
    t['decoder']['kernel'][5, 7] = np.nextafter(t['decoder']['kernel'][5, 7], np.float32(9))

  def swap(t):
    k = t['decoder']['kernel']
    k[0, 1], k[9, 20] = k[9, 20].copy(), k[0, 1].copy()
    assert k[0, 1] != k[9, 20]

  def transpose_ids(t):  # the same multiset of values, other positions within a row
    t['encoder']['ids'] = t['encoder']['ids'][:, :, ::-1].copy()

  def to_f32(t):  # the same values in another dtype
    t['encoder']['embedding'] = t['encoder']['embedding'].astype(np.float32)

  def scale(value):
    return lambda t: t.__setitem__('scale', np.array(value, np.float32))

  changed = {f.__name__: variant(f) for f in (one_element, swap, transpose_ids, to_f32)}
  changed['renamed leaf'] = fp.fingerprint(
      {'decoder2': _placed(make_tree(), mesh)['decoder'], **{
          k: v for k, v in _placed(make_tree(), mesh).items() if k != 'decoder'}})
  changed['0.0'], changed['-0.0'] = variant(scale(0.0)), variant(scale(-0.0))
  # Every edit changes the hash, and no two edits collide (0.0 and -0.0 differ in bits).
  assert one_device_hash not in changed.values(), changed
  assert len(set(changed.values())) == len(changed), changed


def test_unsupported_dtypes_are_refused():
  with pytest.raises(TypeError, match='complex64 is not supported'):
    fp.fingerprint({'w': jnp.zeros((2,), jnp.complex64)})
  with pytest.raises(TypeError, match='float64 becomes float32'):
    fp.fingerprint({'w': np.zeros((2,), np.float64)})


# ------------------------------------------------------------------ two processes

CHILD = r'''
import json, os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[3])
from tests import test_fingerprint as t
from adalink_jax.checkpoints import fingerprint as fp

assert jax.device_count() == 8 and jax.local_device_count() == 4
out = {}
for name, shape in (('fsdp8', (8, 1)), ('4x2', (4, 2))):
  mesh = Mesh(np.array(jax.devices()).reshape(shape), ('x', 'y'))
  tree = t.make_tree()
  placed = {}
  for leaf, spec in t.SPECS.items():
    stack, *rest = leaf.split('/')
    value = tree[stack][rest[0]] if rest else tree[stack]
    # Each process supplies only the shards on its own devices.
    arr = jax.make_array_from_callback(value.shape, NamedSharding(mesh, P(*spec)),
                                       lambda idx, v=value: v[idx])
    if rest:
      placed.setdefault(stack, {})[rest[0]] = arr
    else:
      placed[stack] = arr
  kernel = placed['decoder']['kernel']
  held = sum(s.data.size for s in kernel.addressable_shards)
  try:
    np.asarray(kernel)   # what a host-gathering hash would need
    gather = 'worked'
  except Exception as e:  # pylint: disable=broad-except
    gather = type(e).__name__
  out[name] = dict(hash=fp.fingerprint(placed), hash_chunk5=fp.fingerprint(placed, chunk=5),
                   held=held, total=kernel.size,
                   fully_addressable=kernel.is_fully_addressable, gather=gather)
print('RESULT ' + json.dumps(out), flush=True)
'''


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_each_holding_half_give_the_same_hash(one_device_hash):
  addr = f'127.0.0.1:{_free_port()}'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [subprocess.Popen([sys.executable, '-c', CHILD, addr, str(pid), ROOT], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240)[0])
    finally:
      if p.poll() is None:
        p.kill()
  results = []
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    results.append(json.loads(out.split('RESULT ', 1)[1].splitlines()[0]))
  for res in results:
    for mesh, r in res.items():
      assert not r['fully_addressable'] and r['held'] * 2 == r['total'], (mesh, r)
      assert r['gather'] != 'worked', (mesh, r)
      assert r['hash'] == r['hash_chunk5'] == one_device_hash, (mesh, r, one_device_hash)
