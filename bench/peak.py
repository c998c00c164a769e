"""The machine's achievable matmul rate: the denominator of every MFU in a run.

``python -m bench.peak --spec=spec.json --out=result.json``; spec: ``n`` (square size),
``dtype``, ``reps``. Times ``jnp.dot`` of two ``[n, n]`` arrays (``2 n^3`` FLOPs) under
``jax.jit``, blocking on the result, after one warm-up; reports the median rate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bench import common


def run(spec: dict) -> dict:
  """Median FLOP/s of an ``n^3`` matmul in ``dtype``."""

  n, dtype = int(spec['n']), jnp.dtype(spec.get('dtype', 'float32'))
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype)
  b = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype)
  compiled = jax.jit(jnp.dot).lower(a, b).compile()
  jax.block_until_ready(compiled(a, b))
  times = common.timed(lambda: jax.block_until_ready(compiled(a, b)), int(spec.get('reps', 5)))
  flops = 2.0 * n ** 3
  return dict(kind='peak', n=n, dtype=str(dtype), times_s=times,
              flops=flops, xla_flops=common.flops_of(compiled),
              flops_per_s=flops / common.median(times),
              best_flops_per_s=flops / min(times), backend=jax.default_backend())


if __name__ == '__main__':
  common.child_main(run)
