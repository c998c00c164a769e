"""Rank classification: pick, per example, the label word the model scores highest.

Model-agnostic: the model enters only through ``score(inputs, targets[b, t]) -> [b]``, the
teacher-forced sum of target log-probs of each example (counted up to and including the first
EOS, e.g. :func:`adalink_jax.decoding.score_sequences` for T5). Each candidate is its label
word's tokens plus EOS, right-padded with ``pad_id`` to one length, so the score also says
where the answer ends (training targets end in EOS too) and one label that is a prefix of
another ('human' / 'humanity') is not scored as the longer one. The sum is not
length-normalised (T5's rank classification).

Candidates are scored one forward per candidate per batch (``stacked=False``: memory of one
batch) or in one forward over the batch repeated per candidate (``stacked=True``). Training
runs score with the family's ``score_candidates`` instead (:mod:`adalink_jax.families.base`),
which runs the shared prefix once; this module's :func:`rank_scores` is the model-agnostic form.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ScoreFn = Callable[[Any, np.ndarray], Any]


def candidate_targets(label_tokens: Sequence[Sequence[int]], eos_id: int,
                      pad_id: int = 0) -> np.ndarray:
  """``[[tokens of label c]]`` -> int32 ``[c, t]``: each label's tokens + EOS, padded.

  Refuses an empty label, a label containing EOS, fewer than two labels and two labels with
  the same tokens: ranking them could not tell them apart.
  """
  rows = [list(map(int, r)) for r in label_tokens]
  if len(rows) < 2:
    raise ValueError(f'rank classification needs at least 2 labels, got {len(rows)}')
  for i, r in enumerate(rows):
    if not r or eos_id in r:
      raise ValueError(f'label {i} tokens {r}: must be non-empty and without EOS ({eos_id})')
  seen = {}
  for i, r in enumerate(rows):
    if tuple(r) in seen:
      raise ValueError(f'labels {seen[tuple(r)]} and {i} have the same tokens {r}; '
                       'rank classification cannot separate them: use distinct label words')
    seen[tuple(r)] = i
  width = max(map(len, rows)) + 1
  return np.array([r + [eos_id] + [pad_id] * (width - len(r) - 1) for r in rows], np.int32)


def word_candidates(vocabulary: Any, words: Sequence[str]) -> np.ndarray:
  """:func:`candidate_targets` of label words under a seqio vocabulary (``encode``, ``eos_id``;
  padding id 0, seqio's)."""
  return candidate_targets([vocabulary.encode(w) for w in words], vocabulary.eos_id)


def _batch_size(inputs: Any) -> int:
  sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(inputs)}
  if len(sizes) != 1:
    raise ValueError(f'rank classification inputs must share one batch size; got {sorted(sizes)}')
  return sizes.pop()


def _repeat(x: Any, times: int) -> Any:
  """``[b, ...]`` -> ``[times * b, ...]`` (the batch ``times`` over), kept on device if there."""
  if isinstance(x, jax.Array):
    return jnp.concatenate([x] * times, axis=0)
  return np.concatenate([np.asarray(x)] * times, axis=0)


def checked_scores(scores: Any, want: tuple[int, ...], what: str) -> np.ndarray:
  """``scores`` as float64 of shape ``want``, or an error naming ``what`` (wrong shape, or a
  non-finite score: a NaN must not pick a label)."""
  out = np.asarray(scores, np.float64)
  if out.shape != want:
    raise ValueError(f'score function returned shape {out.shape} for {what}; expected {want} '
                     '(one summed log-prob per example)')
  if not np.all(np.isfinite(out)):
    raise FloatingPointError(f'score function returned non-finite scores for {what}: '
                             f'{out[~np.isfinite(out)][:4].tolist()}')
  return out


def rank_scores(score: ScoreFn, inputs: Any, candidates: np.ndarray,
                stacked: bool = False) -> np.ndarray:
  """Scores of every candidate for every example: float64 ``[b, c]``.

  inputs: a pytree whose leaves have the batch ``b`` first (whatever ``score`` takes);
  candidates: ``[c, t]`` from :func:`candidate_targets`.
  """
  b, (c, t) = _batch_size(inputs), candidates.shape
  if stacked:  # candidate-major: rows [k * b, (k + 1) * b) hold candidate k
    tiled = jax.tree.map(lambda x: _repeat(x, c), inputs)
    targets = np.repeat(candidates, b, axis=0)
    flat = checked_scores(score(tiled, targets), (c * b,), f'{c} stacked candidates')
    return flat.reshape(c, b).T
  cols = [checked_scores(score(inputs, np.broadcast_to(candidates[k], (b, t))), (b,),
                         f'candidate {k}')
          for k in range(c)]
  return np.stack(cols, axis=1)


def classify(score: ScoreFn, inputs: Any, candidates: np.ndarray,
             stacked: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """-> (label index per example int ``[b]`` (ties: the first label), scores ``[b, c]``)."""
  scores = rank_scores(score, inputs, candidates, stacked)
  return np.argmax(scores, axis=1), scores
