"""Batches from registered seqio Tasks / Mixtures (``config.data.kind = 'seqio'``).

Each process reads its own shard (``seqio.ShardInfo(process_index, process_count)``). The
training stream is shuffled with ``config.seed`` and repeated, so batch ``k`` is a fixed
function of the config and resuming at step ``s`` skips ``s`` batches: the data order of a
resumed run is the data order of an uninterrupted one.

A split that yields no batch at all (e.g. every image unreadable) raises
:class:`data.NoExamplesError` naming the dataset, the skips and the folder, instead of ending
the iterator (which the trainer would see as a bare ``StopIteration``).
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import jax
import numpy as np

from adalink_jax import data
from adalink_jax import input_pipeline
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position

log = logging.getLogger(__name__)


def _configure(d: Any):
  """Points the task registry at this run's data, vocabulary, prompt style and truncation."""
  dirs = {k: v for k, v in dict(d.get('data_dirs') or {}).items() if v}
  data.configure(tfds_data_dir=d.get('tfds_data_dir') or None,
                 vocab_path=d.get('vocab') or None, image_size=int(d.image_size),
                 data_dirs=dirs or None, truncate=d.get('truncate') or None)
  import tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers every task)


def _datasets_of(name: str) -> list[str]:
  """The benchmark names (image-skip counter keys) of a task or of a mixture's tasks."""
  from tasks import common  # pylint: disable=g-import-not-at-top  (registered by _configure)
  task = seqio.get_mixture_or_task(name)
  out = []
  for t in getattr(task, 'tasks', [task]):
    try:
      out.append(common.benchmark_of(t.name))
    except KeyError:
      out.append(t.name)
  return out


def no_examples_error(task: str, split: str, what: str) -> data.NoExamplesError:
  """One line: ``task``/``split`` gave no ``what``, with the image skips and where they lay."""
  skipped = data.skipped_images()
  parts = []
  for name in _datasets_of(task):
    if skipped.get(name):
      folder = data.skipped_images_folder(name)
      key = data.data_dir_key_of(folder)
      where = f' (data dir {key!r}: {data.config().data_dirs[key]!r})' if key else ''
      parts.append(f'dataset {name!r}: {skipped[name]} unreadable image file(s) skipped, '
                   f'looked in {folder!r}{where}')
  if parts:
    reason = ('every example was dropped because its image could not be decoded -- '
              + '; '.join(parts) + '. Check that those files are complete JPEG/PNG images '
              'and that the data dir points at the right copy')
  else:
    reason = (f'no image was skipped, so the split itself is empty for this process; check '
              f'the annotation files of {_datasets_of(task)} and config.data.data_dirs')
  return data.NoExamplesError(f'config.data.task {task!r}, split {split!r}, gave no {what}: '
                              f'{reason}')


