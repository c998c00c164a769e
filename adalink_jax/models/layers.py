"""Shared building blocks with t5x-style logical axis names on every parameter.

Every parameter is created through :func:`param`, which attaches logical axis
names (``embed``, ``mlp``, ``heads``, ``kv``, ``joined_kv``, ``vocab``, ...).
:mod:`adalink_jax.partitioning` maps those names to mesh axes with one table.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adalink_jax.models import intrusive
from adalink_jax.models.axes import default_kernel_init, param

Dtype = Any
Initializer = Callable[..., jax.Array]


class Dense(nn.Module):
  """A bias-free (by default) projection over the last axis.

  Shapes: ``x[..., in] -> y[..., features]``; kernel ``[in, features]`` with
  axes ``kernel_axes``. The kernel is kept 2-D, as t5x stores it, so checkpoints
  map one to one. ``hooks``: the intrusive hooks of this projection's site (e.g. LoRA), given
  as ``intrusive.at(table, site)``; empty: a plain projection.
  """
  features: int
  kernel_axes: tuple[str, str]
  use_bias: bool = False
  kernel_init: Initializer = default_kernel_init
  hooks: intrusive.Hooks = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = param(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                   self.param_dtype, self.kernel_axes)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = param(self, 'bias', nn.initializers.zeros, (self.features,), self.param_dtype,
                   self.kernel_axes[1:])
      y = y + bias.astype(self.dtype)
    return intrusive.run(self.hooks, y, x, axes=self.kernel_axes, dtype=self.dtype,
                         param_dtype=self.param_dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Any = None,
                          dtype: Dtype = jnp.float32,
                          dropout: Optional[Callable[[jax.Array], jax.Array]] = None
                          ) -> jax.Array:
  """``softmax(q . k + bias) . v``: ``q[b, q, h, d], k, v[b, k, h, d]`` -> ``[b, q, h, d]``.

  ``bias``: ``None`` or additive ``[b|1, h|1, q|1, k]`` (masks, relative positions). Logits and
  the softmax are fp32; the weights are cast to ``dtype`` for the second dot.

  Why it is written out: XLA:CPU runs the same dot FLOPs at very different rates depending on
  the operand order (T5-base shapes, 8 x 12 heads x 512 tokens: the key and value gradients
  autodiff derives, which contract over the query axis, 114 GFLOP/s, but 197 computed as
  ``[b, h, d, k]`` and transposed back; weights x values into ``[b, q, h, d]`` 169, but 276
  into ``[b, h, q, d]`` and then transposed). So the forward produces ``[b, h, q, d]`` and the
  backward (the formulas autodiff derives, tested against it) uses the faster orders: the
  T5-base AdaLink step went 6.9 -> 6.4 s. ``dropout``, applied to the weights, takes
  autodiff's own backward (its mask is drawn inside).
  """
  if dropout is not None:
    return jnp.einsum('bhqk,bkhd->bqhd', dropout(_probabilities(q, k, bias).astype(dtype)), v)
  if bias is not None:  # fp32 and rank 4, so the backward knows its dtype and broadcast axes
    bias = jnp.asarray(bias, jnp.float32)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  return _attention(dtype, None if bias is None else tuple(bias.shape), q, k, v, bias)


def _heads_second(x: jax.Array) -> jax.Array:
  """``[b, h, q, d] -> [b, q, h, d]``."""
  return jnp.transpose(x, (0, 2, 1, 3))


def _probabilities(q: jax.Array, k: jax.Array, bias: Any) -> jax.Array:
  """fp32 ``softmax(q . k + bias)``: ``[b, h, q, k]``."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


def _attention_forward(dtype, q, k, v, bias):
  probs = _probabilities(q, k, bias)
  return _heads_second(jnp.einsum('bhqk,bkhd->bhqd', probs.astype(dtype), v)), probs


# The bias's shape is static: the backward needs only which axes it broadcasts over, and
# keeping the bias itself as a residual would stack a [b, h, q, k] copy per scanned layer.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(dtype, bias_shape, q, k, v, bias):
  return _attention_forward(dtype, q, k, v, bias)[0]


