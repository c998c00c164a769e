"""Evaluation metrics, computed by the official scorers or the libraries the references use (0-100).

* Captioning (COCO caption evaluation): :func:`caption_metrics`, :func:`cider` (CIDEr-D),
  :func:`bleu4`, :func:`rouge_l` call pycocoevalcap's own Bleu, Cider, Rouge and (where Java
  exists) Meteor scorers on PTB-tokenised text.
* VQA (GT-Vision-Lab vqaEval.py; VQAv2, OK-VQA, TextVQA): :func:`vqa_accuracy`, reimplemented
  because upstream is a Python 2 class bound to its JSON files; its rules are tested one by one.
* ST-VQA / DocVQA: :func:`anls`.
* GLUE, as T5 computes it (sklearn / scipy): :func:`accuracy`, :func:`f1_score_with_invalid`,
  :func:`matthews_corrcoef`, :func:`pearson_corrcoef`, :func:`spearman_corrcoef`,
  :func:`glue_average`, plus T5's postprocessors :func:`string_to_float` and
  :func:`string_label_to_class_id`.

Every ``seqio_*`` function has seqio's metric signature ``fn(targets, predictions) -> dict``.
pycocoevalcap, scikit-learn and scipy are imported when a metric first needs them.

Tokenisation: :mod:`adalink_jax.ptb_tokenizer` (pycocoevalcap's CoreNLP jar through Java when
present, else a tested pure-Python port).
"""
from __future__ import annotations

import collections
import importlib
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from adalink_jax.ptb_tokenizer import java_available, ptb_tokenize

# ------------------------------------------------------------------------------------------------
# CIDEr-D, BLEU-1..4, ROUGE-L, METEOR: pycocoevalcap's own scorers
# ------------------------------------------------------------------------------------------------

_COCO_SCORERS = {'bleu': ('pycocoevalcap.bleu.bleu', 'Bleu'),
                 'cider': ('pycocoevalcap.cider.cider', 'Cider'),
                 'rouge': ('pycocoevalcap.rouge.rouge', 'Rouge'),
                 'meteor': ('pycocoevalcap.meteor.meteor', 'Meteor')}


def _coco_scorer(name: str):
  """A pycocoevalcap scorer class, imported when first needed (only scoring needs it)."""
  module, cls = _COCO_SCORERS[name]
  try:
    return getattr(importlib.import_module(module), cls)
  except ImportError as e:
    raise ImportError(f'caption metrics use pycocoevalcap\'s scorers: pip install '
                      f'pycocoevalcap==1.2 ({e})') from e


CaptionDicts = Tuple[Dict[int, List[str]], Dict[int, List[str]]]


def _prepare_captions(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      tokenizer: Optional[str]) -> CaptionDicts:
  """Validates and PTB-tokenises (refs and predictions in one call each, as COCOEvalCap).

  Returns pycocoevalcap's inputs: ``gts`` {i: [reference, ...]} and ``res`` {i: [prediction]}.
  """
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} reference lists')
  if not predictions:
    raise ValueError('no captions to score')
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f'references[{i}] must be a non-empty list of strings, got {refs!r}')
  flat = [r for refs in references for r in refs]
  preds = list(predictions)
  for what, texts in (('prediction', preds), ('reference', flat)):
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f'{what} {i} is {type(t).__name__}, expected str: {t!r}')
  if tokenizer is not None:
    flat, preds = ptb_tokenize(flat, tokenizer), ptb_tokenize(preds, tokenizer)
  gts, k = {}, 0
  for i, refs in enumerate(references):
    gts[i] = flat[k:k + len(refs)]
    k += len(refs)
  return gts, {i: [p] for i, p in enumerate(preds)}


