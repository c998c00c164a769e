"""Bottleneck adapters (Houlsby et al., 2019; VL-Adapter): ``h + up(act(down(h)))`` after the
self-attention and/or MLP sub-block, before the residual add; ``up`` zero-init (identity at start).

``peft.method='adapter'``. Intrusive hooks at sites ``attention_out`` / ``mlp_out``; params
``.../<where>_adapter/{down_kernel, down_bias, up_kernel, up_bias}`` (where: attention, mlp).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adalink_jax.models import intrusive
from adalink_jax.models.axes import param
from adalink_jax.peft import registry

Dtype = Any
ACTIVATIONS = {'relu': nn.relu, 'gelu': nn.gelu, 'silu': nn.silu, 'identity': lambda x: x}
WHERE = ('attention', 'mlp')  # -> sites attention_out, mlp_out


class Bottleneck(nn.Module):
  """``h[..., embed] -> h + up(act(down(h)))``; ``up`` zero-initialised so it starts as identity."""
  dim: int
  activation: str = 'relu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    d, r = h.shape[-1], self.dim
    down = param(self, 'down_kernel', nn.initializers.lecun_normal(), (d, r), self.param_dtype,
                 ('embed', 'rank'))
    down_b = param(self, 'down_bias', nn.initializers.zeros, (r,), self.param_dtype, ('rank',))
    up = param(self, 'up_kernel', nn.initializers.zeros, (r, d), self.param_dtype,
               ('rank', 'embed'))
    up_b = param(self, 'up_bias', nn.initializers.zeros, (d,), self.param_dtype, ('embed',))
    act = ACTIVATIONS[self.activation]
    z = act(jnp.dot(h.astype(self.dtype), down.astype(self.dtype)) + down_b.astype(self.dtype))
    return h + jnp.dot(z, up.astype(self.dtype)) + up_b.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class BottleneckHook(intrusive.Hook):
  """The hook at ``attention_out`` / ``mlp_out``: a :class:`Bottleneck` ``<where>_adapter``."""
  dim: int = 64
  activation: str = 'relu'

  def __call__(self, site: intrusive.Site, y: jax.Array, x: Optional[jax.Array] = None):
    del x
    where = site.name[:-len('_out')]
    if where not in WHERE or not site.name.endswith('_out'):
      raise ValueError(f'bottleneck adapters go on sites attention_out / mlp_out, not '
                       f'{site.name!r}')
    return Bottleneck(self.dim, self.activation, dtype=site.dtype, param_dtype=site.param_dtype,
                      name=f'{where}_adapter')(y)


def hooks(dim: int = 64, activation: str = 'relu',
          where: Sequence[str] = WHERE) -> intrusive.Hooks:
  """The hook table: one :class:`BottleneckHook` after each sub-block in ``where``."""
  spec = BottleneckHook(int(dim), activation)
  return tuple((f'{w}_out', spec) for w in where)


def _validate(cfg, bad) -> None:
  if cfg.adapter_dim < 1:
    bad('adapter_dim', 'must be >= 1')
  if not set(cfg.adapter_where) <= set(WHERE) or not cfg.adapter_where:
    bad('adapter_where', f'choose a non-empty subset of {WHERE}')
  if cfg.adapter_activation not in ACTIVATIONS:
    bad('adapter_activation', f'choose from {sorted(ACTIVATIONS)}')


_NAMES = tuple(f'{w}_adapter' for w in WHERE)


def _group(parts: Sequence[str]) -> Optional[str]:
  return next((f'bottleneck/{p}' for p in parts if p in _NAMES), None)


METHOD = registry.Method(
    name='adapter',
    summary='bottleneck adapters after the attention / MLP sub-blocks',
    fields=(('adapter_dim', 64), ('adapter_activation', 'relu'), ('adapter_where', WHERE)),
    validate=_validate,
    hooks=lambda cfg: hooks(cfg.adapter_dim, cfg.adapter_activation, cfg.adapter_where),
    adds=tuple(f'/{n}/' for n in _NAMES),
    group=_group,
    size_field='adapter_dim',
)
