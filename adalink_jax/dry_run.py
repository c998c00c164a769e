"""``--dry_run``: the model built abstractly (nothing allocated), its counts, sharding and memory."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from adalink_jax import model_builder
from adalink_jax import partitioning
from adalink_jax import trainer
from adalink_jax.peft import methods as peft_methods

# Optimizer slots per trainable parameter (AdamW: mu and nu; Adafactor: factored, ~0).
_OPT_SLOTS = {'adamw': 2.0, 'sgd': 1.0, 'adafactor': 0.05}


def _shard_fraction(sharding, shape) -> float:
  """Fraction of an array one device holds under ``sharding``."""
  return float(np.prod(sharding.shard_shape(tuple(shape)))) / max(float(np.prod(shape)), 1.0)


def memory_estimate(shapes: Any, shardings: Any, is_trainable, frozen_dtype, opt_name: str) -> dict:
  """Per-device bytes of frozen weights, trainable weights, their gradients and optimizer state."""
  frozen_b = train_b = 0.0
  flat_x = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_s = jax.tree_util.tree_leaves(shardings)
  for (path, x), s in zip(flat_x, flat_s):
    name = partitioning._path_str(path)  # pylint: disable=protected-access
    frac = _shard_fraction(s, x.shape)
    if is_trainable(name):
      train_b += np.prod(x.shape) * 4 * frac  # adapters train in fp32
    else:
      frozen_b += np.prod(x.shape) * np.dtype(frozen_dtype).itemsize * frac
  slots = _OPT_SLOTS.get(opt_name, 2.0)
  return {'frozen_weights': frozen_b, 'trainable_weights': train_b, 'gradients': train_b,
          'optimizer_state': slots * train_b,
          'total_excluding_activations': frozen_b + (2 + slots) * train_b}


def _gib(b: float) -> str:
  return f'{b / 2**30:.3f} GiB'


def report(config: Any) -> str:
  """The dry-run text: parameter table, sharding plan, per-device memory estimate."""
  setup = model_builder.build(config)
  mesh = partitioning.make_mesh(**dict(config.mesh))
  boxed, shardings, _ = trainer.plan_params(config, setup, mesh)
  shapes = nn.unbox(boxed)
  counts = peft_methods.param_counts(shapes, setup.trainable,
                                     num_tasks=int(config.peft.get('num_tasks', 1)))
  mem = memory_estimate(shapes, shardings, setup.trainable, setup.frozen_dtype,
                        config.optimizer.get('name', 'adafactor'))
  lines = [f'model: {config.model.family} {config.model.name}   method: {config.peft.method}',
           f'mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices',
           '', 'parameters:', peft_methods.param_table(counts), '',
           'sharding plan (path, shape, mesh axes per dim):',
           partitioning.describe(shardings, shapes), '',
           'per-device memory estimate (weights + gradients + optimizer state; activations '
           'not included):']
  lines += [f'  {k:<28} {_gib(v)}' for k, v in mem.items()]
  return '\n'.join(lines)