def _meteor(gts, res) -> Tuple[float, List[float]]:
  """pycocoevalcap Meteor (a Java subprocess; the scorer closes it when collected)."""
  if not java_available():
    raise RuntimeError('METEOR needs `java` on PATH (e.g. apt-get install default-jre-headless); '
                       'or pass meteor=False')
  scorer = _coco_scorer('meteor')()
  try:
    return scorer.compute_score(gts, res)
  except (ValueError, OSError) as e:  # The jar died (e.g. no memory for -Xmx2G): no score.
    if scorer.lock.locked():  # compute_score keeps it on error and Meteor.__del__ waits on it.
      scorer.lock.release()
    raise RuntimeError(f'METEOR (pycocoevalcap meteor-1.5.jar) returned no score ({e}); '
                       'check `java -Xmx2G -version`, or pass meteor=False') from e


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    tokenizer: Optional[str] = 'auto',
                    meteor: Optional[bool] = None) -> Dict[str, float]:
  """CIDEr(-D), BLEU-1..4, ROUGE-L and METEOR (0-100) from the COCO caption evaluation's scorers.

  Args:
    predictions: one caption per image.
    references: a non-empty list of reference captions per image.
    tokenizer: PTB backend for :func:`ptb_tokenize` ('auto', 'java', 'python'), or None when the
      inputs are already tokenised (space-separated tokens).
    meteor: add 'meteor' (needs Java); None adds it exactly when ``java`` is on PATH.
  """
  gts, res = _prepare_captions(predictions, references, tokenizer)
  bleus, _ = _coco_scorer('bleu')(4).compute_score(gts, res, verbose=0)
  out = {'cider': 100 * float(_coco_scorer('cider')().compute_score(gts, res)[0]),
         'rouge_l': 100 * float(_coco_scorer('rouge')().compute_score(gts, res)[0])}
  out.update({f'bleu{k + 1}': 100 * float(b) for k, b in enumerate(bleus)})
  if meteor or (meteor is None and java_available()):
    out['meteor'] = 100 * float(_meteor(gts, res)[0])
  return out


def _scaled(mean, per, return_per_example):
  per = 100 * np.asarray(per, np.float64)
  return (100 * float(mean), per) if return_per_example else 100 * float(mean)


def cider(predictions, references, tokenizer='auto', return_per_example=False):
  """CIDEr-D x 100 (pycocoevalcap Cider: n=4, sigma=6, corpus document frequencies).

  With ``return_per_example`` also returns the per-image scores (same scale) as an array.
  """
  gts, res = _prepare_captions(predictions, references, tokenizer)
  return _scaled(*_coco_scorer('cider')().compute_score(gts, res), return_per_example)


def bleu4(predictions, references, tokenizer='auto', return_per_example=False):
  """Corpus BLEU-4 x 100 (pycocoevalcap Bleu(4), 'closest' reference length)."""
  gts, res = _prepare_captions(predictions, references, tokenizer)
  corpus, per = _coco_scorer('bleu')(4).compute_score(gts, res, verbose=0)
  return _scaled(corpus[3], per[3], return_per_example)


def rouge_l(predictions, references, tokenizer='auto', return_per_example=False):
  """ROUGE-L x 100 (pycocoevalcap Rouge, beta=1.2), mean over images."""
  gts, res = _prepare_captions(predictions, references, tokenizer)
  return _scaled(*_coco_scorer('rouge')().compute_score(gts, res), return_per_example)


# ------------------------------------------------------------------------------------------------
# VQA accuracy (official vqaEval.py: VQAv2, OK-VQA, TextVQA)
# ------------------------------------------------------------------------------------------------

# Contractions: every form with exactly one apostrophe dropped maps to the full form (so
# "dont"/"don't", "youd've"/"you'dve" -> ...). Mixed-case keys are kept although inputs are
# lowercased first, as upstream. Plus upstream's three irregular entries.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll "
    "ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at "
    "shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll that's "
    "there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd "
    "who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've").split()
VQA_CONTRACTIONS = {w[:i] + w[i + 1:]: w for w in _CONTRACTED for i, c in enumerate(w) if c == "'"}
VQA_CONTRACTIONS.update({"let's": "let's", "she's": "she's", "somebody'd": 'somebodyd'})
VQA_NUMBERS = {w: str(i) for i, w in enumerate(
    'zero one two three four five six seven eight nine ten'.split())}
VQA_NUMBERS['none'] = '0'
_VQA_ARTICLES = frozenset(['a', 'an', 'the'])
_VQA_PUNCT = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@',
              '`', ',', '?', '!']
_VQA_COMMA_DIGITS = re.compile(r'(\d)(,)(\d)')
# Upstream's pattern, lookbehind typo included: it strips any '.' not followed by a digit.
_VQA_PERIOD = re.compile(r'(?!<=\d)(\.)(?!\d)')


