"""T5X checkpoints (legacy msgpack + TensorStore, and Orbax) restored into adalink_jax's T5.

The fixtures are written here in T5X's on-disk formats without t5x itself (it is not
installable): the legacy layout exactly as ``t5x/checkpoints.py``'s ``Checkpointer``
writes it (flax msgpack ``{'version': 3, 'optimizer': {'target', 'state'}}`` with a
TensorStore spec per array and zarr arrays in ``target.encoder....`` subdirectories),
the Orbax layout with Orbax itself (``checkpoint_<step>/state``, as T5X's
``OrbaxCheckpointManagerInterface`` saves), and the scanned layouts of flaxformer /
t5x ``scalable_t5`` (layers stacked on axis 1). Every load is checked against the
logits of the very same weights set directly.
"""
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

from adalink_jax.checkpoints.common import CheckpointMismatchError, flatten, unflatten
from adalink_jax.checkpoints.t5x import load_t5x_params
from adalink_jax.models import t5
from adalink_jax.peft import lora
from adalink_jax import partitioning

ENC = np.array([[5, 17, 33, 2, 99, 1, 0, 0], [8, 9, 200, 41, 7, 63, 12, 1]], np.int32)
DEC = np.array([[0, 4, 8, 15, 16, 23], [0, 42, 11, 3, 250, 1]], np.int32)


def _model(**overrides):
  return t5.T5(t5.t5_config('t5_1_1_tiny', **overrides))


def _abstract(model):
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), ENC, DEC)['params']
  return boxed, nn.unbox(boxed)


_APPLY = {}  # one compiled forward per config: compiling dominates this file's run time


def _logits(model, params):
  if model.config not in _APPLY:
    _APPLY[model.config] = jax.jit(model.apply)
  return np.asarray(_APPLY[model.config]({'params': params}, ENC, DEC))


@pytest.fixture(scope='module')
def reference():
  """Random tiny T5 1.1 weights (t5x names) and their logits."""
  model = _model()
  params = nn.unbox(model.init(jax.random.PRNGKey(7), ENC, DEC)['params'])
  flat = {k: np.array(v) for k, v in flatten(params).items()}
  # Larger relative-position biases so a wrong bias would change the logits visibly.
  for stack in ('encoder', 'decoder'):
    flat[f'{stack}/relpos_bias/rel_embedding'] *= 50.0
  params = jax.tree_util.tree_map(jnp.asarray, unflatten(flat))
  return flat, _logits(model, params)


# ------------------------------------------------------------------ T5X's formats, written here


def _chunks(shape, max_elements):
  """Chunk shape dividing ``shape`` with <= max_elements entries (t5x shrinks the largest dim)."""
  chunks = list(shape)
  while int(np.prod(chunks)) > max_elements:
    i = int(np.argmax(chunks))
    chunks[i] = max(d for d in range(1, chunks[i]) if shape[i] % d == 0)
  return chunks