def _attention_fwd(dtype, bias_shape, q, k, v, bias):
  out, probs = _attention_forward(dtype, q, k, v, bias)
  return out, (q, k, v, probs)


def _attention_bwd(dtype, bias_shape, residuals, d_out):
  q, k, v, probs = residuals
  weights = probs.astype(dtype)
  d_weights = jnp.einsum('bqhd,bkhd->bhqk', d_out, v).astype(jnp.float32)
  # softmax's backward (jax.nn.softmax's own rule): p * (g - sum(p * g)).
  d_logits = probs * (d_weights - jnp.sum(d_weights * probs, axis=-1, keepdims=True))
  d_bias = None
  if bias_shape is not None:
    summed = tuple(i for i, n in enumerate(bias_shape) if n == 1 and d_logits.shape[i] != 1)
    d_bias = jnp.sum(d_logits, axis=summed, keepdims=True)
  d_logits = d_logits.astype(q.dtype)
  d_q = _heads_second(jnp.einsum('bhqk,bkhd->bhqd', d_logits, k))
  d_k = jnp.einsum('bqhd,bhqk->bhdk', q, d_logits).transpose(0, 3, 1, 2)
  d_v = jnp.einsum('bqhd,bhqk->bhdk', d_out, weights).transpose(0, 3, 1, 2)
  return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias


_attention.defvjp(_attention_fwd, _attention_bwd)


class Embed(nn.Module):
  """Token embedding table ``[vocab, embed]`` that can also produce logits (``attend``)."""
  num_embeddings: int
  features: int
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = param(self, 'embedding', self.embedding_init,
                           (self.num_embeddings, self.features), self.param_dtype,
                           ('vocab', 'embed'))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """``tokens[b, l]`` int -> ``[b, l, embed]``."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f'token ids must be integers, got {tokens.dtype}')
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """``x[..., embed]`` -> logits ``[..., vocab]`` against the same table."""
    return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, statistics in fp32."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = param(self, 'scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype,
                  ('embed',))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
  """Standard layer norm (mean and variance, scale and bias), as in ViT."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = param(self, 'scale', nn.initializers.ones, (d,), self.param_dtype, ('embed',))
    bias = param(self, 'bias', nn.initializers.zeros, (d,), self.param_dtype, ('embed',))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'linear': lambda x: x,
    'identity': lambda x: x,
    'relu': nn.relu,
    # T5 v1.1 / FLAN-T5 use the tanh approximation ("gelu_new" in HF).
    'gelu': lambda x: nn.gelu(x, approximate=True),
    'gelu_exact': lambda x: nn.gelu(x, approximate=False),
    'silu': nn.silu,
    'tanh': jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Looks an activation up by name, with a clear error listing the choices."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f'unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}') from None


class MlpBlock(nn.Module):
  """T5 feed-forward: ``wo(prod_i act_i(wi_i x))``; one activation -> ``wi``, several -> gated."""
  intermediate_dim: int
  activations: tuple[str, ...] = ('relu',)
  dropout_rate: float = 0.0
  # Intrusive hooks (the whole table): sites 'wi' (every input projection of a gated MLP),
  # 'mlp_hidden' (the input of wo) and 'wo'.
  hooks: intrusive.Hooks = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """``x[b, l, embed] -> [b, l, embed]``."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = None
    for i, act in enumerate(self.activations):
      name = 'wi' if len(self.activations) == 1 else f'wi_{i}'
      hi = activation(act)(Dense(self.intermediate_dim, ('embed', 'mlp'), name=name,
                                 hooks=intrusive.at(self.hooks, 'wi'), **kw)(x))
      h = hi if h is None else h * hi
    h = intrusive.apply(self.hooks, 'mlp_hidden', h, axes=('mlp',), **kw)
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
    return Dense(x.shape[-1], ('mlp', 'embed'), name='wo', hooks=intrusive.at(self.hooks, 'wo'),
                 **kw)(h)
