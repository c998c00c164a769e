"""Batches from registered seqio Tasks / Mixtures (``config.data.kind = 'seqio'``).

The tasks come from a *task package* (default: the repository's ``tasks`` package, imported
here and only here in the library): :class:`SeqioSource` builds a
:class:`data.DataConfig` from ``config.data`` and hands it to the package's
``register_all``, so the tasks read this run's data folders, vocabulary, image size and
truncation mode; nothing is configured globally. Each process reads its own shard
(``seqio.ShardInfo(process_index, process_count)``).

Training is index-addressable: batch ``k`` is a fixed function of the config and ``k``, and
``train_batches(k)`` computes it without producing batches ``0..k-1`` (T5X checkpoints the
tf.data iterator instead; here the position *is* the step). The examples form one endless
*stream*: position ``p`` of a task is record ``p % n`` of its seeded epoch ``p // n``
(``tasks.common.JsonImageSource.stream``), with its own prompt seed; a Mixture deals positions
to its tasks in blocks of :data:`MIXTURE_BLOCK` by rate, in a seeded order per block, so each
task's position follows in closed form (:func:`mixture_schedule`). Batch ``k`` is the first
``B`` (local batch) examples with readable images from position ``k * B`` on: an unreadable
image's slot is filled by the next readable example (which the next batch also sees), so
resume and an uninterrupted run agree bit for bit. Cost of starting at ``k``: one epoch
permutation per task and at most one mixture block, not ``k`` batches. Not O(1): TFDS tasks
(COCO Captions, GLUE) skip ``k * B`` *records* before decoding
(``TrainingFlagTfdsSource.stream``), and packed batches (``config.data.pack``) skip ``k``
batches (:meth:`SeqioSource.train_batches_by_skip`).

A split that yields no batch at all (e.g. every image unreadable) raises
:class:`data.NoExamplesError` naming the dataset, the skips and the folder, instead of ending
the iterator (which the trainer would see as a bare ``StopIteration``).
"""
from __future__ import annotations

import collections
import functools
import inspect
import itertools
import logging
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np

from adalink_jax import data
from adalink_jax import evaluation
from adalink_jax import multihost
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position

# The default task package: the one place the library imports it (it registers nothing when
# imported; SeqioSource calls its register_all with the run's data config).
import tasks as default_task_package  # pylint: disable=g-import-not-at-top,wrong-import-position

log = logging.getLogger(__name__)


def _datasets_of(task: Any, benchmark_of) -> list[str]:
  """The benchmark names (image-skip counter keys) of a seqio task or of a mixture's tasks."""
  out = []
  for t in getattr(task, 'tasks', [task]):
    try:
      out.append(benchmark_of(t.name))
    except KeyError:
      out.append(t.name)
  return out


def no_examples_error(task: Any, split: str, what: str, config: data.DataConfig,
                      benchmark_of) -> data.NoExamplesError:
  """One line: ``task``/``split`` gave no ``what``, with the image skips and where they lay
  (``config``: the data config the task was built with; ``benchmark_of``: task name ->
  image-skip counter key)."""
  skipped = data.skipped_images()
  parts = []
  datasets = _datasets_of(task, benchmark_of)
  for name in datasets:
    if skipped.get(name):
      folder = data.skipped_images_folder(name)
      key = config.data_dir_key_of(folder)
      where = f' (data dir {key!r}: {config.data_dirs[key]!r})' if key else ''
      parts.append(f'dataset {name!r}: {skipped[name]} unreadable image file(s) skipped, '
                   f'looked in {folder!r}{where}')
  if parts:
    reason = ('every example was dropped because its image could not be decoded -- '
              + '; '.join(parts) + '. Check that those files are complete JPEG/PNG images '
              'and that the data dir points at the right copy')
  else:
    reason = (f'no image was skipped, so the split itself is empty for this process; check '
              f'the annotation files of {datasets} and config.data.data_dirs')
  return data.NoExamplesError(f'config.data.task {task.name!r}, split {split!r}, gave no '
                              f'{what}: {reason}')


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


