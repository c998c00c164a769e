"""Parameter declaration with t5x-style logical axis names.

Every parameter in the project is created through :func:`param`, so every leaf of
a parameter tree carries one logical axis name per dimension. The names used:
``vocab, embed, mlp, heads, kv_heads, kv, joined_kv, relpos_buckets, layers, rank, tasks,
patch, channels, pos``; :mod:`adalink_jax.partitioning` maps them to mesh axes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


def param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
          dtype: Any, axes: Sequence[str]) -> jax.Array:
  """Declares ``module.<name>`` with logical axis names (one per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f'{name}: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}')
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)
