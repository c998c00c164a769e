"""The decoder-only family on the encoder-decoder batch layout (models/prefix_lm.py,
families/gemma.py, families/paligemma.py): same logits as the reference modules, decoding
consistent with teacher forcing, AdaLink trains through the shared train step."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from adalink_jax import model_builder
from adalink_jax.models import gemma as gemma_lib
from adalink_jax.models import paligemma as pg_lib
from adalink_jax.models import prefix_lm
from adalink_jax.peft import methods as peft
from adalink_jax.peft import train as peft_train

SEP = 5  # a separator id inside the tiny vocabularies (PaliGemma's is '\n' = 108)


def _rows(prompts, targets, width_p, width_t):
  p = np.zeros((len(prompts), width_p), np.int32)
  t = np.zeros((len(targets), width_t), np.int32)
  for i, (a, b) in enumerate(zip(prompts, targets)):
    p[i, :len(a)], t[i, :len(b)] = a, b
  return jnp.asarray(p), jnp.asarray(t)


PROMPTS = [[7, 8, 9, 10, 11], [12, 13]]
TARGETS = [[20, 21, 22, 1], [23, 1]]


def test_prefix_lm_equals_paligemma_per_row():
  """Padded rows through PrefixLM == each row alone, unpadded, through PaliGemma (HF's rules)."""
  pcfg = pg_lib.paligemma_config('paligemma2_tiny')  # Gemma 2: sliding window 4 < sequence
  cfg = prefix_lm.PrefixLMConfig(llm=pcfg.llm, vit=pcfg.vit, prefix_lm=True,
                                 one_based_positions=True, separator_id=SEP)
  model = prefix_lm.PrefixLM(cfg)
  prompt, targets = _rows(PROMPTS, TARGETS, 7, 5)
  h, w = pcfg.vit.image_size
  images = jax.random.uniform(jax.random.key(1), (2, h, w, 3), minval=-1, maxval=1)
  params = nn.unbox(model.init(jax.random.key(0), prompt, targets, images)['params'])
  logits = model.apply({'params': params}, prompt, targets, images)
  assert logits.shape == (2, 5, pcfg.llm.vocab_size)
  ref = pg_lib.PaliGemma(pcfg)
  n = pcfg.num_image_tokens
  for i, (a, b) in enumerate(zip(PROMPTS, TARGETS)):
    tokens = jnp.asarray([[2, *a, SEP, *b]], jnp.int32)
    prefix_len = n + len(a) + 2
    want = ref.apply({'params': params}, images[i:i + 1], tokens, jnp.asarray([prefix_len]))
    np.testing.assert_allclose(logits[i, :len(b)], want[0, prefix_len - 1:prefix_len - 1 + len(b)],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('name', ['gemma_tiny', 'gemma3_tiny'])
def test_causal_prefix_lm_equals_gemma(name):
  """prefix_lm=False: a plain causal LM over ``<bos> prompt targets`` (Gemma's own forward)."""
  llm = gemma_lib.gemma_config(name)
  model = prefix_lm.PrefixLM(prefix_lm.PrefixLMConfig(llm=llm, prefix_lm=False,
                                                      one_based_positions=False))
  prompt, targets = _rows(PROMPTS, TARGETS, 6, 5)
  params = nn.unbox(model.init(jax.random.key(0), prompt, targets)['params'])
  logits = model.apply({'params': params}, prompt, targets)
  ref = gemma_lib.Gemma(llm)
  for i, (a, b) in enumerate(zip(PROMPTS, TARGETS)):
    tokens = jnp.asarray([[2, *a, *b]], jnp.int32)
    want = ref.apply({'params': params['llm']}, tokens)
    np.testing.assert_allclose(logits[i, :len(b)], want[0, len(a):len(a) + len(b)],
                               atol=1e-4, rtol=1e-4)


def _config(family, name, method='adalink', **model):
  peft_block = dict(method=method, rank=4, modalities=('text', 'image'), decoder_inputs=False)
  if family == 'gemma':
    peft_block['modalities'] = ('text',)
  return ml_collections.ConfigDict(dict(model=dict(family=family, name=name, **model),
                                        peft=peft_block))


@pytest.mark.parametrize('family,name', [('gemma', 'gemma3_tiny'),
                                         ('paligemma', 'paligemma_tiny')])
def test_generate_agrees_with_teacher_forcing(family, name):
  """Greedy tokens are the argmax of the teacher-forced logits on themselves (cache == no
  cache), and beam search with one beam and no length penalty is greedy."""
  setup = model_builder.build(_config(family, name, separator_id=SEP))
  batch = setup.init_batch(2, 6, 5)
  params = nn.unbox(setup.init(jax.random.key(0), batch))
  # A non-zero adapter, so the seam is exercised on both paths.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if 'adapter' in jax.tree_util.keystr(p) else x, params)
  prompt, _ = _rows(PROMPTS, TARGETS, 6, 5)
  batch = dict(batch, encoder_input_tokens=prompt)
  tokens = setup.generate(params, batch, 5)
  forced = setup.forward(params, dict(batch, decoder_target_tokens=tokens), None)
  want = np.asarray(jnp.argmax(forced, -1))
  got = np.asarray(tokens)
  for i in range(2):  # compare up to and including the first EOS
    stop = next((j for j, t in enumerate(got[i]) if t == setup.eos_id), len(got[i]) - 1)
    np.testing.assert_array_equal(got[i, :stop + 1], want[i, :stop + 1])
  beam = setup.generate(params, batch, 5, method='beam', num_beams=1, length_penalty=0.0)
  np.testing.assert_array_equal(np.asarray(beam), got)


def test_adalink_trains_on_gemma_family():
  """Identity at init (zero U), only the adapter trains, and the loss goes down."""
  setup = model_builder.build(_config('gemma', 'gemma3_tiny'))
  batch = setup.init_batch(2, 6, 5)
  prompt, targets = _rows(PROMPTS, TARGETS, 6, 5)
  batch = dict(batch, encoder_input_tokens=prompt, decoder_target_tokens=targets,
               decoder_loss_weights=(targets > 0).astype(jnp.float32))
  params = nn.unbox(setup.init(jax.random.key(0), batch))
  trainable, frozen = peft.split(params, setup.trainable)
  assert set(trainable) == {'encoder_input_adapter'}
  plain = prefix_lm.PrefixLM(setup.model_config)
  np.testing.assert_array_equal(setup.forward(params, batch, None),
                                plain.apply({'params': frozen}, prompt, targets))
  step = jax.jit(peft_train.make_train_step(setup.model, optax.adam(1e-2),
                                            forward=setup.forward))
  opt_state = optax.adam(1e-2).init(trainable)
  losses = []
  for i in range(8):
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, jax.random.key(i))
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.1, losses


def test_score_targets_matches_references():
  """The rank-classification score (families' score_targets): T5 == decoding.score_sequences;
  Gemma == per-row log-softmax of a plain causal Gemma over <bos> prompt target, to EOS."""
  from adalink_jax import decoding  # pylint: disable=g-import-not-at-top
  prompt, targets = _rows(PROMPTS, TARGETS, 6, 5)
  targets = targets.at[0, 3:].set(jnp.asarray([1, 9]))  # a token after EOS must not count
  t5 = model_builder.build(ml_collections.ConfigDict(dict(
      model=dict(family='t5', name='t5_1_1_tiny'), peft=dict(method='ft'))))
  params = nn.unbox(t5.init(jax.random.key(0), t5.init_batch(2, 6, 5)))
  batch = dict(encoder_input_tokens=prompt)
  encoded, mask = t5.encode(params, batch)
  want, _ = decoding.score_sequences(t5.model, params, encoded, mask, targets)
  np.testing.assert_allclose(t5.score_targets(params, batch, targets), want, rtol=1e-5)
  g = model_builder.build(_config('gemma', 'gemma3_tiny', method='ft'))
  params = nn.unbox(g.init(jax.random.key(1), g.init_batch(2, 6, 5)))
  got = np.asarray(g.score_targets(params, batch, targets))
  ref = gemma_lib.Gemma(g.llm_config)
  for i, (a, b) in enumerate(zip(PROMPTS, [[20, 21, 22, 1], [23, 1]])):
    logits = ref.apply({'params': params['llm']}, jnp.asarray([[2, *a, *b]], jnp.int32))[0]
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float64)))
    want = sum(log_probs[len(a) + j, tok] for j, tok in enumerate(b))
    np.testing.assert_allclose(got[i], want, rtol=1e-5)


