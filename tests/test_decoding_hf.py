"""Decoding against HF transformers' ``generate`` on random small T5s we did not write.

Random ``T5ForConditionalGeneration`` models (v1.1: gated GELU, separate LM head; v1.0: ReLU,
tied and scaled head) are saved with ``save_pretrained`` and loaded with
``adalink_jax.checkpoints.hf.load_hf_t5``. Their weights are perturbed (random norms, strong
position biases, larger decoder weights, a louder EOS embedding for v1.0) so that the
outputs vary across prompts and steps and EOS is produced mid-sequence; the tests assert
that, so a degenerate model cannot make them pass vacuously.
"""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from adalink_jax import decoding  # pylint: disable=g-import-not-at-top
from adalink_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
from adalink_jax.models import t5  # pylint: disable=g-import-not-at-top

VOCAB, NEW_TOKENS, BEAMS, EOS = 24, 12, 4, 1
PROMPT_LENGTHS = (7, 3, 5, 6, 4, 8, 2, 5)

_VARIANTS = {
    # name: (torch seed, HF config, decoder weight scale, EOS embedding-row scale)
    'v11': (3, dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False), 1.0, 1.0),
    'v10': (0, dict(feed_forward_proj='relu', tie_word_embeddings=True), 3.0, 2.0),
}


def _build_hf(name):
  seed, kw, decoder_scale, eos_scale = _VARIANTS[name]
  torch.manual_seed(seed)
  cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                              num_layers=2, num_decoder_layers=2,
                              relative_attention_num_buckets=8,
                              relative_attention_max_distance=16, dropout_rate=0.0,
                              decoder_start_token_id=0, **kw)
  model = transformers.T5ForConditionalGeneration(cfg).float().eval()
  with torch.no_grad():
    if name == 'v11':  # HF 5 ties an unscaled head to the embedding unless given its own
      model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, cfg.d_model))
    for pname, p in model.named_parameters():
      if 'layer_norm' in pname:
        p.uniform_(0.5, 1.5)
      elif 'relative_attention_bias' in pname:
        p.normal_(0.0, 1.0)
      elif pname.startswith('decoder.block'):
        p.mul_(decoder_scale)
    model.shared.weight[EOS].mul_(eos_scale)
  return model


def _prompts():
  rng = np.random.default_rng(0)
  rows = [rng.integers(2, VOCAB, n) for n in PROMPT_LENGTHS]  # no pad (0) or EOS (1) inside
  ids = np.zeros((len(rows), max(PROMPT_LENGTHS)), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return ids


def _normalise_hf(seqs):
  """HF ``[n, 1 + t]`` (start token first, cropped, EOS/pad-filled) -> ours ``[n, NEW_TOKENS]``."""
  seqs = np.asarray(seqs)[:, 1:]
  out = np.zeros((seqs.shape[0], NEW_TOKENS), np.int32)
  out[:, :seqs.shape[1]] = seqs
  for row in out:
    hits = np.flatnonzero(row == EOS)
    if hits.size:
      row[hits[0] + 1:] = 0
  return out


@functools.lru_cache(maxsize=None)
def _setup(name, tmp_root):
  hf_model = _build_hf(name)
  path = f'{tmp_root}/{name}'
  hf_model.save_pretrained(path)
  cfg, params = hf.load_hf_t5(path)
  assert cfg.tie_embeddings == (name == 'v10')
  model = t5.T5(cfg)
  ids = _prompts()
  enc, mask = decoding.encode(model, params, jnp.asarray(ids, jnp.int32))
  return hf_model, model, params, ids, enc, mask


@pytest.fixture(scope='module')
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('hf_decoding'))


def _hf_generate(hf_model, ids, **kw):
  with torch.no_grad():
    return hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0),
                             max_new_tokens=NEW_TOKENS, do_sample=False, **kw)


@pytest.mark.parametrize('name', sorted(_VARIANTS))
def test_greedy_equals_hf_generate(name, tmp_root):
  hf_model, model, params, ids, enc, mask = _setup(name, tmp_root)
  want = _normalise_hf(_hf_generate(hf_model, ids, num_beams=1).numpy())
  got = np.asarray(decoding.greedy_decode(model, params, enc, mask, NEW_TOKENS))
  np.testing.assert_array_equal(got, want)
  # Non-degenerate reference: varied tokens, and EOS reached mid-sequence somewhere.
  assert len(np.unique(want[:, :3])) >= 5, want
  assert any(EOS in row[1:-1] for row in want), want
  assert any(EOS not in row for row in want), want


@pytest.mark.parametrize('name', sorted(_VARIANTS))
def test_beam_search_equals_hf_generate(name, tmp_root):
  hf_model, model, params, ids, enc, mask = _setup(name, tmp_root)
  b = ids.shape[0]
  greedy = np.asarray(decoding.greedy_decode(model, params, enc, mask, NEW_TOKENS))
  score = functools.partial(_norm_scores, model, params, enc, mask)
  for lp in (1.0, 0.0, 2.0):
    res = _hf_generate(hf_model, ids, num_beams=BEAMS, num_return_sequences=BEAMS,
                       length_penalty=lp, output_scores=True, return_dict_in_generate=True)
    want = _normalise_hf(res.sequences.numpy()).reshape(b, BEAMS, NEW_TOKENS)
    want_scores = res.sequences_scores.numpy().reshape(b, BEAMS)
    out = decoding.beam_search(model, params, enc, mask, NEW_TOKENS, num_beams=BEAMS,
                               length_penalty=lp)
    got, got_scores = np.asarray(out.all_sequences), np.asarray(out.all_scores)
    np.testing.assert_array_equal(out.sequences, got[:, 0])
    # Scores of every returned hypothesis, rank by rank, as HF computes them.
    # (length_penalty=0 compares raw sums of ~12 log-probs, hence the relative term.)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5, rtol=1e-6)
    # Tokens: identical, except where two hypotheses tie in score (documented): then both
    # must score the same under teacher forcing, so a wrong hypothesis cannot hide here.
    same = (got == want).all(-1)
    if not same.all():
      prompt = np.nonzero(~same)[0]
      np.testing.assert_allclose(score(got[~same], prompt, lp), score(want[~same], prompt, lp),
                                 atol=1e-5, rtol=0)
    assert same.mean() >= 0.9, same  # ties are rare; in practice all 32 agree
    # Our reported scores are the teacher-forced length-normalised scores of our tokens.
    np.testing.assert_allclose(
        got_scores, score(got.reshape(b * BEAMS, -1), np.repeat(np.arange(b), BEAMS), lp)
        .reshape(b, BEAMS), atol=1e-5, rtol=0)
    if lp == 1.0:  # the comparison exercises real beam search, not greedy in disguise
      assert (got[:, 0] != greedy).any(axis=-1).sum() >= 2
      assert any(EOS in row[:-1] for row in got[:, 0])


def _norm_scores(model, params, enc, mask, rows, prompt_index, lp):
  """Teacher-forced ``sum log p / len ** lp`` of ``rows[n, T]``, row i decoded from prompt
  ``prompt_index[i]``."""
  sums, lens = decoding.score_sequences(model, params, enc[prompt_index], mask[prompt_index],
                                        jnp.asarray(rows))
  return np.asarray(sums) / np.asarray(lens, np.float64) ** lp
