"""Shared building blocks with t5x-style logical axis names on every parameter.

Every parameter is created through :func:`param`, which attaches logical axis
names (``embed``, ``mlp``, ``heads``, ``kv``, ``joined_kv``, ``vocab``, ...).
:mod:`adalink_jax.partitioning` maps those names to mesh axes with one table.
"""
from __future__ import annotations

from typing import Any, Callable

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