def test_answer_only_head_gives_the_full_heads_loss():
  """The LM head on the answer's rows only == the head on every slot, then those rows kept."""
  setup = model_builder.build(_config('gemma', 'gemma3_tiny'))
  prompt, targets = _rows(PROMPTS, TARGETS, 6, 5)
  batch = dict(setup.init_batch(2, 6, 5), encoder_input_tokens=prompt,
               decoder_target_tokens=targets,
               decoder_loss_weights=(targets > 0).astype(jnp.float32))
  params = nn.unbox(setup.init(jax.random.key(0), batch))
  full = prefix_lm.PrefixLM(setup.model_config.replace(full_head=True),
                            setup.model.encoder_input_adapter)
  loss = lambda logits: peft_train.token_cross_entropy(logits, targets,
                                                       batch['decoder_loss_weights'])[0]
  ours = setup.forward(params, batch, None)
  ref = full.apply({'params': params}, prompt, targets)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss(ours), loss(ref), rtol=1e-6)


@pytest.mark.parametrize('activation', ['identity', 'gelu'])
def test_fold_into_a_separate_gemma_input_table(activation):
  """The folded table, looked up and scaled as Gemma does, is the seam's output on text slots;
  export's fold for the decoder-only family writes it under the input table's name."""
  from adalink_jax.peft import registry  # pylint: disable=g-import-not-at-top
  config = _config('gemma', 'gemma3_tiny')
  config.peft.activation = activation
  config.peft.use_bias = True
  setup = model_builder.build(config)
  params = nn.unbox(setup.init(jax.random.key(0), setup.init_batch(2, 6, 5)))
  params = jax.tree_util.tree_map_with_path(  # a trained-looking adapter
      lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape)
      if 'adapter' in jax.tree_util.keystr(p) else x, params)
  fold = registry.get('adalink').fold(peft.parse(config.peft))
  folded = fold(params, None)['llm/embedder/input_embedding']
  tokens = jnp.asarray([[5, 9, 17, 33]], jnp.int32)
  seam = prefix_lm.PrefixLM(setup.model_config, setup.model.encoder_input_adapter)
  want = seam.apply({'params': params}, jnp.concatenate([tokens, jnp.zeros((1, 1), jnp.int32)], 1),
                    method=prefix_lm.PrefixLM.prefix).embeddings[0, -4:]  # bos + 4, left-aligned
  got = folded[tokens[0]] * np.sqrt(setup.llm_config.d_model).astype(np.float32)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# Label tokens of different lengths, right-padded after EOS (rank_classification's layout).
