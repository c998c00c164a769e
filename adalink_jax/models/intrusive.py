"""The only place where methods reach *inside* transformer blocks: a table of hooks at named sites.

AdaLink and prompt tuning act at the embedding seam and never touch the blocks; the intrusive
baselines (LoRA, bottleneck adapters, IA3) need hooks in the attention and MLP. A model config
carries ONE field, ``hooks``: a tuple of ``(site, hook)`` pairs (hashable, so it can sit in a
frozen config). The blocks call :func:`apply` at each site; with ``hooks=()`` they are exactly
the plain model (no parameters, no ops added). Sites:

  ``query``, ``key``, ``value``, ``out``  attention projections (``y = W x``; hooks see x and y)
  ``wi``, ``wo``                          MLP projections (``wi``: every input projection of a
                                          gated MLP)
  ``mlp_hidden``                          the MLP's inner activation (the input of ``wo``)
  ``attention_out``, ``mlp_out``          a self-attention / MLP sub-block's output, before the
                                          residual add

A hook is a frozen dataclass subclassing :class:`Hook`; ``hook(site, y, x)`` runs *inside* the
module of the site (so the flax modules it creates are children of it: e.g. LoRA's params are
``.../query/lora/lora_a``) and returns the new ``y``. The hooks themselves live with their
methods in ``adalink_jax/peft/`` -- this module knows no method.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax

PROJECTIONS = ('query', 'key', 'value', 'out', 'wi', 'wo')
SITES = PROJECTIONS + ('mlp_hidden', 'attention_out', 'mlp_out')


class Site(NamedTuple):
  """Where a hook runs. axes: logical axis names of ``(x, y)``'s last dims for a projection
  (its kernel axes), else ``(y,)``'s; dtype / param_dtype: the host module's."""
  name: str
  axes: tuple[str, ...]
  dtype: Any
  param_dtype: Any


class Hook:
  """Base of hook specs (subclasses: frozen dataclasses, hence hashable)."""

  def __call__(self, site: Site, y: jax.Array, x: Optional[jax.Array] = None) -> jax.Array:
    raise NotImplementedError


Hooks = tuple[tuple[str, Hook], ...]


@functools.lru_cache(maxsize=None)
def check(hooks: Hooks) -> Hooks:
  """``hooks`` if every entry is a ``(site, Hook)`` pair at a known site; ValueError otherwise."""
  for entry in hooks:
    if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Hook)):
      raise ValueError(f'hooks entry {entry!r}: expected a (site, intrusive.Hook) pair')
    if entry[0] not in SITES:
      raise ValueError(f'hook {type(entry[1]).__name__} at unknown site {entry[0]!r}; '
                       f'sites: {SITES}')
    if not dataclasses.is_dataclass(entry[1]):
      raise ValueError(f'hook {type(entry[1]).__name__} must be a frozen dataclass (hashable)')
  return hooks


def at(hooks: Hooks, *sites: str) -> Hooks:
  """The entries of ``hooks`` at any of ``sites`` (checked), in table order."""
  return tuple(e for e in check(tuple(hooks)) if e[0] in sites)


def apply(hooks: Hooks, site: str, y: jax.Array, x: Optional[jax.Array] = None, *,
          axes: tuple[str, ...], dtype: Any, param_dtype: Any) -> jax.Array:
  """Runs the hooks at ``site`` on ``y`` (``x``: a projection's input) in table order.

  Call it from the ``nn.compact`` method of the module that owns the site.
  """
  return run(at(hooks, site), y, x, axes=axes, dtype=dtype, param_dtype=param_dtype)


def run(hooks: Hooks, y: jax.Array, x: Optional[jax.Array] = None, *, axes: tuple[str, ...],
        dtype: Any, param_dtype: Any) -> jax.Array:
  """Runs every entry of ``hooks`` (already picked with :func:`at`) on ``y`` in order."""
  for name, hook in check(tuple(hooks)):
    y = hook(Site(name, tuple(axes), dtype, param_dtype), y, x)
  return y
