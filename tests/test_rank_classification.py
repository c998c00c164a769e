"""Rank classification against a slow reference on tiny random models (T5 1.1 and Gemma 3).

The reference scores one example and one candidate at a time, unpadded, from the model's full
logits with a float64 numpy log-softmax; the batched scorer pads the prompts (T5: right, Gemma:
left) and the candidates, so agreement also checks that padding changes nothing.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adalink_jax import decoding
from adalink_jax import rank_classification as rc
from adalink_jax.models import gemma
from adalink_jax.models import t5

EOS, PAD = 1, 0
# Label tokens of different lengths (padding after EOS must not count); mostly of one length,
# so that with random weights the argmax depends on the example, not just on the length.
LABELS = [[5, 20], [9, 17], [33, 7], [40, 41, 42]]
# Three prompt lengths (the unpadded reference compiles once per prompt and target length).
PROMPTS = [[5, 9, 17, 3, 44, 2], [7, 8], [120, 31, 12, 6], [99, 98, 97, 96, 95, 94], [11, 12],
           [64, 65, 66, 67], [23, 19, 88, 70, 4, 18], [3, 3]]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference(logits_fn, prompts, labels):
  """Per example, per candidate: ``logits_fn(prompt, target) -> [len(target), vocab]`` (the
  logits predicting each target token) -> summed float64 log-probs [b, c] and the argmax."""
  scores = np.zeros((len(prompts), len(labels)))
  for i, prompt in enumerate(prompts):
    for k, label in enumerate(labels):
      target = list(label) + [EOS]
      lp = _log_softmax(logits_fn(prompt, target))
      scores[i, k] = sum(lp[j, tok] for j, tok in enumerate(target))
  return scores.argmax(1), scores


@functools.lru_cache(maxsize=None)
def _t5():
  model = t5.T5(t5.t5_config('t5_1_1_tiny'))
  toks = jnp.ones((1, 4), jnp.int32)
  return model, nn.unbox(model.init(jax.random.PRNGKey(0), toks, toks)['params'])


@functools.lru_cache(maxsize=None)
def _t5_logits():
  """Jitted ``(prompt [1, l], decoder inputs [1, t]) -> logits [1, t, vocab]`` (built after the
  parameters exist: initialising them under a trace would leak tracers)."""
  model, params = _t5()

  def logits(prompt, decoder_inputs):
    enc, mask = model.apply({'params': params}, prompt, method=model.encode)
    return model.apply({'params': params}, enc, mask, decoder_inputs, method=model.decode)
  return jax.jit(logits)


def _t5_reference_logits(prompt, target):
  dec = jnp.asarray([[0] + target[:-1]], jnp.int32)
  return np.asarray(_t5_logits()(jnp.asarray([prompt], jnp.int32), dec))[0]


def _t5_batch():
  """Right-padded prompts, encoded once per batch: the inputs the scorer passes through."""
  model, params = _t5()
  width = max(map(len, PROMPTS))
  tokens = jnp.asarray([p + [PAD] * (width - len(p)) for p in PROMPTS], jnp.int32)
  return decoding.encode(model, params, tokens)


@functools.lru_cache(maxsize=None)
def _t5_score():
  model, params = _t5()

  def score(inputs, targets):
    encoded, mask = inputs
    return decoding.score_sequences(model, params, encoded, mask, targets, eos_id=EOS)[0]
  return jax.jit(score)


@pytest.mark.parametrize('stacked', [False, True])
def test_t5_rank_classification_matches_reference(stacked):
  want_pred, want = _reference(_t5_reference_logits, PROMPTS, LABELS)
  # Non-trivial case: the examples do not all pick the same label.
  assert len(set(want_pred.tolist())) > 1, want_pred
  pred, scores = rc.classify(_t5_score(), _t5_batch(), rc.candidate_targets(LABELS, EOS),
                             stacked=stacked)
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(pred, want_pred)


@functools.lru_cache(maxsize=None)
def _gemma():
  model = gemma.Gemma(gemma.gemma_config('gemma3_tiny'))
  return model, model.init(jax.random.key(1), jnp.ones((1, 4), jnp.int32))


@functools.lru_cache(maxsize=None)
def _gemma_logits():
  model, variables = _gemma()
  return jax.jit(lambda tokens: model.apply(variables, tokens))


def _gemma_reference_logits(prompt, target):
  logits = _gemma_logits()(jnp.asarray([prompt + target], jnp.int32))[0]
  return np.asarray(logits)[len(prompt) - 1:-1]  # position j predicts token j + 1


@functools.lru_cache(maxsize=None)
def _gemma_score():
  """Left-padded prompts + targets in one causal pass; log-softmax of the logits before each
  target token, summed up to and including the first EOS."""
  model, variables = _gemma()

  def score(inputs, targets):
    tokens, mask = inputs
    seq = jnp.concatenate([tokens, targets], axis=1)
    seq_mask = jnp.concatenate([mask, jnp.ones(targets.shape, bool)], axis=1)
    logits = model.apply(variables, seq, mask=seq_mask)[:, tokens.shape[1] - 1:-1]
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    is_eos = targets == EOS
    counted = (jnp.cumsum(is_eos, axis=-1) - is_eos) == 0
    return jnp.sum(jnp.where(counted, lp, 0.0), axis=-1)
  return jax.jit(score)


@pytest.mark.parametrize('stacked', [False, True])
def test_gemma_rank_classification_matches_reference(stacked):
  want_pred, want = _reference(_gemma_reference_logits, PROMPTS, LABELS)
  assert len(set(want_pred.tolist())) > 1, want_pred
  inputs = gemma.left_padded(PROMPTS, PAD)
  pred, scores = rc.classify(_gemma_score(), inputs, rc.candidate_targets(LABELS, EOS),
                             stacked=stacked)
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(pred, want_pred)


def test_candidates_end_in_eos_and_are_padded():
  np.testing.assert_array_equal(rc.candidate_targets([[5], [9, 17]], EOS),
                                [[5, EOS, PAD], [9, 17, EOS]])


@pytest.mark.parametrize('labels,message', [
    ([[5], [5]], r'labels 0 and 1 have the same tokens \[5\]'),
    ([[5], []], 'label 1 tokens'),
    ([[5], [3, EOS]], 'without EOS'),
    ([[5]], 'at least 2 labels'),
])
def test_ambiguous_candidates_are_refused(labels, message):
  with pytest.raises(ValueError, match=message):
    rc.candidate_targets(labels, EOS)


def test_bad_scores_are_errors_not_answers():
  inputs = np.zeros((3, 2), np.int32)
  cands = rc.candidate_targets([[5], [6]], EOS)
  with pytest.raises(FloatingPointError, match='non-finite scores for candidate 1'):
    rc.classify(lambda x, t: np.where(t[:, 0] == 6, np.nan, 0.0), inputs, cands)
  with pytest.raises(ValueError, match=r'shape \(3, 2\) .* expected \(3,\)'):
    rc.classify(lambda x, t: np.zeros(t.shape), inputs, cands)
  with pytest.raises(ValueError, match=r'one batch size; got \[2, 3\]'):
    rc.classify(lambda x, t: np.zeros(len(t)), (inputs, inputs[:2]), cands)


def test_word_candidates_encode_label_words_under_a_sentencepiece_vocabulary(tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  words = ('abbreviation', 'description', 'entity', 'human', 'location', 'number')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([' '.join(words), 'what is a human number']), vocab_size=60,
      model_prefix=str(tmp_path / 'spm'), pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  vocab = seqio.SentencePieceVocabulary(str(tmp_path / 'spm.model'))
  cands = rc.word_candidates(vocab, words)
  lengths = [len(vocab.encode(w)) for w in words]
  assert cands.shape == (6, max(lengths) + 1) and len(set(lengths)) > 1
  for row, word, n in zip(cands, words, lengths):
    assert vocab.decode(row[:n].tolist()) == word
    assert row[n] == vocab.eos_id and not row[n + 1:].any()
