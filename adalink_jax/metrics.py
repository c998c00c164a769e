"""Evaluation metrics that reproduce the official scorers to the last decimal (0-100 scale).

* Captioning (COCO caption evaluation, pycocoevalcap): :func:`cider` (CIDEr-D), :func:`bleu4`
  (BLEU-4, 'closest' reference length), :func:`rouge_l` (ROUGE-L, beta 1.2), on PTB-tokenised text.
* VQA (official ``vqaEval.py``; VQAv2, OK-VQA, TextVQA): :func:`vqa_accuracy`.
* ST-VQA / DocVQA: :func:`anls`.
* GLUE, as T5 computes it: :func:`accuracy`, :func:`f1_score_with_invalid`,
  :func:`matthews_corrcoef`, :func:`pearson_corrcoef`, :func:`spearman_corrcoef`,
  :func:`glue_average`, plus T5's postprocessors :func:`string_to_float` and
  :func:`string_label_to_class_id`.

Every ``seqio_*`` function has seqio's metric signature ``fn(targets, predictions) -> dict``.
Pure Python/NumPy: no TensorFlow, no pycocoevalcap import (it is only a test-time reference).

Tokenisation: :mod:`adalink_jax.ptb_tokenizer` (Java CoreNLP when present, else a tested
pure-Python port).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from adalink_jax.ptb_tokenizer import ptb_tokenize

# ------------------------------------------------------------------------------------------------
# CIDEr-D, BLEU-4, ROUGE-L (pycocoevalcap)
# ------------------------------------------------------------------------------------------------


def _prepare_captions(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      tokenizer: Optional[str]) -> Tuple[List[List[str]], List[List[List[str]]]]:
  """Validates; PTB-tokenises refs and predictions (one call each, as COCOEvalCap); splits."""
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} reference lists')
  if not predictions:
    raise ValueError('no captions to score')
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f'references[{i}] must be a non-empty list of strings, got {refs!r}')
  flat = [r for refs in references for r in refs]
  preds = list(predictions)
  if tokenizer is not None:
    flat, preds = ptb_tokenize(flat, tokenizer), ptb_tokenize(preds, tokenizer)
  out_refs, k = [], 0
  for refs in references:
    out_refs.append([r.split(' ') for r in flat[k:k + len(refs)]])  # ROUGE splits on ' '.
    k += len(refs)
  return [p.split(' ') for p in preds], out_refs


def _ngrams(words: List[str], n: int = 4) -> Dict[Tuple[str, ...], int]:
  counts: Dict[Tuple[str, ...], int] = collections.defaultdict(int)
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      counts[tuple(words[i:i + k])] += 1
  return counts


def _cider_d(hyps, refs, n=4, sigma=6.0) -> np.ndarray:
  """Per-image CIDEr-D on pycocoevalcap's scale (x10), same float operations as CiderScorer."""
  # pycocoevalcap splits on any whitespace here (str.split()), unlike ROUGE's split(' ').
  ctest = [_ngrams(' '.join(h).split(), n) for h in hyps]
  crefs = [[_ngrams(' '.join(r).split(), n) for r in rs] for rs in refs]
  doc_freq: Dict[Tuple[str, ...], float] = collections.defaultdict(float)
  for rs in crefs:  # Document = an image's reference set.
    for ngram in set(g for r in rs for g in r):
      doc_freq[ngram] += 1
  log_num_docs = np.log(float(len(crefs)))
  idf: Dict[Tuple[str, ...], float] = {}

  def to_vec(counts):
    vec = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for ngram, tf in counts.items():
      k = len(ngram) - 1
      if ngram not in idf:  # Unseen n-grams get df 1 (log 0 avoided), as upstream.
        idf[ngram] = float(log_num_docs - np.log(max(1.0, doc_freq.get(ngram, 0.0))))
      vec[k][ngram] = w = float(tf) * idf[ngram]
      norm[k] += w ** 2
      if k == 1:  # Upstream counts bigrams (len - 1); harmless, an empty side scores 0 anyway.
        length += tf
    return vec, [math.sqrt(x) for x in norm], length

  scores = []
  for test, rs in zip(ctest, crefs):
    vec, norm, length = to_vec(test)
    score = [0.0] * n
    for ref in rs:
      vec_r, norm_r, length_r = to_vec(ref)
      penalty = math.e ** (-(float(length - length_r) ** 2) / (2 * sigma ** 2))  # Length penalty.
      for k in range(n):
        val = 0.0
        for ngram, w in vec[k].items():  # Clipped ("-D") dot product.
          w_r = vec_r[k].get(ngram, 0.0)
          val += min(w, w_r) * w_r
        if norm[k] != 0 and norm_r[k] != 0:
          val /= norm[k] * norm_r[k]
        score[k] += val * penalty
    scores.append(np.mean(np.array(score)) / len(rs) * 10.0)
  return np.array(scores)


