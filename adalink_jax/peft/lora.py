"""LoRA (Hu et al., 2021) on selected projections: ``W x + (alpha / rank) * B A x``, B zero-init.

An intrusive hook (:mod:`adalink_jax.models.intrusive`) at each projection site in
``peft.lora_targets``; params ``.../<projection>/lora/{lora_a [in, r], lora_b [r, out]}``.
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
TARGETS = intrusive.PROJECTIONS  # 'query', 'key', 'value', 'out', 'wi', 'wo'


class LoRABranch(nn.Module):
  """``x[..., in] -> [..., features]`` low-rank update; zero at initialisation."""
  rank: int
  alpha: float
  features: int
  kernel_axes: tuple[str, str]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    r = self.rank
    a = param(self, 'lora_a', nn.initializers.he_uniform(), (x.shape[-1], r),
              self.param_dtype, (self.kernel_axes[0], 'rank'))
    b = param(self, 'lora_b', nn.initializers.zeros, (r, self.features), self.param_dtype,
              ('rank', self.kernel_axes[1]))
    h = jnp.dot(x.astype(self.dtype), a.astype(self.dtype))
    return jnp.dot(h, b.astype(self.dtype)) * (self.alpha / r)


@dataclasses.dataclass(frozen=True)
class LoRA(intrusive.Hook):
  """The hook at a projection site: adds the low-rank branch of the projection's input."""
  rank: int = 8
  alpha: float = 16.0

  def __call__(self, site: intrusive.Site, y: jax.Array, x: Optional[jax.Array] = None):
    if x is None or site.name not in TARGETS:
      raise ValueError(f'LoRA hooks go on projections {TARGETS}, not on site {site.name!r}')
    return y + LoRABranch(self.rank, self.alpha, y.shape[-1], site.axes, dtype=site.dtype,
                          param_dtype=site.param_dtype, name='lora')(x)


def hooks(rank: int = 8, alpha: float = 16.0,
          targets: Sequence[str] = ('query', 'key', 'value', 'out')) -> intrusive.Hooks:
  """The hook table: one :class:`LoRA` at each target projection."""
  spec = LoRA(int(rank), float(alpha))
  return tuple((t, spec) for t in targets)


def _validate(cfg, bad) -> None:
  if not isinstance(cfg.rank, int) or cfg.rank < 1:
    bad('rank', 'LoRA needs one integer rank >= 1')
  unknown = [t for t in cfg.lora_targets if t not in TARGETS]
  if unknown or not cfg.lora_targets:
    bad('lora_targets', f'choose a non-empty subset of {TARGETS}')


def _group(parts: Sequence[str]) -> Optional[str]:
  for i, p in enumerate(parts):
    if p == 'lora' and i > 0:
      return f'lora/{parts[i - 1]}'  # e.g. lora/query
  return None


METHOD = registry.Method(
    name='lora',
    summary='LoRA: low-rank updates of attention / MLP projections',
    fields=(('lora_alpha', 16.0), ('lora_targets', ('query', 'key', 'value', 'out'))),
    validate=_validate,
    hooks=lambda cfg: hooks(cfg.rank, cfg.lora_alpha, cfg.lora_targets),
    adds=('/lora/',),
    group=_group,
    card=lambda cfg: {'ranks': {'lora': cfg.rank}},
    size_field='rank',
)