def vqa_process_punctuation(text: str) -> str:
  """vqaEval.processPunctuation: each mark is deleted if it touches a space (or the text has a
  digit,digit comma), else replaced by a space; then periods not followed by a digit go."""
  out = text
  strip_all = _VQA_COMMA_DIGITS.search(text) is not None
  for p in _VQA_PUNCT:
    out = out.replace(p, '' if (strip_all or p + ' ' in text or ' ' + p in text) else ' ')
  return _VQA_PERIOD.sub('', out, count=32)  # Upstream passes re.UNICODE (=32) as `count`.


def vqa_process_digit_article(text: str) -> str:
  """vqaEval.processDigitArticle: lowercase, number words -> digits, drop articles, contractions."""
  words = [VQA_NUMBERS.get(w, w) for w in text.lower().split()]
  return ' '.join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def _vqa_strip(text: str) -> str:
  """vqaEval's first step: newlines and tabs become spaces, outer whitespace goes."""
  return text.replace('\n', ' ').replace('\t', ' ').strip()


def vqa_normalize_answer(answer: str) -> str:
  """Full vqaEval normalisation: strip, processPunctuation, processDigitArticle."""
  return vqa_process_digit_article(vqa_process_punctuation(_vqa_strip(answer)))


#: 'current': vqaEval.py since GT-Vision-Lab/VQA commit a013f00 "Fixed processing answers bug"
#: (2021, HEAD). '2016': the version before it (458a8b2, Oct 2016), to compare with numbers it gave.
VQA_RULES = ('current', '2016')


def _vqa_compared(pred: str, answers: List[str], rule: str) -> Tuple[str, List[str]]:
  """The prediction and the human answers in the form vqaEval compares them (string equality)."""
  if rule == '2016':  # Prediction always normalised; answers only punctuation-processed, unstripped.
    if len(set(answers)) > 1:
      answers = [vqa_process_punctuation(a) for a in answers]
    return vqa_normalize_answer(pred), answers
  pred, answers = _vqa_strip(pred), [_vqa_strip(a) for a in answers]
  if len(set(answers)) > 1:  # Not unanimous: both sides fully normalised.
    return vqa_normalize_answer(pred), [vqa_normalize_answer(a) for a in answers]
  return pred, answers  # Unanimous (after stripping): neither side is processed.


def vqa_accuracy(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]],
                 return_per_example: bool = False, rule: str = 'current'):
  """Official VQA accuracy x 100 (VQAv2, OK-VQA, TextVQA), per GT-Vision-Lab vqaEval.py.

  Per question (``rule='current'``, vqaEval.py at HEAD): prediction and human answers have
  newlines/tabs turned into spaces and are stripped; when the human answers are not all identical,
  both sides then get processPunctuation and processDigitArticle, otherwise neither does. The score
  is the mean over annotators i of min(1, #{j != i: answer_j == prediction} / 3).
  ``rule='2016'`` is the older scorer (prediction always normalised, human answers only
  punctuation-processed and only when not unanimous). Upstream rounds the final number to 2
  decimals for display; we return it unrounded.
  """
  if rule not in VQA_RULES:
    raise ValueError(f'vqa_accuracy rule={rule!r}; choose from {VQA_RULES}')
  if len(predictions) != len(answer_lists):
    raise ValueError(f'{len(predictions)} predictions but {len(answer_lists)} answer lists')
  scores = []
  for q, (pred, answers) in enumerate(zip(predictions, answer_lists)):
    if isinstance(answers, str) or not answers:
      raise ValueError(f'answer_lists[{q}] must be a non-empty list of strings, got {answers!r}')
    if not isinstance(pred, str) or not all(isinstance(a, str) for a in answers):
      raise TypeError(f'question {q}: prediction and answers must be str, got {pred!r}, {answers!r}')
    pred, answers = _vqa_compared(pred, list(answers), rule)
    matches = [a == pred for a in answers]
    total = sum(matches)
    scores.append(float(np.mean([min(1.0, (total - m) / 3.0) for m in matches])))
  per = 100 * np.array(scores)
  if not len(per):
    raise ValueError('no questions to score')
  return (float(np.mean(per)), per) if return_per_example else float(np.mean(per))