def _set(tree, name, value):
  *parents, leaf = name.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def write_legacy_t5x(root, step, target, *, inline=(), max_chunk_elements=96,
                     compressor='gzip'):
  """A legacy T5X checkpoint: msgpack with TensorStore specs + zarr arrays + Adafactor state."""
  ckpt = os.path.join(root, f'checkpoint_{step}')
  os.makedirs(ckpt)
  state = {f'target/{k}': v for k, v in target.items()}
  # Adafactor's factored second moments (partitioned -> TensorStore) and small slots.
  for k, v in target.items():
    if v.ndim == 2:
      state[f'state/param_states/{k}/v_row'] = np.full(v.shape[0], 0.5, np.float32)
      state[f'state/param_states/{k}/v_col'] = np.full(v.shape[1], 0.25, np.float32)
      state[f'state/param_states/{k}/v'] = np.zeros((1,), np.float32)
  tree = {}
  for name, arr in state.items():
    if name in inline or name.endswith('/v'):
      _set(tree, name, np.asarray(arr))
      continue
    rel = name.replace('/', '.')
    spec = {'driver': 'zarr', 'dtype': jnp.dtype(arr.dtype).name,
            'kvstore': {'driver': 'file', 'path': rel},
            'metadata': {'compressor': {'id': compressor}, 'shape': list(arr.shape),
                         'chunks': _chunks(arr.shape, max_chunk_elements)}}
    on_disk = dict(spec, kvstore={'driver': 'file', 'path': os.path.join(ckpt, rel)})
    ts.open(on_disk, create=True, open=True).result().write(arr).result()
    _set(tree, name, ts.Spec(spec).to_json())  # what t5x puts in the msgpack
  _set(tree, 'state/step', np.int32(step))
  with open(os.path.join(ckpt, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize({'version': 3, 'optimizer': tree}))
  return ckpt


def to_scanned(flat, stack_dir, *, axis=1, relpos='relpos_bias', num_layers=2):
  """Unscanned t5x names -> a scanned layout: layers stacked on ``axis`` under ``stack_dir``."""
  out = {}
  for name, value in flat.items():
    parts = name.split('/')
    if parts[1].startswith('layers_'):
      continue
    if parts[1] == 'relpos_bias' and relpos is not None:
      # flaxformer / scalable_t5 scanned models have one bias per layer.
      out[f'{parts[0]}/{stack_dir(parts[0])}/{relpos}/rel_embedding'] = np.stack(
          [value] * num_layers, axis=axis)
      continue
    out[name] = value
  rests = {n.split('/', 2)[0] + '|' + n.split('/', 2)[2] for n in flat if '/layers_' in n}
  for key in rests:
    stack, rest = key.split('|')
    out[f'{stack}/{stack_dir(stack)}/{rest}'] = np.stack(
        [flat[f'{stack}/layers_{i}/{rest}'] for i in range(num_layers)], axis=axis)
  return out


# ------------------------------------------------------------------ tests


def test_legacy_unscanned_restores_exact_logits(reference, tmp_path):
  flat, ref_logits = reference
  write_legacy_t5x(tmp_path, 1000, flat)
  model = _model()
  _, expected = _abstract(model)
  params = load_t5x_params(tmp_path, expected)   # model dir -> latest step
  for name, value in flatten(params).items():
    np.testing.assert_array_equal(np.asarray(value), flat[name], err_msg=name)
  np.testing.assert_array_equal(_logits(model, params), ref_logits)


def test_optimizer_state_is_never_read(reference, tmp_path):
  flat, ref_logits = reference
  ckpt = write_legacy_t5x(tmp_path, 5, flat)
  removed = [e for e in os.listdir(ckpt) if e.startswith('state.')]
  assert len(removed) == 2 * sum(v.ndim == 2 for v in flat.values())
  for e in removed:
    shutil.rmtree(os.path.join(ckpt, e))
  model = _model()
  params = load_t5x_params(os.path.join(ckpt, 'checkpoint'), _abstract(model)[1])
  np.testing.assert_array_equal(_logits(model, params), ref_logits)


@pytest.mark.parametrize('stack_dir,relpos', [
    (lambda s: s, 'relpos_bias'),            # flaxformer / current scalable_t5: encoder/encoder
    (lambda s: 'layers', 'relative_posemb'),  # older scalable_t5: encoder/layers
], ids=['flaxformer', 'scalable_t5_v0'])
@pytest.mark.parametrize('scan_layers', [False, True], ids=['ours_unscanned', 'ours_scanned'])
def test_scanned_t5x_layouts(reference, tmp_path, stack_dir, relpos, scan_layers):
  flat, ref_logits = reference
  scanned = to_scanned(flat, stack_dir, relpos=relpos)
  assert scanned['encoder/' + stack_dir('encoder') + '/attention/query/kernel'].shape == (32, 2, 32)
  assert scanned['encoder/' + stack_dir('encoder') + '/pre_mlp_layer_norm/scale'].shape == (32, 2)
  write_legacy_t5x(tmp_path, 1, scanned)
  model = _model(scan_layers=scan_layers)
  params = load_t5x_params(tmp_path, _abstract(model)[1])
  if scan_layers:
    q = np.asarray(params['encoder']['layers']['attention']['query']['kernel'])
    np.testing.assert_array_equal(q[1], flat['encoder/layers_1/attention/query/kernel'])
  else:
    np.testing.assert_array_equal(
        np.asarray(params['decoder']['layers_1']['mlp']['wi_0']['kernel']),
        flat['decoder/layers_1/mlp/wi_0/kernel'])
  np.testing.assert_allclose(_logits(model, params), ref_logits, rtol=0, atol=2e-5)


def test_unscanned_checkpoint_into_scanned_model(reference, tmp_path):
  flat, ref_logits = reference
  write_legacy_t5x(tmp_path, 3, flat)
  model = _model(scan_layers=True)
  params = load_t5x_params(tmp_path, _abstract(model)[1])
  assert params['decoder']['layers']['self_attention']['out']['kernel'].shape == (2, 32, 32)
  np.testing.assert_allclose(_logits(model, params), ref_logits, rtol=0, atol=2e-5)


def test_scan_axis_zero_with_shared_relpos(reference, tmp_path):
  flat, ref_logits = reference
  write_legacy_t5x(tmp_path, 3, to_scanned(flat, lambda s: 'layers', axis=0, relpos=None))
  model = _model()
  params = load_t5x_params(tmp_path, _abstract(model)[1], scan_axis=0)
  np.testing.assert_array_equal(_logits(model, params), ref_logits)


def test_per_layer_relpos_that_differ_is_refused(reference, tmp_path):
  flat, _ = reference
  scanned = to_scanned(flat, lambda s: s)
  scanned['encoder/encoder/relpos_bias/rel_embedding'][:, 1] += 0.5  # layer 1 differs
  write_legacy_t5x(tmp_path, 1, scanned)
  with pytest.raises(CheckpointMismatchError) as err:
    load_t5x_params(tmp_path, _abstract(_model())[1])
  assert err.value.missing == ['encoder/relpos_bias/rel_embedding']
  assert 'target/encoder/encoder/relpos_bias/rel_embedding' in err.value.unexpected
  assert '2 different per-layer relative position biases' in str(err.value)
  assert 'max |difference| 0.5' in str(err.value)


@pytest.mark.parametrize('use_ocdbt', [False, True], ids=['t5x_orbax', 'orbax_ocdbt'])
def test_orbax_t5x_layout(reference, tmp_path, use_ocdbt):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  flat, ref_logits = reference
  state = {'target': unflatten({k: jnp.asarray(v) for k, v in flat.items()}),
           'state': {'step': jnp.int32(20),
                     'param_states': {'token_embedder': {'embedding': {
                         'v_row': jnp.ones(256), 'v_col': jnp.ones(32)}}}}}
  # What T5X's OrbaxCheckpointManagerInterface sets up: step dirs 'checkpoint_<step>',
  # one PyTree item 'state'.
  manager = ocp.CheckpointManager(
      str(tmp_path), item_handlers={'state': ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)},
      options=ocp.CheckpointManagerOptions(step_prefix='checkpoint', create=True))
  manager.save(20, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
  manager.wait_until_finished()
  manager.close()
  state_dir = tmp_path / 'checkpoint_20' / 'state'
  assert state_dir.is_dir()
  if not use_ocdbt:
    assert (state_dir / 'target.encoder.layers_0.attention.query.kernel' / '.zarray').is_file()
  model = _model(scan_layers=True)
  params = load_t5x_params(tmp_path, _abstract(model)[1], step=20)
  np.testing.assert_allclose(_logits(model, params), ref_logits, rtol=0, atol=2e-5)


def test_sharded_bf16_restore(reference, tmp_path):
  flat, _ = reference
  write_legacy_t5x(tmp_path, 1, flat)
  model = _model()
  boxed, expected = _abstract(model)
  mesh = partitioning.make_mesh(data=1, fsdp=2, model=4)
  shardings = partitioning.param_shardings(boxed, mesh)
  params = load_t5x_params(tmp_path, expected, shardings=shardings, dtype=jnp.bfloat16)
  flat_shard = flatten(shardings)
  for name, value in flatten(params).items():
    assert value.dtype == jnp.bfloat16, name
    assert value.sharding.is_equivalent_to(flat_shard[name], value.ndim), name
    np.testing.assert_array_equal(np.asarray(value.astype(jnp.float32)),
                                  flat[name].astype(jnp.bfloat16).astype(np.float32), name)
  emb = params['token_embedder']['embedding']   # [vocab=256, embed=32] over (model, fsdp)
  assert {s.data.shape for s in emb.addressable_shards} == {(64, 16)}
  assert len(emb.addressable_shards) == 8


def test_bf16_stored_checkpoint_into_fp32_model(reference, tmp_path):
  flat, _ = reference
  stored = {k: v.astype(jnp.bfloat16) for k, v in flat.items()}
  write_legacy_t5x(tmp_path, 1, stored)
  params = load_t5x_params(tmp_path, _abstract(_model())[1])
  q = params['encoder']['layers_0']['attention']['query']['kernel']
  assert q.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(q), stored['encoder/layers_0/attention/query/kernel']
                                .astype(np.float32))


