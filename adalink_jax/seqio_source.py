"""Batches from registered seqio Tasks / Mixtures (``config.data.kind = 'seqio'``).

Each process reads its own shard (``seqio.ShardInfo(process_index, process_count)``). The
training stream is shuffled with ``config.seed`` and repeated, so batch ``k`` is a fixed
function of the config and resuming at step ``s`` skips ``s`` batches: the data order of a
resumed run is the data order of an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from adalink_jax import data
from adalink_jax import input_pipeline
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position


def _configure(d: Any):
  """Points the task registry at this run's data, vocabulary and prompt style."""
  dirs = {k: v for k, v in dict(d.get('data_dirs') or {}).items() if v}
  data.configure(tfds_data_dir=d.get('tfds_data_dir') or None,
                 vocab_path=d.get('vocab') or None, image_size=int(d.image_size),
                 data_dirs=dirs or None)
  import tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers every task)


class SeqioSource:
  """``train_batches`` / ``eval_batches`` / ``decode_text`` over a seqio Task or Mixture."""

  def __init__(self, config: Any):
    d = config.data
    _configure(d)
    self.config = config
    self.lengths = {'inputs': int(d.text_len), 'targets': int(d.target_len)}
    self.train_task = seqio.get_mixture_or_task(d.task)
    self.eval_task = seqio.get_mixture_or_task(d.get('eval_task') or d.task)
    multimodal = 'image' in self.train_task.output_features
    pack = bool(d.get('pack', False))
    if pack and multimodal:
      raise ValueError(f'config.data.pack=True packs text-only tasks; {d.task} has images')
    self.converter = data.PaLIFeatureConverter(
        image_size=int(d.image_size) if multimodal else None, with_task_id=multimodal,
        pack=pack)
    # Eval keeps one example per row (predictions map to references one to one).
    self.eval_converter = data.PaLIFeatureConverter(
        image_size=int(d.image_size) if multimodal else None, with_task_id=multimodal)
    self.local_batch = input_pipeline.local_batch_size(int(config.batch_size))
    # One process reads everything (seqio's default); several each read their own shard.
    self.shard = (seqio.ShardInfo(jax.process_index(), jax.process_count())
                  if jax.process_count() > 1 else None)
    self.vocab = self.train_task.output_features['targets'].vocabulary
    model_vocab = int(config.model.get('t5', {}).get('vocab_size', 0) or 0)
    if model_vocab and self.vocab.vocab_size > model_vocab:
      raise ValueError(f'the task vocabulary has {self.vocab.vocab_size} ids but '
                       f'config.model.t5.vocab_size={model_vocab}: ids beyond the embedding '
                       'table would be silently clamped; raise config.model.t5.vocab_size')

  def _numpy(self, ds) -> Iterator[dict]:
    for b in ds.as_numpy_iterator():
      yield {k: v for k, v in b.items() if k in _MODEL_KEYS}

  def train_batches(self, start: int = 0) -> Iterator[dict]:
    d = self.config.data
    ds = self.train_task.get_dataset(self.lengths, split=d.get('train_split', 'train'),
                                     shuffle=True, seed=int(self.config.seed), num_epochs=None,
                                     shard_info=self.shard, use_cached=False)
    ds = self.converter(ds, self.lengths).batch(self.local_batch, drop_remainder=True)
    return self._numpy(ds.skip(start).prefetch(tf.data.AUTOTUNE))

  def eval_batches(self, num_batches: int) -> Iterator[dict]:
    """Eval examples in file order with their reference strings (``answers``) and prompts."""
    d = self.config.data
    raw = self.eval_task.get_dataset(self.lengths, split=d.get('eval_split', 'validation'),
                                     shuffle=False, num_epochs=1, shard_info=self.shard,
                                     use_cached=False)
    # Multimodal tasks carry every reference in 'answers'; text tasks have one target string.
    ref_key = 'answers' if 'answers' in raw.element_spec else 'targets_pretokenized'
    refs = raw.map(lambda ex: {'answers': tf.reshape(ex[ref_key], [-1]), 'inputs': ex['inputs']})
    model = self.eval_converter(raw, self.lengths)
    batches = 0
    rows, ref_rows = [], []
    for ex, ref in zip(model.as_numpy_iterator(), refs.as_numpy_iterator()):
      rows.append(ex)
      ref_rows.append(ref)
      if len(rows) == self.local_batch:
        yield self._eval_batch(rows, ref_rows)
        rows, ref_rows = [], []
        batches += 1
        if num_batches and batches >= num_batches:
          return
    if rows:  # the last, partial batch: padded, with 'valid' marking the real rows
      yield self._eval_batch(rows, ref_rows)

  def _eval_batch(self, rows, ref_rows) -> dict:
    n = len(rows)
    pad = self.local_batch - n
    batch = {k: np.stack([r[k] for r in rows] + [rows[-1][k]] * pad)
             for k in rows[0] if k in _MODEL_KEYS}
    batch['answers'] = [[a.decode('utf-8') for a in r['answers']] for r in ref_rows] + [[]] * pad
    batch['prompts'] = [self.vocab.decode(r['inputs'].tolist()) for r in ref_rows] + [''] * pad
    batch['valid'] = np.arange(self.local_batch) < n
    return batch

  def decode_text(self, ids) -> str:
    ids = [int(t) for t in ids]
    if 1 in ids:
      ids = ids[:ids.index(1)]
    return self.vocab.decode([t for t in ids if t > 1])


_MODEL_KEYS = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
               'decoder_loss_weights', 'image', 'task_id', 'encoder_segment_ids',
               'encoder_positions', 'decoder_segment_ids', 'decoder_positions')