# ------------------------------------------------------------------------------------------------
# ANLS (ST-VQA / DocVQA)
# ------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
  """Edit distance over characters (insert/delete/substitute, unit costs), by ``editdistance``
  (a seqio dependency)."""
  import editdistance  # pylint: disable=g-import-not-at-top
  return int(editdistance.eval(a, b))


def anls(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]], threshold: float = 0.5,
         return_per_example: bool = False):
  """Average Normalised Levenshtein Similarity x 100, as the official ST-VQA/DocVQA scripts.

  Per question: s = 1 - min over answers of NL, NL = lev(a', p') / max(len(a), len(p)) where x' is
  x stripped, lowercased and whitespace-collapsed and the lengths are of the raw strings (as
  upstream); s is zeroed when s < threshold (so NL = 0.5 still scores 0.5, as upstream).
  """
  if len(predictions) != len(answer_lists):
    raise ValueError(f'{len(predictions)} predictions but {len(answer_lists)} answer lists')
  scores = []
  for q, (pred, answers) in enumerate(zip(predictions, answer_lists)):
    if isinstance(answers, str) or not answers:
      raise ValueError(f'answer_lists[{q}] must be a non-empty list of strings, got {answers!r}')
    p = ' '.join(pred.strip().lower().split())
    nls = []
    for ans in answers:
      length = max(len(ans.upper()), len(pred.upper()))
      nls.append(0.0 if length == 0 else
                 levenshtein(' '.join(ans.strip().lower().split()), p) / float(length))
    s = 1 - min(nls)
    scores.append(0.0 if s < threshold else s)
  per = 100 * np.array(scores)
  if not len(per):
    raise ValueError('no questions to score')
  return (float(np.mean(per)), per) if return_per_example else float(np.mean(per))


# ------------------------------------------------------------------------------------------------
# GLUE (as T5's t5.evaluation.metrics / t5.data.postprocessors)
# ------------------------------------------------------------------------------------------------


def string_to_float(string: Any, default: float = -1.0, **unused_kwargs) -> float:
  """T5's STS-B postprocessor: float(string), or ``default`` when that raises ValueError."""
  try:
    return float(string)
  except ValueError:
    return default


def string_label_to_class_id(string_label: Any, label_classes: Sequence[str], default: int = -1,
                             **unused_kwargs) -> int:
  """T5's classification postprocessor: index of the label name, ``default`` if unknown."""
  return list(label_classes).index(string_label) if string_label in label_classes else default


def _pair(targets, predictions) -> Tuple[np.ndarray, np.ndarray]:
  t, p = np.asarray(targets), np.asarray(predictions)
  if t.shape != p.shape or t.ndim != 1:
    raise ValueError(f'targets {t.shape} and predictions {p.shape} must be equal-length 1-D')
  if not len(t):
    raise ValueError('no examples to score')
  return t, p


def _sklearn_metrics():
  try:
    import sklearn.metrics  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'GLUE metrics use scikit-learn: pip install scikit-learn ({e})') from e
  return sklearn.metrics


def accuracy(targets, predictions) -> float:
  """100 * fraction of exact matches (sklearn accuracy_score, as T5)."""
  t, p = _pair(targets, predictions)
  return 100 * float(_sklearn_metrics().accuracy_score(t, p))


def f1_score_with_invalid(targets, predictions) -> float:
  """T5's binary F1 x 100 (sklearn f1_score, positive class 1); predictions other than 0/1 count
  as the wrong class. No positive at all scores 0 (sklearn's zero_division value)."""
  t, p = _pair(targets, predictions)
  p = np.where((p != 0) & (p != 1), 1 - t, p)
  return 100 * float(_sklearn_metrics().f1_score(t, p, zero_division=0.0))


def matthews_corrcoef(targets, predictions) -> float:
  """Matthews correlation x 100 (sklearn matthews_corrcoef; an invalid label is one more class)."""
  t, p = _pair(targets, predictions)
  return 100 * float(_sklearn_metrics().matthews_corrcoef(t, p))


def pearson_corrcoef(targets, predictions) -> float:
  """Pearson r x 100 (scipy.stats.pearsonr, as T5); NaN with scipy's ConstantInputWarning when
  either side is constant (the correlation is undefined)."""
  import scipy.stats  # pylint: disable=g-import-not-at-top
  t, p = _pair(targets, predictions)
  return 100 * float(scipy.stats.pearsonr(t.astype(np.float64), p.astype(np.float64))[0])