def test_skip_leaves_adapter_params_alone(reference, tmp_path):
  flat, _ = reference
  write_legacy_t5x(tmp_path, 1, flat)
  model = _model(hooks=lora.hooks(rank=2))
  _, expected = _abstract(model)
  params = load_t5x_params(tmp_path, expected, skip=lambda n: '/lora/' in n)
  lora_a = params['encoder']['layers_0']['attention']['query']['lora']['lora_a']
  assert isinstance(lora_a, jax.ShapeDtypeStruct)   # left as given
  np.testing.assert_array_equal(
      np.asarray(params['encoder']['layers_0']['attention']['query']['kernel']),
      flat['encoder/layers_0/attention/query/kernel'])
  with pytest.raises(CheckpointMismatchError) as err:   # without skip: named as missing
    load_t5x_params(tmp_path, expected)
  assert 'encoder/layers_0/attention/query/lora/lora_a' in err.value.missing


def test_mismatch_lists_every_name(reference, tmp_path):
  flat, _ = reference
  write_legacy_t5x(tmp_path, 1, flat)
  model = _model(num_encoder_layers=1, d_ff=48)
  with pytest.raises(CheckpointMismatchError) as err:
    load_t5x_params(tmp_path, _abstract(model)[1])
  e = err.value
  assert e.missing == []
  assert 'target/encoder/layers_1/attention/query/kernel' in e.unexpected
  assert len(e.unexpected) == sum(n.startswith('encoder/layers_1/') for n in flat)
  assert ('encoder/layers_0/mlp/wi_0/kernel', (32, 48), (32, 64)) in e.mismatched
  assert ('decoder/layers_1/mlp/wo/kernel', (48, 32), (64, 32)) in e.mismatched
  assert len(e.mismatched) == 3 * 3   # wi_0, wi_1, wo in 1 encoder + 2 decoder layers
  model3 = _model(num_encoder_layers=3)
  with pytest.raises(CheckpointMismatchError) as err:
    load_t5x_params(tmp_path, _abstract(model3)[1])
  assert 'encoder/layers_2/pre_mlp_layer_norm/scale' in err.value.missing


def test_missing_paths_are_named(reference, tmp_path):
  flat, _ = reference
  with pytest.raises(FileNotFoundError, match='does_not_exist'):
    load_t5x_params(tmp_path / 'does_not_exist', {})
  with pytest.raises(FileNotFoundError, match=r'checkpoint_<step>'):
    load_t5x_params(tmp_path, {})
  ckpt = write_legacy_t5x(tmp_path, 7, flat)
  with pytest.raises(FileNotFoundError, match=r'(?s)step 8.*\[7\]'):
    load_t5x_params(tmp_path, {}, step=8)
  shutil.rmtree(os.path.join(ckpt, 'target.decoder.layers_1.mlp.wo.kernel'))
  with pytest.raises(FileNotFoundError, match='target/decoder/layers_1/mlp/wo/kernel'):
    load_t5x_params(tmp_path, _abstract(_model())[1])