def _bleu(hyps, refs, n=4) -> Tuple[List[float], List[List[float]]]:
  """pycocoevalcap BleuScorer(option='closest'): corpus BLEU-1..n and per-image lists."""
  tiny, small = 1e-15, 1e-9  # Upstream's smoothing constants.
  total_guess, total_correct = [0] * n, [0] * n
  total_test, total_ref = 0, 0
  per_image: List[List[float]] = [[] for _ in range(n)]
  for hyp, rs in zip(hyps, refs):
    hyp = ' '.join(hyp).split()
    ref_lens, max_counts = [], {}
    for r in rs:
      r = ' '.join(r).split()
      ref_lens.append(len(r))
      for ngram, c in _ngrams(r, n).items():
        max_counts[ngram] = max(max_counts.get(ngram, 0), c)
    test_len = len(hyp)
    ref_len = min((abs(l - test_len), l) for l in ref_lens)[1]  # Closest; ties -> shorter.
    guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
    correct = [0] * n
    for ngram, c in _ngrams(hyp, n).items():
      correct[len(ngram) - 1] += min(max_counts.get(ngram, 0), c)
    total_test += test_len
    total_ref += ref_len
    bleu = 1.0
    for k in range(n):
      total_guess[k] += guess[k]
      total_correct[k] += correct[k]
      bleu *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
      per_image[k].append(bleu ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
      for k in range(n):
        per_image[k][-1] *= math.exp(1 - 1 / ratio)
  corpus, bleu = [], 1.0
  for k in range(n):
    bleu *= float(total_correct[k] + tiny) / (total_guess[k] + small)
    corpus.append(bleu ** (1.0 / (k + 1)))
  ratio = (total_test + tiny) / (total_ref + small)
  if ratio < 1:
    corpus = [b * math.exp(1 - 1 / ratio) for b in corpus]
  return corpus, per_image


def _lcs(a: List[str], b: List[str]) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def _rouge_l(hyps, refs, beta=1.2) -> np.ndarray:
  """pycocoevalcap Rouge: F-beta of the max precision and max recall over references."""
  scores = []
  for hyp, rs in zip(hyps, refs):
    lcs = [_lcs(r, hyp) for r in rs]
    prec = max(l / float(len(hyp)) for l in lcs)
    rec = max(l / float(len(r)) for l, r in zip(lcs, rs))
    scores.append(((1 + beta ** 2) * prec * rec) / float(rec + beta ** 2 * prec)
                  if prec != 0 and rec != 0 else 0.0)
  return np.array(scores)


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    tokenizer: Optional[str] = 'auto') -> Dict[str, float]:
  """CIDEr(-D), BLEU-1..4 and ROUGE-L (0-100) as the COCO caption evaluation reports them.

  Args:
    predictions: one caption per image.
    references: a non-empty list of reference captions per image.
    tokenizer: PTB backend for :func:`ptb_tokenize` ('auto', 'java', 'python'), or None when the
      inputs are already tokenised (space-separated tokens).
  """
  hyps, refs = _prepare_captions(predictions, references, tokenizer)
  bleus, _ = _bleu(hyps, refs)
  out = {'cider': 100 * float(np.mean(_cider_d(hyps, refs))),
         'rouge_l': 100 * float(np.mean(_rouge_l(hyps, refs)))}
  out.update({f'bleu{k + 1}': 100 * b for k, b in enumerate(bleus)})
  return out


def cider(predictions, references, tokenizer='auto', return_per_example=False):
  """CIDEr-D x 100 (pycocoevalcap Cider: n=4, sigma=6, corpus document frequencies).

  With ``return_per_example`` also returns the per-image scores (same scale) as an array.
  """
  raw = _cider_d(*_prepare_captions(predictions, references, tokenizer))
  return (100 * float(np.mean(raw)), 100 * raw) if return_per_example else 100 * float(np.mean(raw))


def bleu4(predictions, references, tokenizer='auto', return_per_example=False):
  """Corpus BLEU-4 x 100 (pycocoevalcap Bleu(4), 'closest' reference length)."""
  corpus, per = _bleu(*_prepare_captions(predictions, references, tokenizer))
  return (100 * corpus[3], 100 * np.array(per[3])) if return_per_example else 100 * corpus[3]


