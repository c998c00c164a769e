"""layers.dot_product_attention: its written-out backward against autodiff of the same forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adalink_jax.models import layers

B, Q, K, H, D = 2, 5, 7, 3, 4


def _reference(q, k, v, bias, dtype):
  """The formula T5 and ViT used before, differentiated by JAX."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def _inputs(dtype, bias_shape):
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  q, k, v = (jax.random.normal(ks[i], s, jnp.float32).astype(dtype)
             for i, s in enumerate([(B, Q, H, D), (B, K, H, D), (B, K, H, D)]))
  bias = None
  if bias_shape is not None:
    bias = jax.random.normal(ks[3], bias_shape, jnp.float32)
    # a padding mask, as T5 adds it: masked keys get -1e10
    bias = bias + jnp.where(jnp.arange(K) < K - 2, 0.0, -1e10)
  g = jax.random.normal(ks[4], (B, Q, H, D), jnp.float32).astype(dtype)
  return q, k, v, bias, g


@pytest.mark.parametrize('bias_shape', [None, (1, H, Q, K), (B, 1, 1, K), (B, H, Q, K), (Q, K)])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_values_and_gradients_match_autodiff(bias_shape, dtype, tol):
  q, k, v, bias, g = _inputs(dtype, bias_shape)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)

  def loss(fn):
    return lambda *a: jnp.sum((fn(*a, dtype) * g).astype(jnp.float32))

  out = jax.jit(layers.dot_product_attention, static_argnums=4)(q, k, v, bias, dtype)
  ref = _reference(q, k, v, bias, dtype)
  assert out.dtype == ref.dtype and out.shape == (B, Q, H, D)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)
  ours = jax.jit(jax.grad(loss(layers.dot_product_attention), argnums))(q, k, v, bias)
  theirs = jax.jit(jax.grad(loss(_reference), argnums))(q, k, v, bias)
  for name, a, b in zip('qkvb', ours, theirs):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
    assert scale > 0, name  # the check has something to compare
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=0, atol=tol * scale, err_msg=name)


def test_masked_keys_get_no_gradient_and_no_weight():
  q, k, v, bias, g = _inputs(jnp.float32, (1, H, Q, K))
  d_k, d_v = jax.grad(lambda k, v: jnp.sum(layers.dot_product_attention(q, k, v, bias) * g),
                      (0, 1))(k, v)
  assert np.all(np.asarray(d_k[:, K - 2:]) == 0) and np.all(np.asarray(d_v[:, K - 2:]) == 0)
  assert np.all(np.abs(np.asarray(d_v[:, :K - 2])) > 0)



def test_dropout_acts_on_the_weights():
  """With ``dropout`` the weights are dropped (and rescaled) before they meet the values: the
  same output and gradients as the formula with flax's Dropout, drawing the same mask."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Ours(nn.Module):
    @nn.compact
    def __call__(self, q, k, v, bias):
      drop = lambda w: nn.Dropout(0.5)(w, deterministic=False)
      return layers.dot_product_attention(q, k, v, bias, jnp.float32, drop)

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, q, k, v, bias):
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) + bias
      weights = nn.Dropout(0.5)(jax.nn.softmax(logits, -1), deterministic=False)
      return jnp.einsum('bhqk,bkhd->bqhd', weights, v)

  q, k, v, bias, g = _inputs(jnp.float32, (1, H, Q, K))
  rngs = {'dropout': jax.random.PRNGKey(3)}
  run = lambda m: jax.value_and_grad(
      lambda q: jnp.sum(m.apply({}, q, k, v, bias, rngs=rngs) * g))(q)
  (ours, d_ours), (ref, d_ref) = run(Ours()), run(Reference())
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  np.testing.assert_allclose(d_ours, d_ref, rtol=1e-5, atol=1e-6)
  plain = jnp.sum(layers.dot_product_attention(q, k, v, bias) * g)
  assert abs(float(ours - plain)) > 1e-2  # the mask did change the output