def _eval_seqio_tasks(config: Any) -> list:
  """``config.eval.tasks`` (names of tasks or mixtures; commas allowed), else
  ``data.eval_task``, else ``data.task`` -> the seqio Tasks, mixtures expanded, in order."""
  names = [n for item in (config.eval.get('tasks') or ()) for n in str(item).split(',') if n]
  names = names or [config.data.get('eval_task') or config.data.task]
  split = config.data.get('eval_split', 'validation')
  out = {}
  for name in names:
    t = seqio.get_mixture_or_task(name)
    if not isinstance(t, seqio.Mixture) and split not in t.splits:
      raise ValueError(f'eval task {name!r} has no {split!r} split (config.data.eval_split); '
                       f'it has {list(t.splits)}')
    # A mixture's train-only members (e.g. MNLI, evaluated as matched / mismatched) are skipped.
    for sub in (t.tasks if isinstance(t, seqio.Mixture) else [t]):
      if split in sub.splits:
        out.setdefault(sub.name, sub)
  if not out:
    raise ValueError(f'no task of {names} has a {split!r} split (config.data.eval_split)')
  return list(out.values())


def _text(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def _postprocess_prediction(task: Any, text: str) -> Any:
  """A decoded prediction as the task scores it (its postprocess_fn, as seqio applies it)."""
  return task.postprocess_fn(text, example=None, is_target=False) if task.postprocess_fn \
      else text


class SeqioSource:
  """``train_batches`` / ``eval_batches`` / ``decode_text`` over a seqio Task or Mixture.

  ``task_package`` (default: ``tasks``) has ``register_all(data_config)``, ``TASK_IDS`` and
  ``benchmark_of(task_name)``; ``data_config`` is built from ``config.data``.
  """

  def __init__(self, config: Any, task_package: Any = None):
    d = config.data
    self.data_config = data.DataConfig.from_config(d)
    self.task_package = task_package or default_task_package
    self.task_package.register_all(self.data_config)
    self.config = config
    self.lengths = {'inputs': int(d.text_len), 'targets': int(d.target_len)}
    self.train_task = seqio.get_mixture_or_task(d.task)
    self.eval_seqio_tasks = _eval_seqio_tasks(config)
    self._eval_by_name = {t.name: t for t in self.eval_seqio_tasks}
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
    # Training streams keep every position and flag unreadable images (see _filled).
    self.stream_converter = _FlaggedConverter(image_size=self.eval_converter.image_size,
                                              with_task_id=task_ids)
    self.local_batch = multihost.local_batch_size(int(config.batch_size))
    # One process reads everything (seqio's default); several each read their own shard.
    self.shard = (seqio.ShardInfo(jax.process_index(), jax.process_count())
                  if jax.process_count() > 1 else None)
    self.vocab = self.train_task.output_features['targets'].vocabulary
    self.vocab.load_model()  # fail now, with VocabularyNotFoundError, not inside the pipeline
    log.info('vocabulary: %s (+%d extra ids; set by config.data.vocab%s), %d ids',
             self.vocab.sentencepiece_model_file, self.vocab.extra_ids,
             '' if d.get('vocab') else ", empty: the default", self.vocab.vocab_size)

  def _numpy(self, ds, keep=()) -> Iterator[dict]:
    for b in _one_line_errors(ds.as_numpy_iterator()):
      yield {k: v for k, v in b.items() if k in _MODEL_KEYS or k in keep}

  @property
  def train_split(self) -> str:
    return self.config.data.get('train_split', 'train')

  def train_batches(self, start: int = 0) -> Iterator[dict]:
    """Endless training batches from batch ``start`` on (see the module docstring)."""
    if not self.index_addressable():
      return self.train_batches_by_skip(start)
    return self._filled(self._numpy(self._windows(start), keep=('_ok',)), start)

  def index_addressable(self) -> bool:
    """Whether :meth:`train_batches` starts at a batch without producing the earlier ones
    (every training task has a stream source and batches are not packed)."""
    return not self.converter.pack and all(hasattr(t.source, 'stream')
                                           for t, _ in self._train_tasks())

  def train_batches_by_skip(self, start: int = 0) -> Iterator[dict]:
    """seqio's own pipeline (shuffle buffer after preprocessing) with ``skip(start)`` batches:
    resuming produces, and decodes, every earlier batch. Used for packed batches, whose
    boundaries depend on every example before them."""
    ds = self.train_task.get_dataset(self.lengths, split=self.train_split,
                                     shuffle=True, seed=int(self.config.seed), num_epochs=None,
                                     shard_info=self.shard, use_cached=False)
    ds = self.converter(ds, self.lengths).batch(self.local_batch, drop_remainder=True)
    return self._nonempty(self._numpy(ds.skip(start).prefetch(tf.data.AUTOTUNE)),
                          self.train_task, self.train_split)

  def _train_tasks(self) -> list[tuple[Any, float]]:
    """(task, mixing rate) of every training task that has the training split."""
    task = self.train_task
    if not isinstance(task, seqio.Mixture):
      return [(task, 1.0)]
    pairs = [(t, float(task.get_rate(t))) for t in task.tasks if self.train_split in t.splits]
    if not pairs:
      raise ValueError(f'no task of mixture {task.name!r} has a {self.train_split!r} split '
                       '(config.data.train_split)')
    return pairs

  def _host_rows(self) -> Optional[tuple[int, int, int]]:
    """(global batch, first row, end row) of this host, when every host reads the *global*
    stream and keeps its own rows of each batch: then the data of a step does not depend on
    the number of processes (a run resumed on another pod size sees the same batches). Needs
    sources that skip positions for free (JSON files); TFDS sources read per-host shards."""
    if jax.process_count() == 1 or not all(
        'positions' in inspect.signature(t.source.stream).parameters
        for t, _ in self._train_tasks()):
      return None
    b = self.local_batch
    return int(self.config.batch_size), jax.process_index() * b, (jax.process_index() + 1) * b

  def _task_stream(self, task: Any, start: int, positions=None) -> tf.data.Dataset:
    """Model examples (plus ``_ok``) of one task from its stream position ``start`` on (or at
    ``positions()``, increasing)."""
    seed = int(self.config.seed)
    if positions is not None:
      ds = task.source.stream(self.train_split, seed=seed, positions=positions)
    else:
      ds = task.source.stream(self.train_split, seed=seed, shard_info=self.shard, start=start)
    ds = task.preprocess_precache(ds, seed=seed)
    ds = task.preprocess_postcache(ds, sequence_length=self.lengths, seed=seed)
    ds = seqio.utils.trim_dataset(ds, self.lengths, task.output_features)
    return self.stream_converter(ds, self.lengths)

  def _windows(self, start: int) -> tf.data.Dataset:
    """Batches of ``local_batch`` stream positions: from ``start * local_batch`` of this
    host's shard, or -- with :meth:`_host_rows` -- this host's rows of global batches from
    ``start`` on."""
    rows = self._host_rows()
    first = start * (rows[0] if rows else self.local_batch)
    pairs = self._train_tasks()
    seed = int(self.config.seed)
    if len(pairs) == 1:
      positions = (lambda: host_positions(first, rows)) if rows else None
      ds = self._task_stream(pairs[0][0], first, positions)
    else:
      counts = mixture_counts([r for _, r in pairs])
      used = np.flatnonzero(counts)  # a task whose rate rounds to no slot is never read
      choices, offsets = mixture_schedule(seed, counts[used], first, rows)
      streams = []
      for j, (i, o) in enumerate(zip(used, offsets)):
        positions = (functools.partial(mixture_task_positions, seed, counts[used], first, j,
                                       rows) if rows else None)
        streams.append(self._task_stream(pairs[i][0], int(o), positions))
      ds = tf.data.Dataset.choose_from_datasets(streams, choices)
    return ds.batch(self.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def _filled(self, windows: Iterator[dict], start: int) -> Iterator[dict]:
    """Batch ``k``: the first ``local_batch`` examples with ``_ok`` at positions >= ``k * B``.

    ``windows`` holds positions ``[k * B, (k + 1) * B)`` per item, so a batch without an
    unreadable image is its window as is; otherwise the next windows fill its slots.
    """
    size = self.local_batch
    pending: collections.deque = collections.deque()
    for k in itertools.count(start):
      picks, got = [], 0
      while got < size:
        if len(picks) == len(pending):
          pending.append(next(windows, None))
          if pending[-1] is None:
            raise self._no_examples(self.train_task, self.train_split,
                                    f'batch of {size} examples')
        window = pending[len(picks)]
        rows = np.flatnonzero(window['_ok'])[:size - got]
        picks.append((window, rows))
        got += len(rows)
        if got < size and len(picks) * size > self.scan_limit:
          raise self._no_examples(self.train_task, self.train_split, (
              f'batch of {size} examples (batch {k}: the {len(picks) * size} examples from '
              f'stream position {k * size} on have {got} readable images)'))
      pending.popleft()
      if len(picks) == 1:
        yield {n: v for n, v in picks[0][0].items() if n != '_ok'}
      else:
        yield {n: np.concatenate([w[n][r] for w, r in picks]) for n in window if n != '_ok'}

  @functools.cached_property
  def scan_limit(self) -> int:
    """Positions one batch may scan for readable images before the data counts as unreadable:
    two epochs of every training task (an epoch boundary reshuffles); read when first needed."""
    return 2 * sum(t.source.num_input_examples(self.train_split)
                   for t, _ in self._train_tasks()) + self.local_batch

  def _no_examples(self, task: Any, split: str, what: str) -> data.NoExamplesError:
    return no_examples_error(task, split, what, self.data_config,
                             self.task_package.benchmark_of)

  def _nonempty(self, batches: Iterator[dict], task: Any, split: str) -> Iterator[dict]:
    """``batches``, but raising :func:`no_examples_error` if there is not even one."""
    any_batch = False
    for b in batches:
      any_batch = True
      yield b
    if not any_batch:
      raise self._no_examples(task, split, f'batch of {self.local_batch} examples')

  def eval_tasks(self) -> list[evaluation.EvalTask]:
    """Each eval task with its own postprocessor and metric functions (see tasks/*.py)."""
    return [self._eval_task(t) for t in self.eval_seqio_tasks]

  def _eval_task(self, t: seqio.Task) -> evaluation.EvalTask:
    labels = self.task_package.common.LABEL_WORDS.get(t.name, ())
    candidates = None
    if labels:
      from adalink_jax import rank_classification  # pylint: disable=g-import-not-at-top
      candidates = rank_classification.word_candidates(self.vocab, labels)
      if candidates.shape[1] > self.lengths['targets']:
        # Scored by decoding alone: the label words do not fit the answer length.
        log.warning('task %s: no rank classification -- its longest label word takes %d tokens '
                    'with EOS but config.data.target_len=%d', t.name, candidates.shape[1],
                    self.lengths['targets'])
        labels, candidates = (), None
    return evaluation.EvalTask(t.name, functools.partial(_postprocess_prediction, t),
                               tuple(t.metric_fns), labels, candidates)

  def eval_batches(self, num_batches: int, task: str) -> Iterator[dict]:
    """One eval task's examples in file order, with ``targets`` postprocessed by the task
    (e.g. all human answers, a GLUE class id) and the decoded ``prompts``."""
    d = self.config.data
    t = self._eval_by_name[task]
    raw = t.get_dataset(self.lengths, split=d.get('eval_split', 'validation'), shuffle=False,
                        num_epochs=1, shard_info=self.shard, use_cached=False)
    keep = [k for k in ('answers', 'targets_pretokenized', 'inputs') if k in raw.element_spec]
    refs = raw.map(lambda ex: {k: ex[k] for k in keep})
    model = self.eval_converter(raw, self.lengths)
    batches = 0
    rows, ref_rows = [], []
    for ex, ref in zip(_one_line_errors(model.as_numpy_iterator()), refs.as_numpy_iterator()):
      rows.append(ex)
      ref_rows.append(ref)
      if len(rows) == self.local_batch:
        yield self._eval_batch(t, rows, ref_rows)
        rows, ref_rows = [], []
        batches += 1
        if num_batches and batches >= num_batches:
          return
    if rows:  # the last, partial batch: padded, with 'valid' marking the real rows
      yield self._eval_batch(t, rows, ref_rows)
    elif not batches:
      raise self._no_examples(t, d.get('eval_split', 'validation'), 'example')

  def _eval_batch(self, task, rows, ref_rows) -> dict:
    n = len(rows)
    pad = self.local_batch - n
    batch = {k: np.stack([r[k] for r in rows] + [rows[-1][k]] * pad)
             for k in rows[0] if k in _MODEL_KEYS}
    post = task.postprocess_fn or (lambda x, example=None, is_target=False: _text(x))
    batch['targets'] = [post(_text(r['targets_pretokenized']), example=r, is_target=True)
                        for r in ref_rows] + [None] * pad
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


class _FlaggedConverter(data.PaLIFeatureConverter):
  """The training converter, also passing each stream example's ``_ok`` flag (bool [])."""

  def __init__(self, **kwargs):
    super().__init__(passthrough_features={
        '_ok': seqio.FeatureConverter.FeatureSpec(dtype=tf.bool, rank=0)}, **kwargs)

  def _full_lengths(self, task_feature_lengths) -> dict:
    return {**super()._full_lengths(task_feature_lengths), '_ok': None}  # scalar: no length


# Mixture positions are dealt in blocks of this many: every task gets its rate's share of each
# block (largest remainder, so rates hold to 1 / MIXTURE_BLOCK), in a seeded order per block.
MIXTURE_BLOCK = 10_000
_MIX_STREAM = 0x6D6978  # 'mix': keeps the block orders apart from the sources' epoch orders


def mixture_counts(rates: Sequence[float], block: int = MIXTURE_BLOCK) -> np.ndarray:
  """``int64 [tasks]``: each task's positions per block, proportional to ``rates``."""
  r = np.asarray(rates, np.float64)
  if not len(r) or not np.isfinite(r).all() or (r < 0).any() or r.sum() <= 0:
    raise ValueError(f'mixture rates must be finite, >= 0 and not all 0; got {list(rates)}')
  exact = r / r.sum() * block
  counts = np.floor(exact).astype(np.int64)
  counts[np.argsort(counts - exact, kind='stable')[:block - int(counts.sum())]] += 1
  return counts


def block_tasks(seed: int, block_index: int, counts: np.ndarray) -> np.ndarray:
  """``int64 [counts.sum()]``: the task of every position of mixture block ``block_index``."""
  slots = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
  return np.random.default_rng([int(seed), _MIX_STREAM, int(block_index)]).permutation(slots)


def host_positions(first: int, rows: tuple[int, int, int]) -> Iterator[int]:
  """Global positions from ``first`` on that fall in rows ``[lo, hi)`` of global batches of
  ``period`` (``rows = (period, lo, hi)``), in order."""
  period, lo, hi = rows
  for p in itertools.count(int(first)):
    if lo <= p % period < hi:
      yield p


def _scheduled(seed: int, counts: np.ndarray, first: int,
               rows: Optional[tuple[int, int, int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Per mixture block from ``first``'s on: (task of each position, each position's rank in
  its task), restricted to this host's rows when ``rows`` is given."""
  block = int(counts.sum())
  b, o = divmod(int(first), block)
  while True:
    tasks = block_tasks(seed, b, counts)
    # Rank of each position among its task's positions of this block, plus earlier blocks.
    rank = np.empty_like(tasks)
    for t in range(len(counts)):
      where = np.flatnonzero(tasks == t)
      rank[where] = b * counts[t] + np.arange(len(where))
    q = b * block + np.arange(block)
    keep = q >= first
    if rows is not None:
      period, lo, hi = rows
      keep &= (lo <= q % period) & (q % period < hi)
    yield tasks[keep], rank[keep]
    b += 1


def mixture_task_positions(seed: int, counts: np.ndarray, first: int, task: int,
                           rows: Optional[tuple[int, int, int]]) -> Iterator[int]:
  """Task ``task``'s own stream positions at this host's mixture positions, in order."""
  for tasks, rank in _scheduled(seed, counts, first, rows):
    yield from rank[tasks == task].tolist()


def mixture_schedule(seed: int, counts: np.ndarray, first: int,
                     rows: Optional[tuple[int, int, int]] = None
                     ) -> tuple[tf.data.Dataset, np.ndarray]:
  """(task index of every position from ``first`` on, each task's stream position there).

  Task ``t``'s ``r``-th position in the mixture is its own position ``r``, so at ``first``
  (block ``b``, offset ``o``) it stands at ``b * counts[t]`` plus its positions among the
  first ``o`` of block ``b``: one block is computed, however large ``first`` is. With
  ``rows``, only this host's rows of each global batch (:func:`host_positions`).
  """
  block = int(counts.sum())
  b0, o0 = divmod(int(first), block)
  offsets = b0 * counts + np.bincount(block_tasks(seed, b0, counts)[:o0], minlength=len(counts))

  def generate():
    for tasks, _ in _scheduled(seed, counts, first, rows):
      yield tasks

  choices = tf.data.Dataset.from_generator(
      generate, output_signature=tf.TensorSpec([None], tf.int64)).unbatch()
  return choices, offsets


_MODEL_KEYS = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
               'decoder_loss_weights', 'image', 'task_id', 'encoder_segment_ids',
               'encoder_positions', 'decoder_segment_ids', 'decoder_positions')