def spearman_corrcoef(targets, predictions) -> float:
  """Spearman rho x 100 (scipy.stats.spearmanr, as T5)."""
  import scipy.stats  # pylint: disable=g-import-not-at-top
  t, p = _pair(targets, predictions)
  return 100 * float(scipy.stats.spearmanr(t.astype(np.float64), p.astype(np.float64))[0])


_GLUE_TASKS = ('cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'mnli', 'qnli', 'rte', 'wnli')


def glue_average(scores_by_task: Mapping[str, Any]) -> float:
  """GLUE score: mean over tasks of each task's mean metric (T5's eval_utils convention).

  ``scores_by_task`` maps a task name ('cola', 'glue_mrpc_v002', 'mnli_matched', ...; a 'glue_'
  prefix and '_vNNN' suffix are ignored) to a value or a {metric: value} dict. Tasks with two
  metrics (MRPC/QQP F1 + accuracy, STS-B Pearson + Spearman) are averaged first; MNLI matched and
  mismatched form one task (their mean), as in T5 and the GLUE leaderboard. WNLI counts when
  given (the leaderboard includes it; T5's validation average has no WNLI); AX is not a task.
  """
  groups: Dict[str, List[float]] = collections.defaultdict(list)
  for name, value in scores_by_task.items():
    task = re.sub(r'_v\d+$', '', re.sub(r'^glue_', '', name.lower()))
    task = 'mnli' if task in ('mnli_matched', 'mnli_mismatched', 'mnli_m', 'mnli_mm') else task
    if task not in _GLUE_TASKS:
      raise ValueError(f'unknown GLUE task {name!r}; known: {_GLUE_TASKS} (+ mnli_(mis)matched)')
    values = list(value.values()) if isinstance(value, Mapping) else [value]
    if not values:
      raise ValueError(f'no metrics for GLUE task {name!r}')
    groups[task].append(float(np.mean(values)))
  if not groups:
    raise ValueError('no GLUE tasks given')
  return float(np.mean([np.mean(v) for v in groups.values()]))


# ------------------------------------------------------------------------------------------------
# seqio metric functions: fn(targets, predictions) -> {name: value}
# ------------------------------------------------------------------------------------------------


def seqio_caption_metrics(targets, predictions):
  """targets: list of reference-caption lists; predictions: captions."""
  return caption_metrics(predictions, targets)


def seqio_vqa_accuracy(targets, predictions):
  """targets: list of human-answer lists; predictions: answers."""
  return {'vqa_accuracy': vqa_accuracy(predictions, targets)}


def seqio_anls(targets, predictions):
  """targets: list of answer lists; predictions: answers."""
  return {'anls': anls(predictions, targets)}


def seqio_accuracy(targets, predictions):
  return {'accuracy': accuracy(targets, predictions)}


def seqio_f1_with_invalid(targets, predictions):
  return {'f1': f1_score_with_invalid(targets, predictions)}


def seqio_matthews_corrcoef(targets, predictions):
  return {'matthews_corrcoef': matthews_corrcoef(targets, predictions)}


def seqio_pearson_corrcoef(targets, predictions):
  return {'pearson_corrcoef': pearson_corrcoef(targets, predictions)}


def seqio_spearman_corrcoef(targets, predictions):
  return {'spearman_corrcoef': spearman_corrcoef(targets, predictions)}


#: T5's GLUE metric functions per task (predictions already mapped by the postprocessors above).
GLUE_METRIC_FNS: Dict[str, List[Callable[..., Dict[str, float]]]] = {
    'cola': [seqio_matthews_corrcoef], 'sst2': [seqio_accuracy],
    'mrpc': [seqio_f1_with_invalid, seqio_accuracy],
    'stsb': [seqio_pearson_corrcoef, seqio_spearman_corrcoef],
    'qqp': [seqio_f1_with_invalid, seqio_accuracy], 'mnli': [seqio_accuracy],
    'mnli_matched': [seqio_accuracy], 'mnli_mismatched': [seqio_accuracy], 'qnli': [seqio_accuracy],
    'rte': [seqio_accuracy], 'wnli': [seqio_accuracy], 'ax': [],  # AX: test labels are hidden.
}
