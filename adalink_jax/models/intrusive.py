"""The only place where methods reach *inside* transformer blocks: LoRA and bottleneck adapters.

AdaLink and prompt tuning act at the embedding seam and never touch the blocks;
the intrusive baselines the paper compares against need hooks in attention and
MLP projections. They are configured here and referenced from
:class:`~adalink_jax.models.layers.Dense` (LoRA) and the T5 blocks (adapters).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adalink_jax.models.axes import param

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA on selected projections: ``W x + (alpha / rank) * B A x`` with B zero-initialised."""
  rank: int = 8
  alpha: float = 16.0
  # Projections that get LoRA: any of query, key, value, out (attention) and wi, wo (MLP).
  targets: tuple[str, ...] = ('query', 'key', 'value', 'out')


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
  """Houlsby / VL-Adapter bottleneck after attention and/or MLP: ``h + up(act(down(h)))``."""
  dim: int = 64
  activation: str = 'relu'
  where: tuple[str, ...] = ('attention', 'mlp')


class LoRABranch(nn.Module):
  """``x[..., in] -> [..., features]`` low-rank update; zero at initialisation."""
  config: LoRAConfig
  features: int
  kernel_axes: tuple[str, str]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    r = self.config.rank
    a = param(self, 'lora_a', nn.initializers.he_uniform(), (x.shape[-1], r),
              self.param_dtype, (self.kernel_axes[0], 'rank'))
    b = param(self, 'lora_b', nn.initializers.zeros, (r, self.features), self.param_dtype,
              ('rank', self.kernel_axes[1]))
    h = jnp.dot(x.astype(self.dtype), a.astype(self.dtype))
    return jnp.dot(h, b.astype(self.dtype)) * (self.config.alpha / r)


class Bottleneck(nn.Module):
  """``h[..., embed] -> h + up(act(down(h)))``; ``up`` zero-initialised so it starts as identity."""
  config: BottleneckConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    d, r = h.shape[-1], self.config.dim
    down = param(self, 'down_kernel', nn.initializers.lecun_normal(), (d, r), self.param_dtype,
                 ('embed', 'rank'))
    down_b = param(self, 'down_bias', nn.initializers.zeros, (r,), self.param_dtype, ('rank',))
    up = param(self, 'up_kernel', nn.initializers.zeros, (r, d), self.param_dtype,
               ('rank', 'embed'))
    up_b = param(self, 'up_bias', nn.initializers.zeros, (d,), self.param_dtype, ('embed',))
    act = _ACTS[self.config.activation]
    z = act(jnp.dot(h.astype(self.dtype), down.astype(self.dtype)) + down_b.astype(self.dtype))
    return h + jnp.dot(z, up.astype(self.dtype)) + up_b.astype(self.dtype)


_ACTS = {'relu': nn.relu, 'gelu': nn.gelu, 'silu': nn.silu, 'identity': lambda x: x}
