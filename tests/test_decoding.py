"""Self-consistency of adalink_jax.decoding on tiny random T5s (cache vs no cache, batching,
EOS, sampling statistics, beam search vs exhaustive search, scanned layers)."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from adalink_jax import decoding
from adalink_jax.models import t5

EOS = 1
PROMPTS = [[5, 9, 17, 3, 44, 2], [7, 8], [250, 31, 12, 6]]  # different lengths, no pad/eos


def _pad(rows, length=None):
  length = length or max(map(len, rows))
  return jnp.array([r + [0] * (length - len(r)) for r in rows], jnp.int32)


@functools.lru_cache(maxsize=None)
def _model(vocab=256, scan=False, seed=0):
  cfg = t5.t5_config('t5_1_1_tiny', vocab_size=vocab, scan_layers=scan)
  model = t5.T5(cfg)
  toks = jnp.ones((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), toks, toks)['params'])
  return model, params


def _encode(model, params, tokens):
  return decoding.encode(model, params, tokens)


def _uncached_greedy(model, params, encoded, mask, steps):
  """Reference: re-runs the full decoder on the whole prefix every step, never stops at EOS."""
  full = jax.jit(lambda dec: model.apply({'params': params}, encoded, mask, dec,
                                         method=model.decode))
  b = encoded.shape[0]
  dec = np.zeros((b, steps), np.int32)  # dec[:, 0] = start token 0
  out = np.zeros((b, steps), np.int32)
  for i in range(steps):
    logits = np.asarray(full(jnp.asarray(dec)))
    out[:, i] = logits[:, i].argmax(-1)
    if i + 1 < steps:
      dec[:, i + 1] = out[:, i]
  return out


def _cut_after_eos(tokens):
  tokens = np.array(tokens)
  for row in tokens:
    hits = np.flatnonzero(row == EOS)
    if hits.size:
      row[hits[0] + 1:] = 0
  return tokens


def test_cached_greedy_matches_uncached_argmax_loop():
  model, params = _model()
  enc, mask = _encode(model, params, _pad(PROMPTS))
  got = decoding.greedy_decode(model, params, enc, mask, 8)
  ref = _uncached_greedy(model, params, enc, mask, 8)
  assert got.shape == (3, 8) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), _cut_after_eos(ref))
  assert len(set(np.asarray(got).ravel().tolist())) > 3  # not a degenerate constant output


def test_eos_stops_sequences_and_pads_after_it():
  # Vocab 8: EOS is frequent, so some rows finish early and others run to max length.
  model, params = _model(vocab=8, seed=3)
  prompts = [[2, 3, 4], [5, 6], [7, 2, 2, 3], [4], [6, 5, 4, 3], [3, 3]]
  enc, mask = _encode(model, params, _pad(prompts))
  got = np.asarray(decoding.greedy_decode(model, params, enc, mask, 8))
  ref = _uncached_greedy(model, params, enc, mask, 8)
  first_eos = [np.flatnonzero(r == EOS)[0] if (r == EOS).any() else None for r in ref]
  assert any(e is not None and e < 7 for e in first_eos), first_eos  # EOS really produced
  for row, r, e in zip(got, ref, first_eos):
    if e is None:
      np.testing.assert_array_equal(row, r)
    else:
      np.testing.assert_array_equal(row[:e + 1], r[:e + 1])
      assert (row[e + 1:] == 0).all() and row[e] == EOS


def test_batching_and_padding_do_not_change_results():
  model, params = _model()
  # The batch is padded to 9; each prompt alone is padded to 6, the longest (so unpadded).
  enc, mask = _encode(model, params, _pad(PROMPTS, 9))
  batched = decoding.greedy_decode(model, params, enc, mask, 8)
  beams = decoding.beam_search(model, params, enc, mask, 8, num_beams=4)
  for i, p in enumerate(PROMPTS):
    e1, m1 = _encode(model, params, _pad([p], 6))
    np.testing.assert_array_equal(batched[i], decoding.greedy_decode(model, params, e1, m1, 8)[0])
    one = decoding.beam_search(model, params, e1, m1, 8, num_beams=4)
    np.testing.assert_array_equal(beams.all_sequences[i], one.all_sequences[0])
    np.testing.assert_allclose(beams.all_scores[i], one.all_scores[0], atol=1e-5)


def test_sampling_top1_reproducibility_and_rng_dependence():
  model, params = _model()
  enc, mask = _encode(model, params, _pad(PROMPTS))
  greedy = decoding.greedy_decode(model, params, enc, mask, 8)
  rng = jax.random.PRNGKey(7)
  top1 = decoding.sample_decode(model, params, enc, mask, 8, rng, temperature=3.0, top_k=1)
  np.testing.assert_array_equal(top1, greedy)
  a = decoding.sample_decode(model, params, enc, mask, 8, rng, temperature=1.5)
  b = decoding.sample_decode(model, params, enc, mask, 8, rng, temperature=1.5)
  c = decoding.sample_decode(model, params, enc, mask, 8, jax.random.PRNGKey(8), temperature=1.5)
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()
  with pytest.raises(ValueError, match='temperature'):
    decoding.sample_decode(model, params, enc, mask, 8, rng, temperature=0.0)


def _chi2_pvalue(counts, p, n):
  """Pearson chi-square; bins expecting < 5 draws are pooled so the approximation holds."""
  small = n * p < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(n * p[~small], n * p[small].sum())
  keep = exp > 0
  if (obs[~keep] > 0).any():
    return 0.0  # draws where the distribution has no mass
  return stats.chisquare(obs[keep], exp[keep]).pvalue


def test_sampled_first_token_distribution_matches_tempered_softmax():
  model, params = _model(vocab=16, seed=1)
  n = 20000
  enc, mask = _encode(model, params, _pad([[3, 4, 5, 6]]))
  logits = np.asarray(jax.jit(model.apply, static_argnames='method')(
      {'params': params}, enc, mask, jnp.zeros((1, 1), jnp.int32), method=model.decode),
      np.float64)[0, 0]
  enc_n, mask_n = jnp.repeat(enc, n, 0), jnp.repeat(mask, n, 0)

  def tempered(t, k=0):
    z = logits / t
    if k:
      z = np.where(z < np.sort(z)[-k], -np.inf, z)
    p = np.exp(z - z.max())
    return p / p.sum()

  for i, (temp, k) in enumerate([(0.7, 0), (2.0, 0), (1.0, 4)]):
    toks = np.asarray(decoding.sample_decode(model, params, enc_n, mask_n, 1,
                                             jax.random.PRNGKey(i), temperature=temp, top_k=k))
    counts = np.bincount(toks[:, 0], minlength=16)
    p = tempered(temp, k)
    support = p > 0
    assert counts[~support].sum() == 0  # top-k never samples outside the k best
    assert _chi2_pvalue(counts, p, n) > 1e-3
    # The test has power: the untempered, unrestricted softmax is rejected.
    assert _chi2_pvalue(counts, tempered(1.0), n) < 1e-6


def test_beam_one_equals_greedy_without_length_penalty():
  model, params = _model(vocab=8, seed=3)
  prompts = [[2, 3, 4], [5, 6], [7, 2, 2, 3], [4], [6, 5, 4, 3], [3, 3]]
  enc, mask = _encode(model, params, _pad(prompts))
  greedy = decoding.greedy_decode(model, params, enc, mask, 8)
  out = decoding.beam_search(model, params, enc, mask, 8, num_beams=1, length_penalty=0.0)
  np.testing.assert_array_equal(out.sequences, greedy)
  sums, _ = decoding.score_sequences(model, params, enc, mask, greedy)
  np.testing.assert_allclose(out.scores, sums, atol=1e-5)
  # With length normalisation a beam may outlive an EOS (as in HF), never scoring worse.
  out1 = decoding.beam_search(model, params, enc, mask, 8, num_beams=1, length_penalty=1.0)
  s_beam, n_beam = decoding.score_sequences(model, params, enc, mask, out1.sequences)
  s_greedy, n_greedy = decoding.score_sequences(model, params, enc, mask, greedy)
  np.testing.assert_allclose(out1.scores, s_beam / n_beam, atol=1e-5)
  assert (np.asarray(n_beam) < 8).any()  # some hypotheses end with EOS ...
  for row in np.asarray(out1.sequences):  # ... and are padded after it
    hits = np.flatnonzero(row == EOS)
    if hits.size:
      assert (row[hits[0] + 1:] == 0).all()
  assert (np.asarray(s_beam / n_beam) >= np.asarray(s_greedy / n_greedy) - 1e-6).all()


def _all_hypotheses(vocab, length):
  """Every finished hypothesis of at most ``length`` tokens: ends in EOS, or has full length."""
  hyps = []
  for n in range(1, length + 1):
    for prefix in itertools.product([t for t in range(vocab) if t != EOS], repeat=n - 1):
      lasts = range(vocab) if n == length else [EOS]
      hyps += [list(prefix) + [t] + [0] * (length - n) for t in lasts]
  return jnp.array(hyps, jnp.int32)


@pytest.mark.parametrize('length,num_beams', [(2, 6), (3, 36)])
def test_beam_search_finds_exhaustive_best(length, num_beams):
  # With num_beams >= vocab**(length-1) no prefix is ever pruned, so beam search must return
  # exactly the best length-normalised hypotheses of the exhaustive enumeration.
  vocab = 6
  model, params = _model(vocab=vocab, seed=5)
  prompts = [[2, 3, 4, 5], [5, 2]]
  enc, mask = _encode(model, params, _pad(prompts))
  hyps = _all_hypotheses(vocab, length)
  for lp in (0.0, 1.0, 2.0):
    out = decoding.beam_search(model, params, enc, mask, length, num_beams=num_beams,
                               length_penalty=lp)
    for i in range(len(prompts)):
      sums, lens = decoding.score_sequences(model, params, jnp.repeat(enc[i:i + 1], len(hyps), 0),
                                            jnp.repeat(mask[i:i + 1], len(hyps), 0), hyps)
      scores = np.asarray(sums / lens.astype(jnp.float32) ** lp)
      order = np.argsort(-scores, kind='stable')
      np.testing.assert_allclose(out.all_scores[i], scores[order[:num_beams]], atol=1e-5)
      assert scores[order[0]] - scores[order[1]] > 1e-5  # the best is unique here
      np.testing.assert_array_equal(out.sequences[i], hyps[order[0]])


def _to_scanned(params, num_layers):
  """Stacks ``{encoder,decoder}/layers_i`` into ``layers`` with a leading layers axis."""
  out = dict(params)
  for stack in ('encoder', 'decoder'):
    sub = dict(params[stack])
    layers = [sub.pop(f'layers_{i}') for i in range(num_layers)]
    sub['layers'] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    out[stack] = sub
  return out


def test_scan_layers_gives_the_same_decodes():
  model, params = _model()
  smodel = t5.T5(model.config.replace(scan_layers=True))
  sparams = _to_scanned(params, 2)
  toks1 = jnp.ones((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(smodel.init, jax.random.PRNGKey(0), toks1, toks1)['params'])
  assert (jax.tree_util.tree_map(jnp.shape, sparams) == jax.tree_util.tree_map(jnp.shape, shapes))
  toks = _pad(PROMPTS)
  enc, mask = _encode(model, params, toks)
  senc, smask = _encode(smodel, sparams, toks)
  np.testing.assert_allclose(senc, enc, atol=1e-5)
  np.testing.assert_array_equal(decoding.greedy_decode(smodel, sparams, senc, smask, 8),
                                decoding.greedy_decode(model, params, enc, mask, 8))
  a = decoding.beam_search(model, params, enc, mask, 8, num_beams=4)
  b = decoding.beam_search(smodel, sparams, senc, smask, 8, num_beams=4)
  np.testing.assert_array_equal(b.all_sequences, a.all_sequences)
  np.testing.assert_allclose(b.all_scores, a.all_scores, atol=1e-5)


def test_jit_generate_with_image_prefix_and_scores():
  model, params = _model()
  toks = _pad(PROMPTS)
  image = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 32))
  gen = jax.jit(functools.partial(decoding.generate, model, method='beam', max_decode_len=8,
                                  num_beams=4))
  best = gen(params, toks, image)
  enc, mask = decoding.encode(model, params, toks, image)
  assert enc.shape[1] == 5 + toks.shape[1]
  out = decoding.beam_search(model, params, enc, mask, 8, num_beams=4)
  np.testing.assert_array_equal(best, out.sequences)
  sums, lens = decoding.score_sequences(model, params, enc, mask, out.sequences)
  np.testing.assert_allclose(out.scores, sums / lens, atol=1e-5)
  # The image prefix matters: without it the decode differs.
  plain = decoding.generate(model, params, toks, method='greedy', max_decode_len=8)
  with_img = decoding.generate(model, params, toks, image, method='greedy', max_decode_len=8)
  assert (np.asarray(plain) != np.asarray(with_img)).any()
  with pytest.raises(ValueError, match='unknown decoding method'):
    decoding.generate(model, params, toks, method='nucleus', max_decode_len=6)
