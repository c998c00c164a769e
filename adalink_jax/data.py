"""Data plumbing shared by every task: where the data lives, the vocabulary, images, batches.

* **Locations** come from configuration: :func:`set_data_dirs` (or ``ADALINK_DATA_<KEY>``
  environment variables, e.g. ``ADALINK_DATA_VQAV2=/data/vqa``) and :func:`configure` for the
  TFDS data dir, image size, vocabulary and prompt style. Nothing is read at import time;
  a missing file raises :class:`DataNotFoundError` naming the files, the folder searched and
  the official download pages.
* **Vocabulary**: a SentencePiece model from ``configure(vocab_path=...)`` (``config.data.vocab``
  in experiment configs); the default is T5's public ``cc_all.32000.100extra`` model on Google
  Cloud Storage plus 100 sentinel ids (32100 ids). A model that cannot be read raises
  :class:`VocabularyNotFoundError` naming the setting, the path and how to use a local file.
* **Images** are decoded by TensorFlow, resized (bilinear, aspect ratio not kept, as PaLI /
  big_vision do) to ``image_size`` x ``image_size`` and scaled to [-1, 1]. An unreadable or
  corrupt file skips its example; skips are counted per dataset (:func:`skipped_images`) and
  summarised at interpreter exit.
* **Truncation**: token sequences longer than the configured lengths are cut as
  ``configure(truncate=...)`` says (see ``TRUNCATE_MODES``) by the tasks' ``fit_to_length``
  step; every cut is counted per task and feature (:func:`truncations`) and summarised at exit.
  :func:`data_report` returns both counters (for ``result.json``).
* :class:`PaLIFeatureConverter` turns task examples into model batches.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import threading
from typing import Callable, Mapping, Optional, Sequence

from google.protobuf.message import DecodeError

from adalink_jax.config_lib import DATA_DIR_KEYS  # noqa: F401  (one config field per key)
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

# Official sources, quoted in DataNotFoundError messages.
DOWNLOAD_HINTS: dict[str, str] = {
    'coco': ('COCO 2014 images: http://images.cocodataset.org/zips/train2014.zip and '
             'http://images.cocodataset.org/zips/val2014.zip (unzip to <coco>/train2014, '
             '<coco>/val2014)'),
    'vqav2': ('VQAv2 (https://visualqa.org/download.html): '
              'https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Questions_{Train,Val}_mscoco.zip '
              'and https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Annotations_{Train,Val}'
              '_mscoco.zip; images from COCO 2014 (data dir key "coco")'),
    'okvqa': ('OK-VQA (https://okvqa.allenai.org/download.html): '
              'https://okvqa.allenai.org/static/data/OpenEnded_mscoco_{train,val}2014_questions'
              '.json.zip and https://okvqa.allenai.org/static/data/mscoco_{train,val}2014_'
              'annotations.json.zip; images from COCO 2014 (data dir key "coco")'),
    'textvqa': ('TextVQA (https://textvqa.org/dataset/): '
                'https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_{train,val}.json and '
                'https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip '
                '(unzips to train_images/)'),
    'textcaps': ('TextCaps (https://textvqa.org/textcaps/): '
                 'https://dl.fbaipublicfiles.com/textvqa/data/textcaps/TextCaps_0.1_{train,val}'
                 '.json; images are TextVQA\'s '
                 'https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip '
                 '(train_images/)'),
    'stvqa': ('ST-VQA task 3 (https://rrc.cvc.uab.es/?ch=11, registration required): '
              'train_task_3.json and train_images/'),
    'docvqa': ('DocVQA (https://rrc.cvc.uab.es/?ch=17, registration required): '
               '{train,val}_v1.0_withQT.json (or {train,val}_v1.0.json) and the documents/ '
               'image folders of each split'),
    'coco_captions': ('TFDS coco_captions (Karpathy splits): run `tfds build coco_captions '
                      '--data_dir=<tfds_data_dir>`; it downloads COCO 2014 from '
                      'http://images.cocodataset.org and the splits from '
                      'https://cs.stanford.edu/people/karpathy/deepimagesent/'
                      'caption_datasets.zip'),
    'glue': ('TFDS glue (https://gluebenchmark.com/tasks): run `tfds build glue '
             '--data_dir=<tfds_data_dir>`'),
}


class DataNotFoundError(FileNotFoundError):
  """Raised when a configured (or unconfigured) data location lacks the expected files."""


class NoExamplesError(DataNotFoundError):
  """Raised when a dataset yields no usable example (e.g. every image was unreadable)."""


class VocabularyNotFoundError(FileNotFoundError):
  """Raised when the configured SentencePiece model cannot be read."""


class TruncationError(ValueError):
  """Raised (with ``truncate='error'``) for an example longer than its sequence length."""


@dataclasses.dataclass
class DataConfig:
  """Process-wide data settings. Change them with :func:`configure` / :func:`set_data_dirs`."""
  data_dirs: dict[str, str] = dataclasses.field(default_factory=dict)
  tfds_data_dir: Optional[str] = None
  vocab_path: str = DEFAULT_VOCAB_PATH
  extra_ids: int = DEFAULT_EXTRA_IDS
  image_size: int = 224
  resize_method: str = 'bilinear'
  prompt_style: str = 'raw'
  truncate: str = 'question_start'


def _config_from_env() -> DataConfig:
  env = os.environ
  dirs = {k: env[f'ADALINK_DATA_{k.upper()}'] for k in DATA_DIR_KEYS
          if env.get(f'ADALINK_DATA_{k.upper()}')}
  cfg = DataConfig(data_dirs=dirs, tfds_data_dir=env.get('ADALINK_TFDS_DATA_DIR') or None)
  if env.get('ADALINK_VOCAB'):
    cfg.vocab_path = env['ADALINK_VOCAB']
  if env.get('ADALINK_EXTRA_IDS'):
    cfg.extra_ids = int(env['ADALINK_EXTRA_IDS'])
  if env.get('ADALINK_IMAGE_SIZE'):
    cfg.image_size = int(env['ADALINK_IMAGE_SIZE'])
  if env.get('ADALINK_PROMPT_STYLE'):
    cfg.prompt_style = env['ADALINK_PROMPT_STYLE']
  return cfg


_CONFIG = _config_from_env()
_VOCAB_CALLBACKS: list[Callable[[], None]] = []
if _CONFIG.tfds_data_dir:
  seqio.set_tfds_data_dir_override(_CONFIG.tfds_data_dir)


def config() -> DataConfig:
  """Returns a copy of the current data configuration."""
  return dataclasses.replace(_CONFIG, data_dirs=dict(_CONFIG.data_dirs))


def set_data_dirs(dirs: Mapping[str, Optional[str]]) -> None:
  """Sets data folders by key (see ``DATA_DIR_KEYS``); ``None`` unsets one.

  Example: ``set_data_dirs({'coco': '/data/coco2014', 'vqav2': '/data/vqav2'})``.
  """
  unknown = sorted(set(dirs) - set(DATA_DIR_KEYS))
  if unknown:
    raise ValueError(f'unknown data dir key(s) {unknown}; known keys: {list(DATA_DIR_KEYS)}')
  for k, v in dirs.items():
    if v is None:
      _CONFIG.data_dirs.pop(k, None)
    else:
      _CONFIG.data_dirs[k] = os.fspath(v)


def configure(*, tfds_data_dir: Optional[str] = None, vocab_path: Optional[str] = None,
              extra_ids: Optional[int] = None, image_size: Optional[int] = None,
              resize_method: Optional[str] = None, prompt_style: Optional[str] = None,
              data_dirs: Optional[Mapping[str, Optional[str]]] = None,
              truncate: Optional[str] = None) -> DataConfig:
  """Updates the given settings (others unchanged) and returns the new configuration.

  Changing the vocabulary re-registers every task (callbacks from :func:`on_vocabulary_change`)
  so that ``seqio.get_mixture_or_task(name)`` always tokenizes with the configured model.
  """
  if image_size is not None:
    if int(image_size) <= 0:
      raise ValueError(f'image_size must be positive, got {image_size}')
    _CONFIG.image_size = int(image_size)
  if resize_method is not None:
    _CONFIG.resize_method = resize_method
  if prompt_style is not None:
    if prompt_style not in PROMPT_STYLES:
      raise ValueError(f'prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}')
    _CONFIG.prompt_style = prompt_style
  if truncate is not None:
    if truncate not in TRUNCATE_MODES:
      raise ValueError(f'truncate (config.data.truncate) must be one of {TRUNCATE_MODES}, '
                       f'got {truncate!r}')
    _CONFIG.truncate = truncate
  if tfds_data_dir is not None:  # '' unsets it (back to TFDS's own default / $TFDS_DATA_DIR)
    _CONFIG.tfds_data_dir = os.fspath(tfds_data_dir) or None
    # seqio's TfdsDataSource reads this override lazily, at dataset build time.
    seqio.set_tfds_data_dir_override(_CONFIG.tfds_data_dir)
  if data_dirs is not None:
    set_data_dirs(data_dirs)
  vocab_changed = False
  if vocab_path is not None and vocab_path != _CONFIG.vocab_path:
    _CONFIG.vocab_path, vocab_changed = os.fspath(vocab_path), True
  if extra_ids is not None and extra_ids != _CONFIG.extra_ids:
    _CONFIG.extra_ids, vocab_changed = int(extra_ids), True
  if vocab_changed:
    for cb in list(_VOCAB_CALLBACKS):
      cb()
  return config()


def on_vocabulary_change(callback: Callable[[], None]) -> None:
  """Registers ``callback()`` to run after the vocabulary setting changes."""
  if callback not in _VOCAB_CALLBACKS:
    _VOCAB_CALLBACKS.append(callback)


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
          'adalink_jax.data.configure(vocab_path=...) or the ADALINK_VOCAB variable)')


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


_VOCABS: dict[tuple[str, int], seqio.SentencePieceVocabulary] = {}


def get_vocabulary() -> seqio.SentencePieceVocabulary:
  """The configured SentencePiece vocabulary (one shared instance per path and extra_ids).

  The model file is only read on first use, so a ``gs://`` default costs nothing until then;
  a file that cannot be read raises :class:`VocabularyNotFoundError` at that first use.
  """
  key = (_CONFIG.vocab_path, _CONFIG.extra_ids)
  if key not in _VOCABS:
    _VOCABS[key] = _Vocabulary(key[0], extra_ids=key[1])
  return _VOCABS[key]


# ------------------------------------------------------------------------------ locations


def data_dir(key: str, *, expected: Sequence[str] = (), hint_key: Optional[str] = None) -> str:
  """Returns the configured folder for ``key``, raising a helpful error if it is unusable.

  Args:
    key: a ``DATA_DIR_KEYS`` entry.
    expected: paths relative to the folder that must exist (files or folders); the error
      lists the missing ones.
    hint_key: which ``DOWNLOAD_HINTS`` entry to quote (default: ``key``).
  """
  hint = DOWNLOAD_HINTS.get(hint_key or key, '')
  root = _CONFIG.data_dirs.get(key)
  if not root:
    raise DataNotFoundError(
        f'no data directory configured for {key!r}. Call adalink_jax.data.set_data_dirs('
        f'{{{key!r}: "/path/to/{key}"}}) or set ADALINK_DATA_{key.upper()}. Expected under it: '
        f'{list(expected)}. Get the data from: {hint}')
  missing = [p for p in expected if not tf.io.gfile.exists(os.path.join(root, p))]
  if missing:
    present = sorted(tf.io.gfile.listdir(root))[:20] if tf.io.gfile.isdir(root) else None
    where = ('it does not exist' if present is None else f'it contains {present}')
    raise DataNotFoundError(
        f'data for {key!r} not found: expected {missing} under {root!r} ({where}). '
        f'Get the data from: {hint}')
  return root


def first_existing(root: str, candidates: Sequence[str], key: str) -> str:
  """Returns ``root/c`` for the first candidate that exists, else raises naming all of them."""
  for c in candidates:
    path = os.path.join(root, c)
    if tf.io.gfile.exists(path):
      return path
  raise DataNotFoundError(
      f'data for {key!r} not found: expected one of {list(candidates)} under {root!r}. '
      f'Get the data from: {DOWNLOAD_HINTS.get(key, "")}')


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


def data_dir_key_of(path: str) -> Optional[str]:
  """The configured data-dir key whose folder contains ``path`` (the most specific one)."""
  hits = [(len(d), k) for k, d in _CONFIG.data_dirs.items()
          if d and (path == d or path.startswith(d.rstrip('/') + '/'))]
  return max(hits)[1] if hits else None


# ----------------------------------------------------------------------------- truncation

_TRUNC_LOCK = threading.Lock()
# task -> feature -> ids of the distinct examples cut (an example re-read each epoch, or by
# the two passes of an eval, counts once, like the distinct files of the image skips).
_TRUNCATED: dict[str, dict[str, set[str]]] = collections.defaultdict(
    lambda: collections.defaultdict(set))


def record_truncation(task: str, feature: str, example_id: str, length: int,
                      limit: int) -> None:
  """Counts the over-long ``feature`` ('inputs' / 'targets') of one example of ``task``.

  Called from the pipeline (``tasks.common.fit_to_length``) for every cut; the first few
  distinct examples per task are logged with their lengths.
  """
  with _TRUNC_LOCK:
    ids = _TRUNCATED[task][feature]
    if example_id in ids:
      return
    ids.add(example_id)
    n = sum(len(v) for v in _TRUNCATED[task].values())
  if n <= _MAX_WARNINGS_PER_DATASET:
    logging.warning('[%s] example %s: %s truncated: %d tokens, room for %d before EOS '
                    '(truncate=%r)', task, example_id, feature, length, limit, _CONFIG.truncate)
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


def preprocess_image(image: tf.Tensor, size: Optional[int] = None,
                     method: Optional[str] = None) -> tf.Tensor:
  """``uint8 [h, w, 3]`` -> ``float32 [size, size, 3]`` in [-1, 1] (PaLI / big_vision style).

  Bilinear resize without antialiasing (big_vision's ``resize`` default); the range map is
  ``x / 127.5 - 1``, so 0 -> -1 and 255 -> 1 exactly.
  """
  size = size or _CONFIG.image_size
  method = method or _CONFIG.resize_method
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

  ``image_size`` defaults to the configured size (``configure(image_size=...)``, the size the
  tasks resize to). ``task_feature_lengths`` need only ``inputs`` and ``targets``. ``pack=True`` (seqio packing: ``*_segment_ids``, ``*_positions``) works for
  text-only tasks without task ids, exactly like ``seqio.EncDecFeatureConverter(pack=True)``.
  """

  def __init__(self, image_size: Optional[int] | str = 'configured',
               with_task_id: bool = True, pack: bool = False, **kwargs):
    if image_size == 'configured':
      image_size = _CONFIG.image_size
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
