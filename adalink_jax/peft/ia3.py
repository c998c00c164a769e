"""(IA)^3 (Liu et al., 2022): learned vectors that rescale the keys, the values and the MLP's
inner activation, initialised to ones, so the adapted model starts as the frozen one.

``peft.method='ia3'``. Intrusive hooks (:mod:`adalink_jax.models.intrusive`) at the sites in
``peft.ia3_targets`` (default ``key``, ``value``, ``mlp_hidden``): ``y * scale`` with ``scale``
one vector per site and layer. Params ``.../key/ia3/scale [joined_kv]``,
``.../value/ia3/scale [joined_kv]`` and ``.../mlp/ia3_hidden/scale [mlp]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax

from adalink_jax.models import intrusive
from adalink_jax.models.axes import param
from adalink_jax.peft import registry

TARGETS = intrusive.PROJECTIONS + ('mlp_hidden',)
DEFAULT_TARGETS = ('key', 'value', 'mlp_hidden')
_NAMES = ('ia3', 'ia3_hidden')  # the scale's module at a projection / at mlp_hidden


class Scale(nn.Module):
  """``y[..., n] -> y * scale``, ``scale [n]`` (axis ``axis``) initialised to ones."""
  axis: str
  param_dtype: Any

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    scale = param(self, 'scale', nn.initializers.ones, (y.shape[-1],), self.param_dtype,
                  (self.axis,))
    return y * scale.astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class IA3(intrusive.Hook):
  """The hook: rescales a projection's output (its output axis) or the MLP's inner activation."""

  def __call__(self, site: intrusive.Site, y: jax.Array, x: Optional[jax.Array] = None):
    del x
    if site.name not in TARGETS:
      raise ValueError(f'IA3 hooks go on sites {TARGETS}, not {site.name!r}')
    name = 'ia3_hidden' if site.name == 'mlp_hidden' else 'ia3'
    return Scale(site.axes[-1], site.param_dtype, name=name)(y)


def hooks(targets: Sequence[str] = DEFAULT_TARGETS) -> intrusive.Hooks:
  """The hook table: one :class:`IA3` at each target site."""
  return tuple((t, IA3()) for t in targets)


def _validate(cfg, bad) -> None:
  targets = cfg.ia3_targets
  if isinstance(targets, str) or not targets or set(targets) - set(TARGETS):
    bad('ia3_targets', f'choose a non-empty subset of {TARGETS}')
  if len(set(targets)) != len(targets):
    bad('ia3_targets', 'names a site twice; each site gets one scaling vector')


def _group(parts: Sequence[str]) -> Optional[str]:
  for i, p in enumerate(parts):
    if p in _NAMES and i > 0:
      return f'ia3/{parts[i - 1]}'  # e.g. ia3/key, ia3/mlp
  return None


METHOD = registry.Method(
    name='ia3',
    summary='(IA)^3: learned rescaling of keys, values and the MLP inner activation',
    fields=(('ia3_targets', DEFAULT_TARGETS),),
    validate=_validate,
    hooks=lambda cfg: hooks(cfg.ia3_targets),
    adds=tuple(f'/{n}/' for n in _NAMES),
    group=_group,
    card=lambda cfg: {'ia3_targets': list(cfg.ia3_targets)},
)
