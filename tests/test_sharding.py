"""A T5 forward pass sharded over 8 fake CPU devices equals the unsharded one."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adalink_jax import partitioning
from adalink_jax.models import t5


def _model_and_batch(scan):
  # Sizes divisible by 2 on every sharded axis so the rules really shard.
  cfg = t5.T5Config(vocab_size=128, d_model=64, num_heads=4, d_kv=16, d_ff=128,
                    num_encoder_layers=2, num_decoder_layers=2, scan_layers=scan)
  model = t5.T5(cfg)
  rng = np.random.default_rng(0)
  enc = jnp.asarray(rng.integers(2, 128, (8, 12)), jnp.int32).at[:, 9:].set(0)
  dec = jnp.asarray(rng.integers(2, 128, (8, 6)), jnp.int32)
  return model, enc, dec


@pytest.mark.parametrize('scan', [False, True])
def test_sharded_forward_matches_unsharded(scan):
  assert jax.device_count() == 8
  model, enc, dec = _model_and_batch(scan)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), enc, dec)['params']
  params = nn.unbox(model.init(jax.random.PRNGKey(0), enc, dec)['params'])
  expected = jax.jit(model.apply)({'params': params}, enc, dec)

  mesh = partitioning.make_mesh(data=2, fsdp=2, model=2)
  shardings = partitioning.param_shardings(boxed, mesh)
  sharded_params = jax.device_put(params, shardings)
  # The rules really split weights: a query kernel [embed, joined_kv] is fsdp x model.
  q = (sharded_params['encoder']['layers']['attention']['query']['kernel'] if scan
       else sharded_params['encoder']['layers_0']['attention']['query']['kernel'])
  assert len(q.sharding.device_set) == 8
  assert q.addressable_shards[0].data.size == q.size // 4
  batch = partitioning.batch_sharding(mesh, 2)
  got = jax.jit(model.apply)({'params': sharded_params}, jax.device_put(enc, batch),
                             jax.device_put(dec, batch))
  # Sharded matmuls sum partial products in a different order: fp32 round-off only.
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_mesh_sizes_and_errors():
  mesh = partitioning.make_mesh(data=-1, fsdp=2, model=2)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'model': 2}
  with pytest.raises(ValueError, match='do not divide'):
    partitioning.make_mesh(data=-1, fsdp=3)
  with pytest.raises(ValueError, match='at most one'):
    partitioning.make_mesh(data=-1, fsdp=-1)


def test_logical_rules_table():
  spec = partitioning.logical_to_spec(('embed', 'mlp'))
  assert tuple(spec) == ('fsdp', 'model')
  assert tuple(partitioning.logical_to_spec(('layers', 'embed', 'joined_kv'))) == (None, 'fsdp', 'model')