def _one_line_errors(it: Iterator) -> Iterator:
  """Re-raises a :class:`data.TruncationError` that tf.data wrapped (with the Python
  traceback of its py_function) in an InvalidArgumentError, as its own one-line error."""
  marker = f'{data.TruncationError.__name__}: '
  try:
    yield from it
  except tf.errors.InvalidArgumentError as e:
    msg = str(e)
    if marker not in msg:
      raise
    raise data.TruncationError(msg.split(marker, 1)[1].splitlines()[0]) from None


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
    # A per-task adapter bank needs each example's task id, text tasks included.
    task_ids = multimodal or int(config.peft.get('num_tasks', 1)) > 1
    pack = bool(d.get('pack', False))
    if pack and multimodal:
      raise ValueError(f'config.data.pack=True packs text-only tasks; {d.task} has images')
    if pack and task_ids:
      raise ValueError('config.data.pack=True cannot carry the per-example task ids that '
                       f'config.peft.num_tasks={config.peft.num_tasks} needs; set pack=False')
    self.converter = data.PaLIFeatureConverter(
        image_size=int(d.image_size) if multimodal else None, with_task_id=task_ids,
        pack=pack)
    # Eval keeps one example per row (predictions map to references one to one).
    self.eval_converter = data.PaLIFeatureConverter(
        image_size=int(d.image_size) if multimodal else None, with_task_id=task_ids)
    self.local_batch = input_pipeline.local_batch_size(int(config.batch_size))
    # One process reads everything (seqio's default); several each read their own shard.
    self.shard = (seqio.ShardInfo(jax.process_index(), jax.process_count())
                  if jax.process_count() > 1 else None)
    self.vocab = self.train_task.output_features['targets'].vocabulary
    self.vocab.load_model()  # fail now, with VocabularyNotFoundError, not inside the pipeline
    log.info('vocabulary: %s (+%d extra ids; set by config.data.vocab%s), %d ids',
             self.vocab.sentencepiece_model_file, self.vocab.extra_ids,
             '' if d.get('vocab') else ", empty: the default", self.vocab.vocab_size)
    model_vocab = int(config.model.get('t5', {}).get('vocab_size', 0) or 0)
    if model_vocab and self.vocab.vocab_size > model_vocab:
      raise ValueError(f'the task vocabulary has {self.vocab.vocab_size} ids but '
                       f'config.model.t5.vocab_size={model_vocab}: ids beyond the embedding '
                       'table would be silently clamped; raise config.model.t5.vocab_size')

  def _numpy(self, ds) -> Iterator[dict]:
    for b in _one_line_errors(ds.as_numpy_iterator()):
      yield {k: v for k, v in b.items() if k in _MODEL_KEYS}

  def train_batches(self, start: int = 0) -> Iterator[dict]:
    d = self.config.data
    ds = self.train_task.get_dataset(self.lengths, split=d.get('train_split', 'train'),
                                     shuffle=True, seed=int(self.config.seed), num_epochs=None,
                                     shard_info=self.shard, use_cached=False)
    ds = self.converter(ds, self.lengths).batch(self.local_batch, drop_remainder=True)
    return self._nonempty(self._numpy(ds.skip(start).prefetch(tf.data.AUTOTUNE)),
                          d.task, d.get('train_split', 'train'))

  def _nonempty(self, batches: Iterator[dict], task: str, split: str) -> Iterator[dict]:
    """``batches``, but raising :func:`no_examples_error` if there is not even one."""
    any_batch = False
    for b in batches:
      any_batch = True
      yield b
    if not any_batch:
      raise no_examples_error(task, split, f'batch of {self.local_batch} examples')

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
    for ex, ref in zip(_one_line_errors(model.as_numpy_iterator()), refs.as_numpy_iterator()):
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
    elif not batches:
      raise no_examples_error(d.get('eval_task') or d.task, d.get('eval_split', 'validation'),
                              'example')

  def _eval_batch(self, rows, ref_rows) -> dict:
    n = len(rows)
    pad = self.local_batch - n
    batch = {k: np.stack([r[k] for r in rows] + [rows[-1][k]] * pad)
             for k in rows[0] if k in _MODEL_KEYS}
    batch['answers'] = [[a.decode('utf-8') for a in r['answers']] for r in ref_rows] + [[]] * pad
    batch['prompts'] = [self.vocab.decode(r['inputs'].tolist()) for r in ref_rows] + [''] * pad
    batch['valid'] = np.arange(self.local_batch) < n
    return batch

  def report(self) -> dict:
    """What the data pipeline dropped or cut so far (for result.json): truncations, skips."""
    return data.data_report()

  def decode_text(self, ids) -> str:
    ids = [int(t) for t in ids]
    if 1 in ids:
      ids = ids[:ids.index(1)]
    return self.vocab.decode([t for t in ids if t > 1])


_MODEL_KEYS = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
               'decoder_loss_weights', 'image', 'task_id', 'encoder_segment_ids',
               'encoder_positions', 'decoder_segment_ids', 'decoder_positions')
