"""Meshes and the one table that maps logical axis names to mesh axes (t5x style).

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + parameter sharding),
``model`` (tensor parallel). Frozen weights are sharded by :data:`LOGICAL_AXIS_RULES`;
adapters are small and replicated; the batch is sharded over ``data x fsdp``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')

# Logical name -> mesh axis (or None: replicated). The only partitioning table in the project.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_AXES),
    ('vocab', 'model'),
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv_heads', 'model'),  # GQA/MQA K/V heads; 1-head K/V stays replicated (indivisible)
    ('joined_kv', 'model'),
    ('kv', None),
    ('relpos_buckets', None),
    ('layers', None),
    ('rank', None),
    ('tasks', None),
    ('prompt', None),
    ('patch', None),
    ('channels', None),
    ('pos', None),
    ('length', None),
    # Activations [batch, length, embed]: batch split like the input batch, the rest whole.
    ('activation_batch', BATCH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
)


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a ``(data, fsdp, model)`` mesh; one size may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, model]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one of data/fsdp/model may be -1, got {sizes}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh: {len(devices)} devices do not divide by {known} ({sizes})')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'mesh data*fsdp*model = {sizes} = {int(np.prod(sizes))} '
                     f'but there are {len(devices)} devices')
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except (AssertionError, NotImplementedError, ValueError):
    grid = np.asarray(devices).reshape(sizes)  # e.g. fake CPU devices with no topology
  return Mesh(grid, MESH_AXES)


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def logical_to_spec(axes: Optional[Sequence[Optional[str]]], rules=LOGICAL_AXIS_RULES) -> P:
  """Logical names of one array -> PartitionSpec (a mesh axis is used at most once)."""
  if axes is None:
    return P()
  # A name repeated within one array (e.g. a conv kernel's two 'patch' dims) is mapped once.
  seen, unique = set(), []
  for a in axes:
    unique.append(None if a in seen else a)
    seen.add(a)
  return nn.logical_to_mesh_axes(tuple(unique), rules)


def param_shardings(boxed_params: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES,
                    replicate: Optional[Callable[[str], bool]] = None) -> Any:
  """NamedShardings for a tree of ``nn.LogicallyPartitioned`` params (e.g. from ``eval_shape(init)``).

  ``replicate(path)`` -> True keeps that parameter replicated (adapters: tiny, and updated every step).
  """
  def one(path, leaf):
    if replicate is not None and replicate(_path_str(path)):
      return NamedSharding(mesh, P())
    axes = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
    spec = logical_to_spec(axes, rules)
    shape = (leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf).shape
    return NamedSharding(mesh, _drop_indivisible(spec, shape, mesh))
  return jax.tree_util.tree_map_with_path(
      one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _drop_indivisible(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Replicates dimensions the mesh cannot divide evenly (e.g. tiny test models)."""
  out = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axis,) if isinstance(axis, str) else (axis or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    out.append(axis if dim % size == 0 else None)
  return P(*out)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding for a batch array ``[batch, ...]``: batch over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def describe(shardings: Any, shapes: Any) -> str:
  """One line per parameter: path, shape and mesh axes (for the dry run's sharding plan)."""
  rows = []
  flat_s = jax.tree_util.tree_flatten_with_path(shardings)[0]
  flat_x = jax.tree_util.tree_leaves(shapes)
  for (path, s), x in zip(flat_s, flat_x):
    rows.append(f'{_path_str(path):<72} {str(tuple(x.shape)):<22} {tuple(s.spec)}')
  return '\n'.join(rows)