def rouge_l(predictions, references, tokenizer='auto', return_per_example=False):
  """ROUGE-L x 100 (pycocoevalcap Rouge, beta=1.2), mean over images."""
  raw = _rouge_l(*_prepare_captions(predictions, references, tokenizer))
  return (100 * float(np.mean(raw)), 100 * raw) if return_per_example else 100 * float(np.mean(raw))


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


def vqa_normalize_answer(answer: str) -> str:
  """Full normalisation vqaEval applies to every predicted answer."""
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return vqa_process_digit_article(vqa_process_punctuation(answer))


def vqa_accuracy(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]],
                 return_per_example: bool = False):
  """Official VQA accuracy x 100.

  Per question (as the current GT-Vision-Lab vqaEval.py): the prediction is fully normalised; the
  human answers get only punctuation processing, and only when they are not all identical; the
  score is the mean over annotators i of min(1, #{j != i: answer_j == prediction} / 3). Upstream
  rounds the final number to 2 decimals for display; we return it unrounded.
  """
  if len(predictions) != len(answer_lists):
    raise ValueError(f'{len(predictions)} predictions but {len(answer_lists)} answer lists')
  scores = []
  for q, (pred, answers) in enumerate(zip(predictions, answer_lists)):
    if isinstance(answers, str) or not answers:
      raise ValueError(f'answer_lists[{q}] must be a non-empty list of strings, got {answers!r}')
    pred = vqa_normalize_answer(pred)
    answers = list(answers)
    if len(set(answers)) > 1:
      answers = [vqa_process_punctuation(a) for a in answers]
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
  """Edit distance (insert/delete/substitute, unit costs)."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


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


def accuracy(targets, predictions) -> float:
  """100 * fraction of exact matches (sklearn accuracy_score)."""
  t, p = _pair(targets, predictions)
  return 100 * float(np.mean(t == p))


def f1_score_with_invalid(targets, predictions) -> float:
  """T5's binary F1 x 100 (positive class 1); predictions other than 0/1 count as wrong."""
  t, p = _pair(targets, predictions)
  t = t.astype(np.int64)
  p = np.where((p != 0) & (p != 1), 1 - t, p).astype(np.int64)
  tp = float(np.sum((t == 1) & (p == 1)))
  denom = 2 * tp + float(np.sum((t == 0) & (p == 1))) + float(np.sum((t == 1) & (p == 0)))
  return 100 * (2 * tp / denom if denom else 0.0)  # sklearn's zero_division default -> 0.


def matthews_corrcoef(targets, predictions) -> float:
  """Matthews correlation x 100, multi-class form as sklearn (invalid labels are a class)."""
  t, p = _pair(targets, predictions)
  _, codes = np.unique(np.concatenate([t, p]), return_inverse=True)
  k = int(codes.max()) + 1
  conf = np.zeros((k, k), np.float64)
  np.add.at(conf, (codes[:len(t)], codes[len(t):]), 1)
  t_sum, p_sum = conf.sum(axis=1), conf.sum(axis=0)
  n = p_sum.sum()
  cov_tp = np.trace(conf) * n - np.dot(t_sum, p_sum)
  cov_pp, cov_tt = n ** 2 - np.dot(p_sum, p_sum), n ** 2 - np.dot(t_sum, t_sum)
  return 100 * float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_pp * cov_tt else 0.0


def pearson_corrcoef(targets, predictions) -> float:
  """Pearson r x 100 (scipy.stats.pearsonr); NaN when either side is constant, as scipy."""
  t, p = _pair(targets, predictions)
  t, p = t.astype(np.float64) - np.mean(t, dtype=np.float64), p.astype(np.float64) - np.mean(
      p, dtype=np.float64)
  nt, np_ = np.linalg.norm(t), np.linalg.norm(p)
  if nt == 0 or np_ == 0:
    return float('nan')
  return 100 * float(np.clip(np.dot(t / nt, p / np_), -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n with ties sharing their average rank (scipy.stats.rankdata 'average')."""
  order = np.argsort(x, kind='mergesort')
  xs = x[order]
  starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
  ends = np.r_[starts[1:], len(x)]
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  return ranks


def spearman_corrcoef(targets, predictions) -> float:
  """Spearman rho x 100 (scipy.stats.spearmanr): Pearson r of average ranks."""
  t, p = _pair(targets, predictions)
  return pearson_corrcoef(_average_ranks(t.astype(np.float64)),
                          _average_ranks(p.astype(np.float64)))


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
