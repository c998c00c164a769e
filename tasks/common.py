"""Pieces shared by every task: names, task ids, output features, sources, preprocessors.

Every multimodal source yields the same example schema, so one preprocessing chain serves all
captioning and VQA tasks::

  image_path  tf.string []    JSON sources (COCO Captions from TFDS: 'image_encoded' bytes)
  id          tf.string []    question id / image id, kept for prediction dumps
  question    tf.string []    '' for captioning
  target      tf.string []    training target: one caption / the most frequent answer
  answers     tf.string [n]   all references (captions) or all answers, for the metrics
  is_training tf.bool   []    True on the 'train' split: prompts are then sampled (mmit)

Text-only (GLUE) sources keep their TFDS fields plus ``is_training``.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import logging
import os
import string
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from adalink_jax import data
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position

TRAIN = 'train'

# Stable task ids for per-task adapter banks: one per benchmark, shared by both prompt
# styles (and by MNLI's matched / mismatched eval tasks). Append only; never reorder.
BENCHMARKS = ('coco_captions', 'textcaps', 'vqav2', 'okvqa', 'textvqa', 'stvqa', 'docvqa',
              'glue_cola', 'glue_sst2', 'glue_mrpc', 'glue_qqp', 'glue_stsb', 'glue_mnli',
              'glue_qnli', 'glue_rte', 'mr', 'trec')
TASK_IDS: dict[str, int] = {b: i for i, b in enumerate(BENCHMARKS)}


def benchmark_of(task_name: str) -> str:
  """'vqav2_mmit' -> 'vqav2'; 'glue_mnli_mismatched_v002_raw' -> 'glue_mnli'."""
  for style in data.PROMPT_STYLES:
    if task_name.endswith('_' + style):
      task_name = task_name[:-len(style) - 1]
      break
  if task_name.endswith('_v002'):
    task_name = task_name[:-len('_v002')]
  for suffix in ('_matched', '_mismatched'):
    if task_name.endswith(suffix):
      task_name = task_name[:-len(suffix)]
  if task_name not in TASK_IDS:
    raise KeyError(f'{task_name!r} is not a known benchmark; known: {list(BENCHMARKS)}')
  return task_name


def task_id(task_name: str) -> int:
  """The adapter-bank id of a task (same for its raw and mmit variants)."""
  return TASK_IDS[benchmark_of(task_name)]


def resolve_style(style: Optional[str] = None,
                  config: Optional[data.DataConfig] = None) -> str:
  """``style``, else ``config.prompt_style``, else the default ('raw'); checked."""
  style = style or (config or data.DataConfig()).prompt_style
  if style not in data.PROMPT_STYLES:
    raise ValueError(f'prompt style must be one of {data.PROMPT_STYLES}, got {style!r}')
  return style


def task_name(benchmark: str, style: Optional[str] = None, *,
              config: Optional[data.DataConfig] = None) -> str:
  """Registered name of a benchmark in a prompt style: ('vqav2', 'mmit') -> 'vqav2_mmit'.

  Without ``style``, ``config.prompt_style`` (default 'raw'). GLUE benchmarks follow T5's
  naming: ('glue_cola', 'raw') -> 'glue_cola_v002_raw'.
  """
  style = resolve_style(style, config)
  if benchmark.startswith('glue_'):
    return f'{benchmark}_v002_{style}'
  return f'{benchmark}_{style}'


# ------------------------------------------------------------------------ output features

def _passthrough(dtype, rank):
  return seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=dtype,
                       rank=rank, required=True)


def text_output_features(config: data.DataConfig) -> dict[str, seqio.Feature]:
  """inputs / targets (``config``'s SentencePiece, EOS appended) and the scalar task id."""
  vocab = data.get_vocabulary(config)
  return {
      'inputs': seqio.Feature(vocab, add_eos=True, required=True),
      'targets': seqio.Feature(vocab, add_eos=True),
      'task_id': _passthrough(tf.int32, 0),
  }


def image_output_features(config: data.DataConfig) -> dict[str, seqio.Feature]:
  """Text features plus ``image`` float32 [S, S, 3] in [-1, 1]."""
  return {**text_output_features(config), 'image': _passthrough(tf.float32, 3)}


# ---------------------------------------------------------------------------------- sources

EXAMPLE_SIGNATURE = {
    'image_path': tf.TensorSpec([], tf.string),
    'id': tf.TensorSpec([], tf.string),
    'question': tf.TensorSpec([], tf.string),
    'target': tf.TensorSpec([], tf.string),
    'answers': tf.TensorSpec([None], tf.string),
    'is_training': tf.TensorSpec([], tf.bool),
}
# A training *stream* (``source.stream``: endless, example ``i`` a pure function of the seed and
# of ``i``) adds ``_ok`` (False once the example's image proved unreadable; kept in place so
# positions stay aligned) and ``_seed`` (int64 [2], the example's own stateless seed for random
# preprocessing such as prompt sampling: ``[key of source/split/seed, stream position]``).
STREAM_SIGNATURE = {**EXAMPLE_SIGNATURE, '_ok': tf.TensorSpec([], tf.bool),
                    '_seed': tf.TensorSpec([2], tf.int64)}
RECORD_SHUFFLE_BUFFER = 1000  # records (not decoded images) shuffled by a TFDS stream


def stream_key(name: str, split: str, seed: int) -> int:
  """First word of every ``_seed`` of a stream: distinct per source, split and config seed."""
  digest = hashlib.blake2b(f'{name}/{split}/{int(seed)}'.encode(), digest_size=7).digest()
  return int.from_bytes(digest, 'little')  # < 2**56: a non-negative int64


def record(image_path: str, id_: Any, question: str, target: str,
           answers: Sequence[str]) -> dict[str, Any]:
  """One example of a JSON source, in the common schema (without ``is_training``)."""
  return {'image_path': image_path, 'id': str(id_), 'question': question or '',
          'target': target or '', 'answers': [a or '' for a in answers]}


def most_common(answers: Sequence[str]) -> str:
  """Most frequent answer; ties go to the one seen first (deterministic)."""
  if not answers:
    return ''
  counts = collections.Counter(answers)
  best = max(counts.values())
  return next(a for a in answers if counts[a] == best)


def read_json(path: str) -> Any:
  """Parses a JSON file (local or any TF-supported filesystem, e.g. gs://)."""
  with tf.io.gfile.GFile(path, 'r') as f:
    return json.load(f)


class JsonImageSource(seqio.FunctionDataSource):
  """Examples from official JSON annotation files plus an image folder.

  ``records_fn(split) -> list[dict]`` reads the JSON (only when a dataset or its size is
  first requested) and returns :func:`record` dicts; they are kept in memory per split (a
  source is built, by ``register``, for one data configuration). The source shuffles the
  whole record list per epoch (seeded: epoch ``e`` of seed ``s`` always gives the same
  order) and shards by example index, so every host reads only its own images.
  :meth:`stream` is the training form: endless and index-addressable (it starts at any
  position without producing the ones before).
  """

  def __init__(self, name: str, records_fn: Callable[[str], list[dict]],
               splits: Sequence[str]):
    self._name = name
    self._records_fn = records_fn
    self._cache: dict[str, list[dict]] = {}
    self._reads: dict[str, dict] = {}
    super().__init__(dataset_fn=self._dataset_fn, splits=splits)

  @property
  def name(self) -> str:
    return self._name

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def records(self, split: str) -> list[dict]:
    """The split's examples (read once per split)."""
    if split not in self.splits:
      raise ValueError(f'{self._name} has no split {split!r}; splits: {list(self.splits)}')
    if split not in self._cache:
      self._cache[split] = self._records_fn(split)
      logging.info('%s/%s: %d examples', self._name, split, len(self._cache[split]))
    return self._cache[split]

  def num_input_examples(self, split: str) -> int:
    return len(self.records(split))

  def read_stats(self, split: str) -> dict:
    """Records this source has handed out for ``split`` since :meth:`reset_read_stats`:
    ``{'examples': n, 'lowest_position': lowest stream position (None: only epoch datasets)}``."""
    return dict(self._reads.get(split, {'examples': 0, 'lowest_position': None}))

  def reset_read_stats(self) -> None:
    self._reads.clear()

  def _count_read(self, split: str, position: Optional[int] = None) -> None:
    stats = self._reads.setdefault(split, {'examples': 0, 'lowest_position': None})
    stats['examples'] += 1
    if position is not None and (stats['lowest_position'] is None
                                 or position < stats['lowest_position']):
      stats['lowest_position'] = position

  def _shard_index(self, split: str, shard_info: Optional[seqio.ShardInfo]) -> np.ndarray:
    index = np.arange(len(self.records(split)))
    if shard_info and shard_info.num_shards > 1:
      index = index[shard_info.index::shard_info.num_shards]
    return index

  def _dataset_fn(self, split: str, shuffle_files: bool, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None) -> tf.data.Dataset:
    records = self.records(split)
    index = self._shard_index(split, shard_info)
    is_training = split == TRAIN
    epochs = itertools.count()

    def generate():
      # TF calls this afresh for every pass over the data, so each epoch reshuffles.
      order = index
      if shuffle_files:
        rng = np.random.default_rng(None if seed is None else [int(seed), next(epochs)])
        order = rng.permutation(index)
      for i in order:
        self._count_read(split)
        yield {**records[i], 'is_training': is_training}

    return tf.data.Dataset.from_generator(generate, output_signature=EXAMPLE_SIGNATURE)

  def stream(self, split: str, seed: int, shard_info: Optional[seqio.ShardInfo] = None,
             start: int = 0, positions: Optional[Callable[[], Iterable[int]]] = None
             ) -> tf.data.Dataset:
    """Endless examples of this host's shard from stream position ``start`` on.

    Position ``p`` is example ``p % n`` of epoch ``p // n`` (``n`` records in the shard), whose
    order is the seeded permutation of :meth:`get_dataset` (``default_rng([seed, epoch])``), so
    starting at ``p`` costs one permutation, not ``p`` examples. ``positions`` (a function
    returning increasing positions) reads just those -- e.g. one host's rows of every global
    batch -- skipping the others without touching them. Elements follow ``STREAM_SIGNATURE``;
    the stream is empty if the shard is.
    """
    records = self.records(split)
    index = self._shard_index(split, shard_info)
    is_training = split == TRAIN
    key = stream_key(self._name, split, seed)

    def generate():
      if not len(index):
        return
      epoch, order = None, None
      for position in (positions() if positions else itertools.count(int(start))):
        e, i = divmod(int(position), len(index))
        if e != epoch:  # positions increase: one permutation per epoch reached
          epoch, order = e, np.random.default_rng([int(seed), e]).permutation(index)
        self._count_read(split, position)
        yield {**records[order[i]], 'is_training': is_training, '_ok': True,
               '_seed': np.array([key, position], np.int64)}

    return tf.data.Dataset.from_generator(generate, output_signature=STREAM_SIGNATURE)

  def get_dataset(self, split: str = TRAIN, shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # handled by the Task
    return self._dataset_fn(split, shuffle, seed, shard_info)


class TrainingFlagTfdsSource(seqio.TfdsDataSource):
  """A TfdsDataSource whose examples also carry ``is_training`` (True on 'train').

  ``map_fn(ds, split)`` optionally reshapes the TFDS examples (e.g. into the common schema);
  ``hint`` (how to prepare the dataset) is quoted when it is not prepared in ``tfds_data_dir``
  (None: TFDS's default). Everything else, including ``num_input_examples``, is seqio's
  TfdsDataSource unchanged.
  """

  def __init__(self, tfds_name: str, splits: Mapping[str, str], hint: str,
               tfds_data_dir: Optional[str] = None,
               map_fn: Optional[Callable[[tf.data.Dataset, str], tf.data.Dataset]] = None,
               decoders: Optional[Mapping[str, Any]] = None):
    # read_only: never download / prepare implicitly (seqio's default would start fetching
    # COCO from inside a training job); an unprepared dataset raises a clear error instead.
    super().__init__(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=dict(splits),
                     decoders=decoders, read_only=True)
    self._map_fn = map_fn
    self._hint = hint
    self._tfds_data_dir = tfds_data_dir

  def get_dataset(self, split: str = TRAIN, shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, **kwargs) -> tf.data.Dataset:
    try:
      ds = super().get_dataset(split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                               **kwargs)
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
      # TFDS's own default, named in the message only (read when the error happens).
      where = self._tfds_data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
      raise data.DataNotFoundError(
          f'TFDS dataset {self.tfds_dataset.name!r} (split {split!r}) is not prepared in '
          f'{where!r}; set --config.data.tfds_data_dir=DIR (library use: '
          f'DataConfig.configure(tfds_data_dir=...)). {self._hint}. TFDS said: {e}') from e
    if self._map_fn is not None:
      ds = self._map_fn(ds, split)
    training = split == TRAIN
    return ds.map(lambda ex: {**ex, 'is_training': tf.constant(training)},
                  num_parallel_calls=tf.data.AUTOTUNE)

  def stream(self, split: str, seed: int, shard_info: Optional[seqio.ShardInfo] = None,
             start: int = 0) -> tf.data.Dataset:
    """Endless examples from stream position ``start`` on (``STREAM_SIGNATURE`` extras).

    Not index-addressable: TFDS's record files are read in a seeded order, repeated and
    shuffled over ``RECORD_SHUFFLE_BUFFER`` records, and ``start`` records are skipped. The
    skip reads records (for COCO: JPEG bytes) but decodes and preprocesses nothing, so a
    resume costs reading, not decoding, the examples before it.
    """
    if shard_info and len(self.list_shards(split)) < shard_info.num_shards:
      ds = self.get_dataset(split, shuffle=True, seed=seed).shard(shard_info.num_shards,
                                                                  shard_info.index)
    else:
      ds = self.get_dataset(split, shuffle=True, seed=seed, shard_info=shard_info)
    ds = ds.repeat().shuffle(RECORD_SHUFFLE_BUFFER, seed=seed).enumerate().skip(int(start))
    key = tf.constant(stream_key(self.tfds_dataset.name, split, seed), tf.int64)
    return ds.map(lambda i, ex: {**ex, '_ok': tf.constant(True), '_seed': tf.stack([key, i])},
                  num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------- preprocessors


def decode_images(dataset: tf.data.Dataset, dataset_name: str, *, size: int,
                  method: str = 'bilinear') -> tf.data.Dataset:
  """Gets each example's image, skipping (and counting) unreadable ones; resizes it to
  ``size`` x ``size`` (``method``) and scales it to [-1, 1] float32.

  The image comes from ``image_path`` (a file), ``image_encoded`` (bytes, e.g. TFDS with
  skipped decoding; ``id`` names a bad one) or ``image`` (already decoded uint8). On a
  training stream (examples carry ``_ok``) an unreadable example stays in place with
  ``_ok=False`` and a blank image, so stream positions stay aligned for resuming; the batcher
  (``SeqioSource.train_batches``) leaves it out.
  """
  spec = dataset.element_spec
  flagged = '_ok' in spec  # a training stream: keep the example in place, flagged

  def load(ex):
    ex = dict(ex)
    if 'image_path' in ex:
      image, ok = data.load_image(ex.pop('image_path'), dataset_name)
    else:
      image, ok = data.decode_image(ex.pop('image_encoded'), ex['id'], dataset_name)
    ex['image'], ex['_ok'] = image, (ex['_ok'] & ok) if flagged else ok
    return ex

  if 'image_path' in spec or 'image_encoded' in spec:
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if not flagged:
      dataset = dataset.filter(lambda ex: ex['_ok'])
      dataset = dataset.map(lambda ex: {k: v for k, v in ex.items() if k != '_ok'})

  def resize(ex):
    return {**ex, 'image': data.preprocess_image(ex['image'], size, method)}
  return dataset.map(resize, num_parallel_calls=tf.data.AUTOTUNE)


def _format(template: str, ex: Mapping[str, tf.Tensor]) -> tf.Tensor:
  parts = []
  for literal, field, spec, conv in string.Formatter().parse(template):
    if literal:
      parts.append(tf.constant(literal))
    if field is not None:
      if spec or conv:
        raise ValueError(f'template {template!r}: format specs are not supported')
      if field not in ex:
        raise KeyError(f'template {template!r} needs field {field!r}; example has '
                       f'{sorted(ex)}')
      parts.append(ex[field])
  return tf.strings.join(parts) if parts else tf.constant('')


def format_prompts(dataset: tf.data.Dataset, *, templates: Sequence[str],
                   target_field: str = 'target') -> tf.data.Dataset:
  """Writes ``inputs`` from ``templates`` (``{field}`` placeholders) and ``targets``.

  Training examples (``is_training``) use a template drawn with seqio's per-example
  stateless seeds, so a fixed ``Task.get_dataset(seed=...)`` gives fixed prompts (on a
  training stream the example's ``_seed``, a function of its position); every other split
  always uses ``templates[0]``.
  """
  templates = list(templates)
  if not templates:
    raise ValueError('format_prompts needs at least one template')

  @seqio.map_over_dataset(num_seeds=1)
  def fn(ex, seed):
    if '_seed' in ex:  # a training stream: the example's own seed, the same after a resume
      seed = ex['_seed']
    out = dict(ex)
    candidates = tf.stack([_format(t, ex) for t in templates])
    if len(templates) == 1:
      idx = tf.constant(0)
    else:
      drawn = tf.random.stateless_uniform([], seed, 0, len(templates), dtype=tf.int32)
      idx = tf.where(ex['is_training'], drawn, 0)
    # No stripping: raw GLUE must equal T5's strings byte for byte.
    out['inputs'] = candidates[idx]
    out['targets'] = ex[target_field]
    out['prompt_index'] = idx
    return out

  return fn(dataset)  # pylint: disable=no-value-for-parameter


def tokenize_text(dataset: tf.data.Dataset,
                  output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """seqio tokenization restricted to the string features (inputs, targets)."""
  feats = _token_features(output_features)
  for feat in feats.values():
    # Read the model here: inside the traced map function a VocabularyNotFoundError would
    # arrive wrapped in autograph's multi-line StagingError.
    getattr(feat.vocabulary, 'load_model', lambda: None)()
  return seqio.preprocessors.tokenize(dataset, feats, copy_pretokenized=True)


def _token_features(output_features: Mapping[str, seqio.Feature]) -> dict[str, seqio.Feature]:
  return {k: v for k, v in output_features.items() if v.dtype == tf.int32 and v.rank == 1}


def prompt_prefix(template: str) -> str:
  """The task prompt's leading words: the literal text before the first ``{field}``.

  'answer en {question}' -> 'answer en'; 'caption en' -> 'caption en' (no field: all of it).
  """
  for literal, field, _, _ in string.Formatter().parse(template):
    return literal.strip() if field is not None else template.strip()
  return ''


def _example_id(ex: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """The example's id as a string (``id`` of image tasks, TFDS ``idx`` of GLUE, else '?'),
  marked ' (train)' on the training split (ids repeat across GLUE's splits)."""
  if 'id' in ex:
    ident = ex['id']
  elif 'idx' in ex:
    ident = tf.strings.as_string(ex['idx'])
  else:
    ident = tf.constant('?')
  if 'is_training' in ex:
    ident = tf.strings.join([ident, tf.where(ex['is_training'], ' (train)', '')])
  return ident


_LENGTH_SETTINGS = {'inputs': 'config.data.text_len', 'targets': 'config.data.target_len'}


def word_starts(vocab: seqio.SentencePieceVocabulary) -> np.ndarray:
  """``bool [vocab_size]``: whether each id begins a word (SentencePiece's '▁' mark; control,
  byte and extra ids count as word starts)."""
  sp = vocab.tokenizer
  base = sp.get_piece_size()
  out = np.ones(vocab.vocab_size, bool)
  out[:base] = [sp.id_to_piece(i).startswith('\u2581') or sp.is_control(i) or sp.is_byte(i)
                for i in range(base)]
  return out


def _cut(tokens: tf.Tensor, budget: int, head: Optional[tf.Tensor],
         starts: Optional[tf.Tensor]) -> tf.Tensor:
  """``[n] -> [<= budget]`` (n > budget): the first ``head`` tokens and the last ``budget - head``
  from the first word start on (no half word after the prompt); ``head=None``: the first
  ``budget`` tokens."""
  if head is None:
    return tokens[:budget]
  head = tf.minimum(head, budget)
  tail = tokens[tf.size(tokens) - (budget - head):]
  is_start = tf.gather(starts, tail)
  # tf.cond, not tf.where: argmax of an empty tail (the prompt prefix fills the budget) fails.
  skip = tf.cond(tf.reduce_any(is_start), lambda: tf.argmax(tf.cast(is_start, tf.int32)),
                 lambda: tf.constant(0, tf.int64))
  return tf.concat([tokens[:head], tail[tf.cast(skip, tf.int32):]], 0)


def _fit_one(tokens, budget: int, head, starts, mode: str, task: str, feature: str, ex_id):
  """Cuts ``tokens [n]`` to at most ``budget`` and counts (or, mode 'error', refuses) a cut."""
  def report(kept, n, ident):
    n, ident = int(n.numpy()), ident.numpy().decode('utf-8', 'replace')
    if mode == 'error':
      raise data.TruncationError(
          f'task {task!r} example {ident}: {feature} has {n} tokens but at most {budget} fit '
          f'({_LENGTH_SETTINGS.get(feature, feature)} minus EOS) and config.data.truncate='
          f"'error'; raise {_LENGTH_SETTINGS.get(feature, feature)} or set "
          "config.data.truncate to 'question_start' or 'end'")
    data.record_truncation(task, feature, ident, n, budget, mode)
    return kept

  def over():
    kept = tf.py_function(report, [_cut(tokens, budget, head, starts), tf.size(tokens), ex_id],
                          Tout=tf.int32)
    kept.set_shape([None])
    return kept
  return tf.cond(tf.size(tokens) > budget, over, lambda: tokens)


def fit_to_length(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                  sequence_length: Optional[Mapping[str, int]] = None, *, task: str,
                  templates: Sequence[str], mode: str) -> tf.data.Dataset:
  """Fits the token features to ``sequence_length`` (room kept for EOS), then appends EOS.

  Replaces seqio's ``append_eos_after_trim`` (which silently keeps the head). ``mode`` (the
  data config's ``truncate``, see ``data.TRUNCATE_MODES``): 'question_start' keeps the
  inputs' prompt prefix (:func:`prompt_prefix` of the example's template, by
  ``prompt_index``) and the end of the rest from a word start on (so the kept inputs may be
  a few tokens shorter than the limit), 'end' keeps the head, 'error' raises
  :class:`data.TruncationError`. Targets keep their head unless 'error'. Every cut is
  counted (``data.truncations()``) under ``task``.
  """
  feats = _token_features(output_features)
  heads = starts = None
  if mode == 'question_start' and 'inputs' in feats and sequence_length:
    # Encoding the prefix alone gives its token count in the full prompt: SentencePiece pieces
    # never span whitespace. Computed here, not at registration, so the vocabulary is only
    # read when a dataset is built.
    vocab = feats['inputs'].vocabulary
    heads = tf.constant([len(vocab.encode(prompt_prefix(t))) for t in templates], tf.int32)
    starts = tf.constant(word_starts(vocab))

  def fn(ex):
    ex = dict(ex)
    for key, feat in feats.items():
      tokens = ex[key]
      limit = (sequence_length or {}).get(key)
      if limit is not None:
        budget = int(limit) - int(feat.add_eos)
        head = (tf.gather(heads, ex['prompt_index'])
                if heads is not None and key == 'inputs' else None)
        tokens = _fit_one(tokens, budget, head, starts, mode, task, key, _example_id(ex))
      if feat.add_eos:
        tokens = tf.concat([tokens, [feat.vocabulary.eos_id]], 0)
      ex[key] = tokens
    return ex

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def image_preprocessors(config: data.DataConfig, bench: str, task: str,
                        templates: Sequence[str]) -> list:
  """Every preprocessor of an image task: decode and resize (``config.image_size``), cache
  point, then :func:`text_chain` (``task``: the registered name; ids by ``bench``)."""
  return [functools.partial(decode_images, dataset_name=bench, size=config.image_size,
                            method=config.resize_method),
          seqio.CacheDatasetPlaceholder(required=False),
          *text_chain(task, templates, TASK_IDS[bench], truncate=config.truncate)]


def add_task_id(dataset: tf.data.Dataset, task_id_value: int) -> tf.data.Dataset:
  """Adds the scalar int32 ``task_id`` feature."""
  tid = tf.constant(task_id_value, tf.int32)
  return dataset.map(lambda ex: {**ex, 'task_id': tid}, num_parallel_calls=tf.data.AUTOTUNE)


def text_chain(task: str, templates: Sequence[str], tid: int, *, truncate: str,
               target_field: str = 'target') -> list:
  """Prompting, tokenization, fitting to length + EOS and the task id: the tail of every task's
  preprocessors (``task``: its registered name, under which truncations are counted;
  ``truncate``: the data config's mode, see :func:`fit_to_length`)."""
  templates = tuple(templates)
  return [
      functools.partial(format_prompts, templates=templates, target_field=target_field),
      tokenize_text,
      functools.partial(fit_to_length, task=task, templates=templates, mode=truncate),
      functools.partial(add_task_id, task_id_value=tid),
  ]


# ---------------------------------------------------------------------------- postprocessing


def _to_str(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def references_postprocessor(output: Any, example: Optional[Mapping[str, Any]] = None,
                             is_target: bool = False) -> Any:
  """Targets -> the example's list of reference strings (``answers``); predictions -> str."""
  if is_target:
    if example is None or 'answers' not in example:
      raise ValueError('evaluation targets need the example\'s "answers" feature '
                       '(all references); got none')
    return [_to_str(a) for a in np.asarray(example['answers']).reshape(-1)]
  return _to_str(output).strip()


# ----------------------------------------------------------------------------- registration

_REGISTERED_TASKS: list[str] = []
_REGISTERED_MIXTURES: list[str] = []


# Task name -> its label words, for tasks scored by rank classification too (see
# adalink_jax.evaluation.EvalTask); seqio tasks have no field for them.
LABEL_WORDS: dict[str, tuple[str, ...]] = {}


def add_task(name: str, label_words: Sequence[str] = (), **kwargs) -> seqio.Task:
  """(Re)registers a task; remembered so :func:`clear_registrations` can undo it.
  ``label_words``: a classification task's answers, in class order."""
  seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(name, **kwargs)
  if label_words:
    LABEL_WORDS[name] = tuple(label_words)
  else:
    LABEL_WORDS.pop(name, None)
  if name not in _REGISTERED_TASKS:
    _REGISTERED_TASKS.append(name)
  return task


def add_mixture(name: str, tasks: Sequence[tuple[str, float]]) -> seqio.Mixture:
  """(Re)registers a mixture of ``(task_name, rate)`` pairs."""
  seqio.MixtureRegistry.remove(name)
  mixture = seqio.MixtureRegistry.add(name, list(tasks))
  if name not in _REGISTERED_MIXTURES:
    _REGISTERED_MIXTURES.append(name)
  return mixture


def clear_registrations() -> None:
  """Removes every task and mixture this package registered."""
  for name in _REGISTERED_MIXTURES:
    seqio.MixtureRegistry.remove(name)
  for name in _REGISTERED_TASKS:
    seqio.TaskRegistry.remove(name)
  _REGISTERED_MIXTURES.clear()
  _REGISTERED_TASKS.clear()

