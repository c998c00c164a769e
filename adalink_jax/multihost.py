"""What each process of a multi-host run feeds and how hosts share host-side results.

Every process feeds ``config.batch_size / process_count`` examples per step
(:func:`local_batch_size`); a batch generated globally is cut into per-host rows
(:func:`host_slice`); lists of JSON-able items (eval predictions) are gathered in process order
(:func:`gather_strings`). With one process all three are the identity.
"""
from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils


def local_batch_size(global_batch_size: int) -> int:
  """Examples this process feeds per step; the global batch must split evenly over hosts."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f'config.batch_size={global_batch_size} is not divisible by the '
                     f'{n} processes')
  return global_batch_size // n


def host_slice(batch: dict) -> dict:
  """This process's rows of a globally generated batch (``[B, ...] -> [B / hosts, ...]``)."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return batch
  out = {}
  for k, v in batch.items():
    rows = len(v) // n
    out[k] = v[i * rows:(i + 1) * rows]
  return out


def gather_strings(items: list) -> list:
  """All processes' lists (of JSON-able items), concatenated in process order."""
  if jax.process_count() == 1:
    return list(items)
  data = np.frombuffer(json.dumps(items).encode('utf-8'), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[:data.size] = data
  every = multihost_utils.process_allgather(padded)
  out = []
  for row, n in zip(np.asarray(every), np.asarray(lengths).reshape(-1)):
    out += json.loads(bytes(row[:n]).decode('utf-8'))
  return out
