"""Training and eval batches for the trainer, one host-local shard per process.

A *source* has ``train_batches(start)`` (endless, deterministic: batch ``k`` is always the
same, so resuming at step ``s`` just starts at batch ``s``), ``eval_batches(n)`` and
``decode_text(ids)``. Batches are dicts of numpy arrays (``image``, ``encoder_input_tokens``,
``decoder_input_tokens``, ``decoder_target_tokens``, ``decoder_loss_weights``, ``task_id``)
plus ``answers`` (reference strings per example) for eval.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

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


def _host_slice(batch: dict) -> dict:
  """This process's rows of a globally generated batch."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return batch
  out = {}
  for k, v in batch.items():
    rows = len(v) // n
    out[k] = v[i * rows:(i + 1) * rows]
  return out


class DemoSource:
  """The embedded demo's synthetic shapes (see :mod:`adalink_jax.demo`)."""

  def __init__(self, config: Any):
    from adalink_jax import demo  # pylint: disable=g-import-not-at-top
    d = config.data
    assets = d.get('assets_dir') or demo.default_assets_dir()
    self.task = demo.ShapesTask(demo.spm_path(assets), mode=d.get('mode', 'vqa'),
                                batch_size=int(config.batch_size), image_size=int(d.image_size),
                                text_len=int(d.text_len), target_len=int(d.target_len),
                                seed=int(d.get('seed', 0)))

  def train_batches(self, start: int = 0) -> Iterator[dict]:
    for b in self.task.train_batches(start):
      yield _host_slice(b)

  def eval_batches(self, num_batches: int) -> Iterator[dict]:
    for b in self.task.eval_batches(num_batches):
      yield _host_slice(b)

  def decode_text(self, ids) -> str:
    return self.task.decode_text(ids)


def make_source(config: Any):
  """``config.data.kind`` -> a source ('demo' or 'seqio')."""
  kind = config.data.kind
  if kind == 'demo':
    return DemoSource(config)
  if kind == 'seqio':
    from adalink_jax import seqio_source  # pylint: disable=g-import-not-at-top
    return seqio_source.SeqioSource(config)
  raise ValueError(f"config.data.kind={kind!r}; choose 'demo' or 'seqio'")


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


METRICS = ('vqa_accuracy', 'anls', 'cider', 'exact_match')


def compute_metrics(name: str, predictions: list[str], references: list[list[str]]) -> dict:
  """Named metric (0-100) of decoded predictions against per-example reference lists."""
  from adalink_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  if name not in METRICS:
    raise ValueError(f'config.eval.metric={name!r}; choose from {METRICS}')
  if name == 'exact_match':
    value = 100.0 * float(np.mean([p.strip() == r[0].strip()
                                   for p, r in zip(predictions, references)]))
  else:
    value = getattr(metrics_lib, name)(predictions, references)
  return {name: float(value)}