CANDIDATES = np.asarray([[20, 21, 1, 0], [23, 1, 0, 0], [30, 31, 32, 1]], np.int32)


def _banked(family: str, name: str):
  """(setup, batch of two, params): a per-task adapter bank on prompt and answer with
  trained-looking (random, non-zero) weights, and the rows on different task ids."""
  config = _config(family, name, separator_id=SEP) if family != 't5' else _config(family, name)
  config.peft.update(decoder_inputs=True, num_tasks=2)
  setup = model_builder.build(config)
  prompt, _ = _rows(PROMPTS, TARGETS, 6, 5)
  batch = dict(setup.init_batch(2, 6, 5), encoder_input_tokens=prompt,
               task_id=jnp.asarray([1, 0], jnp.int32))
  if 'image' in batch:
    batch['image'] = jax.random.uniform(jax.random.key(2), batch['image'].shape, minval=-1)
  params = nn.unbox(setup.init(jax.random.key(0), batch))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.2 * jax.random.normal(jax.random.key(3), x.shape)
      if 'adapter' in jax.tree_util.keystr(p) else x, params)
  return setup, batch, params


@pytest.mark.parametrize('family,name', [('gemma', 'gemma3_tiny'), ('paligemma', 'paligemma_tiny'),
                                         ('t5', 't5_1_1_tiny')])
def test_score_candidates_shares_the_prefix(family, name):
  """``score_candidates`` (prefix once, then every candidate) == ``score_targets`` of each
  candidate (a full teacher-forced forward), with a per-task adapter bank on prompt and answer
  and mixed task ids; the decoder-only family also in groups of one and of two (padded)."""
  setup, batch, params = _banked(family, name)
  want = np.stack([setup.score_targets(params, batch, jnp.broadcast_to(c, (2, 4)))
                   for c in CANDIDATES], axis=1)
  assert len(set(np.argmax(want, 1).tolist())) > 1 or np.ptp(want) > 0.1, want
  np.testing.assert_allclose(setup.score_candidates(params, batch, CANDIDATES), want,
                             rtol=1e-5, atol=1e-5)
  if family == 't5':
    return
  cfg, t = setup.llm_config, CANDIDATES.shape[1]
  cache_slots = 6 + 1 + (SEP is not None) + t - 1 + setup.model_config.num_image_tokens
  row = (4 * cfg.vocab_size * (t - 1) +
         2 * cfg.num_layers * cache_slots * cfg.num_kv_heads * cfg.head_dim * 4)
  for rows in (2, 4):  # two examples: groups of one, then of two (the last group padded)
    setup.score_group_bytes = rows * row
    np.testing.assert_allclose(setup.score_candidates(params, batch, CANDIDATES), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('family,name', [('gemma', 'gemma3_tiny'), ('paligemma', 'paligemma_tiny'),
                                         ('t5', 't5_1_1_tiny')])
def test_generate_and_score_runs_the_prompt_once_for_both(family, name):
  """Evaluation's ``generate_and_score`` (one encode / prefill, its cache sized for the longer
  of the decode and the labels) == ``generate`` and ``score_candidates`` each on their own,
  for greedy decoding and for beam search (whose beams share the one prefill)."""
  setup, batch, params = _banked(family, name)
  want_scores = setup.score_candidates(params, batch, CANDIDATES)
  # greedy with the cache's room set by the labels (3 tokens), beams with it set by the decode
  for max_len, kw in ((2, dict(method='greedy')),
                      (7, dict(method='beam', num_beams=3, length_penalty=0.6))):
    tokens, scores = jax.jit(lambda p, b: setup.generate_and_score(  # pylint: disable=cell-var-from-loop
        p, b, max_len, CANDIDATES, **kw))(params, batch)
    assert tokens.shape == (2, max_len)
    np.testing.assert_array_equal(tokens, setup.generate(params, batch, max_len, **kw))
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
