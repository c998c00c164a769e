"""Gemma 1/2/3 decoders against HF transformers: logits, greedy decoding, prefix-LM masks, scan.

Tiny random HF models (every weight random, norms included, so ``1 + w`` matters) are saved
with ``save_pretrained`` and loaded through :func:`load_hf_gemma`. Sliding window 4 with
sequences of 12 so local layers really drop keys; small soft-caps so tanh is not linear.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from adalink_jax.checkpoints import common
from adalink_jax.checkpoints import hf_gemma
from adalink_jax.models import gemma

_TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             head_dim=8, pad_token_id=0, bos_token_id=2, eos_token_id=1)
_HF = {
    'gemma': lambda: (transformers.GemmaForCausalLM, transformers.GemmaConfig(
        num_hidden_layers=3, num_key_value_heads=1, **_TINY)),  # MQA
    'gemma2': lambda: (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        num_hidden_layers=4, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=12,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **_TINY)),
    'gemma3': lambda: (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        num_hidden_layers=7, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=12,
        rope_parameters={
            'full_attention': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e6},
            'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}}, **_TINY)),
}
KINDS = sorted(_HF)


def _randomize(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """kind -> (HF model (eager attention, eval), its save_pretrained directory)."""
  out = {}
  for i, kind in enumerate(KINDS):
    cls, config = _HF[kind]()
    config._attn_implementation = 'eager'
    torch.manual_seed(i)
    model = cls(config).eval()
    _randomize(model, seed=i)
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    model.generation_config.eos_token_id = None  # compare fixed-length continuations
    out[kind] = (model, path)
  return out


def _hf_logits(model, tokens, **kw) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(np.asarray(tokens)), **kw).logits.numpy()


def _tokens(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, 128, shape).astype(np.int32)


@pytest.mark.parametrize('kind', KINDS)
def test_logits_match_hf_beyond_sliding_window(saved, kind):
  hf_model, path = saved[kind]
  cfg, params = hf_gemma.load_hf_gemma(path)
  assert cfg.num_layers == hf_model.config.num_hidden_layers
  tokens = _tokens(0, (2, 12))
  mask = np.ones((2, 12), bool)
  mask[1, :3] = False  # a left-padded row: keys masked, positions restart after the padding
  positions = np.asarray(gemma.default_positions(jnp.asarray(mask)))
  ours = gemma.Gemma(cfg).apply({'params': params}, jnp.asarray(tokens), jnp.asarray(positions),
                                jnp.asarray(mask))
  ref = _hf_logits(hf_model, tokens, attention_mask=torch.tensor(mask.astype(np.int64)),
                   position_ids=torch.tensor(positions.astype(np.int64)))
  assert ours.shape == (2, 12, 128) and ours.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ours)[mask], ref[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', KINDS)
def test_greedy_decoding_matches_hf_generate(saved, kind):
  hf_model, path = saved[kind]
  cfg, params = hf_gemma.load_hf_gemma(path)
  prompts = [[2, 17, 90, 33, 5, 61], [2, 44, 9], [2, 100, 7, 7]]
  width, new = max(map(len, prompts)), 9  # 6 + 9 slots: well past the window of 4
  tokens = np.zeros((3, width), np.int32)
  mask = np.zeros((3, width), bool)
  for row, p in enumerate(prompts):  # left padding, as HF generate wants for decoder-only
    tokens[row, width - len(p):], mask[row, width - len(p):] = p, True
  ours = gemma.greedy_generate(gemma.Gemma(cfg), params, jnp.asarray(tokens), jnp.asarray(mask),
                               new)
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor(tokens.astype(np.int64)),
                            attention_mask=torch.tensor(mask.astype(np.int64)),
                            do_sample=False, max_new_tokens=new, min_new_tokens=new,
                            pad_token_id=0)[:, width:].numpy()
  np.testing.assert_array_equal(np.asarray(ours), ref)
  assert len(set(map(tuple, ref.tolist()))) > 1  # the prompts lead to different continuations


def test_cached_decode_equals_teacher_forcing(saved):
  """prefix-LM prefill + decode_step logits at every position == one full forward pass."""
  cfg, params = hf_gemma.load_hf_gemma(saved['gemma3'][1])
  model, variables = gemma.Gemma(cfg), {'params': params}
  tokens = jnp.asarray(_tokens(1, (2, 12)))
  prefix = jnp.asarray([3, 5])  # full attention inside the prompt's first 3 / 5 tokens
  full = model.apply(variables, tokens, prefix_len=prefix)
  x = model.apply(variables, tokens[:, :5], method=gemma.Gemma.embed)
  logits, cache = model.apply(variables, x, prefix_len=prefix, max_len=12,
                              method=gemma.Gemma.prefill)
  steps = [logits]
  for t in range(5, 12):
    logits, cache = model.apply(variables, tokens[:, t], cache, method=gemma.Gemma.decode_step)
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-5)
  assert int(cache.index) == 12 and cache.next_position.tolist() == [12, 12]
  with pytest.raises(ValueError, match='cache is full'):
    model.apply(variables, tokens[:, 0], cache, method=gemma.Gemma.decode_step)


def test_seam_input_embeddings_replace_the_embedder():
  cfg = gemma.gemma_config('gemma2_tiny')
  model, tokens = gemma.Gemma(cfg), jnp.asarray(_tokens(5, (2, 6)))
  variables = model.init(jax.random.key(0), tokens)
  x = model.apply(variables, tokens, method=gemma.Gemma.embed)
  np.testing.assert_allclose(model.apply(variables, input_embeddings=x),
                             model.apply(variables, tokens), atol=1e-6)
  shifted = model.apply(variables, input_embeddings=x.at[:, 0].add(1.0))
  assert np.abs(np.asarray(shifted - model.apply(variables, tokens))[:, 1:]).max() > 1e-3


def _dense_prefix_mask(valid, prefix_len, window=None):
  """Reference by loops: query q sees key k iff k real and (k <= q or k < prefix) [and near]."""
  b, n = valid.shape
  out = np.zeros((b, n, n), bool)
  for i in range(b):
    for q in range(n):
      for k in range(n):
        seen = valid[i, k] and (k <= q or k < prefix_len[i])
        out[i, q, k] = seen and (window is None or abs(q - k) < window)
  return out


def test_prefix_lm_mask_equals_dense_reference():
  valid = np.ones((3, 9), bool)
  valid[2, :2] = False
  prefix = np.array([0, 4, 6])
  slots = jnp.arange(9)
  for window in (None, 3):
    got = gemma.attention_mask(jnp.asarray(valid), slots, slots, jnp.asarray(prefix), window)
    np.testing.assert_array_equal(np.asarray(got), _dense_prefix_mask(valid, prefix, window))


@pytest.mark.parametrize('kind', ['gemma', 'gemma3'])
def test_prefix_lm_logits_match_hf_with_dense_mask(saved, kind):
  """prefix_len=[5, 8]: our logits == ours with an explicit dense mask == HF given that mask."""
  hf_model, path = saved[kind]
  cfg, params = hf_gemma.load_hf_gemma(path)
  model, variables = gemma.Gemma(cfg), {'params': params}
  tokens = jnp.asarray(_tokens(2, (2, 12)))
  prefix = np.array([5, 8])
  dense = _dense_prefix_mask(np.ones((2, 12), bool), prefix)
  ours = model.apply(variables, tokens, prefix_len=jnp.asarray(prefix))
  explicit = model.apply(variables, model.apply(variables, tokens, method=gemma.Gemma.embed),
                         attention=jnp.asarray(dense),
                         method=gemma.Gemma.decode_from_embeddings)
  np.testing.assert_allclose(ours, explicit, atol=1e-6)
  causal = model.apply(variables, tokens)
  # Prefix queries see later prefix keys: their logits change; the suffix's last one too.
  assert np.abs(np.asarray(ours - causal)[0, :4]).max() > 1e-2

  additive = lambda m: torch.tensor(np.where(m, 0.0, np.finfo(np.float32).min)[:, None],
                                    dtype=torch.float32)
  if kind == 'gemma':
    hf_mask = additive(dense)
  else:
    local = _dense_prefix_mask(np.ones((2, 12), bool), prefix, cfg.sliding_window)
    hf_mask = {'full_attention': additive(dense), 'sliding_attention': additive(local)}
  np.testing.assert_allclose(ours, _hf_logits(hf_model, tokens, attention_mask=hf_mask),
                             atol=1e-4, rtol=1e-4)


def test_scanned_with_remat_equals_unscanned(saved):
  cfg, params = hf_gemma.load_hf_gemma(saved['gemma3'][1])
  scfg, sparams = hf_gemma.load_hf_gemma(saved['gemma3'][1], scan_layers=True,
                                         remat_policy='full')
  assert sparams['layers']['attn']['k_proj']['kernel'].shape == (7, 32, 2, 8)
  np.testing.assert_array_equal(sparams['layers']['mlp']['up_proj']['kernel'][3],
                                params['layers_3']['mlp']['up_proj']['kernel'])
  tokens = jnp.asarray(_tokens(3, (2, 12)))

  def loss(p, c):
    return jnp.mean(gemma.Gemma(c).apply({'params': p}, tokens) ** 2)

  (l0, g0), (l1, g1) = (jax.value_and_grad(loss)(params, cfg),
                        jax.value_and_grad(loss)(sparams, scfg))
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  np.testing.assert_allclose(g1['layers']['attn']['q_proj']['kernel'][5],
                             g0['layers_5']['attn']['q_proj']['kernel'], atol=1e-5, rtol=1e-4)
  mask = jnp.ones((2, 12), bool)
  np.testing.assert_array_equal(
      gemma.greedy_generate(gemma.Gemma(cfg), params, tokens, mask, 6),
      gemma.greedy_generate(gemma.Gemma(scfg), sparams, tokens, mask, 6))


def test_logical_axes_name_kv_heads():
  cfg = gemma.gemma_config('gemma3_tiny', scan_layers=True)
  boxed = jax.eval_shape(lambda: gemma.Gemma(cfg).init(jax.random.key(0),
                                                       jnp.zeros((1, 2), jnp.int32)))['params']
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, nn.Partitioned)))[0]
  # Every leaf carries one logical name per dimension (a bare array would have no .names).
  names = {'/'.join(str(k.key) for k in path): leaf.names for path, leaf in leaves}
  assert all(len(leaf.names) == leaf.value.ndim for _, leaf in leaves)
  assert names['layers/attn/k_proj/kernel'] == ('layers', 'embed', 'kv_heads', 'kv')
  assert names['layers/attn/q_proj/kernel'] == ('layers', 'embed', 'heads', 'kv')
  assert names['layers/attn/o_proj/kernel'] == ('layers', 'heads', 'kv', 'embed')
  assert names['embedder/input_embedding'] == ('vocab', 'embed')
  assert names['layers/mlp/down_proj/kernel'] == ('layers', 'mlp', 'embed')
  assert len(names) == 15  # 4 projections, 2 QK norms, 4 layer norms, 3 MLP, 2 outer


# Published parameter counts (HF model cards / num_parameters()) of the named shapes.
_COUNTS = {'gemma_2b': 2_506_172_416, 'gemma_7b': 8_537_680_896, 'gemma2_2b': 2_614_341_888,
           'gemma2_9b': 9_241_705_984, 'gemma2_27b': 27_227_128_320,
           'gemma3_270m': 268_098_176, 'gemma3_1b': 999_885_952}


def test_named_sizes_match_published_shapes():
  assert {n: gemma.param_count(gemma.gemma_config(n)) for n in _COUNTS} == _COUNTS
  # The 270M as published (transformers-4 config.json of google/gemma-3-270m).
  published_270m = dict(
      architectures=['Gemma3ForCausalLM'], model_type='gemma3_text', vocab_size=262144,
      hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
      num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
      rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None,
      layer_types=['sliding_attention'] * 5 + ['full_attention'] +
      ['sliding_attention'] * 5 + ['full_attention'] + ['sliding_attention'] * 5 +
      ['full_attention'], final_logit_softcapping=None, attn_logit_softcapping=None,
      hidden_activation='gelu_pytorch_tanh', rms_norm_eps=1e-6)
  assert hf_gemma.config_from_hf(published_270m) == gemma.gemma_config('gemma3_270m')
  # HF's own class defaults are the Gemma 7B and Gemma 2 2B shapes.
  assert hf_gemma.config_from_hf(transformers.GemmaConfig().to_dict()) == \
      gemma.gemma_config('gemma_7b')
  assert hf_gemma.config_from_hf(transformers.Gemma2Config().to_dict()) == \
      gemma.gemma_config('gemma2_2b')
  g3 = hf_gemma.config_from_hf(transformers.Gemma3TextConfig(
      num_hidden_layers=18, sliding_window=512, hidden_size=640, intermediate_size=2048,
      num_attention_heads=4, num_key_value_heads=1, vocab_size=262144).to_dict())
  assert g3 == gemma.gemma_config('gemma3_270m')


def test_gemma3_multimodal_checkpoint_text_part_matches_hf():
  """Gemma3ForConditionalGeneration: text_config and model.language_model.* tensors load."""
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14)
  text = dict(num_hidden_layers=7, num_key_value_heads=2, sliding_window=4,
              query_pre_attn_scalar=12, **_TINY)
  config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                     mm_tokens_per_image=4, image_token_index=127,
                                     boi_token_index=125, eoi_token_index=126)
  config.text_config._attn_implementation = 'eager'
  torch.manual_seed(0)
  hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
  _randomize(hf_model, seed=7)
  named = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  assert any(k.startswith('model.vision_tower.') for k in named)
  cfg = hf_gemma.config_from_hf(json.loads(config.to_json_string()))
  assert cfg.layer_types.count(gemma.GLOBAL) == 1 and cfg.use_qk_norm
  params = hf_gemma.params_from_hf(named, cfg)
  tokens = _tokens(4, (1, 10))
  ours = gemma.Gemma(cfg).apply({'params': params}, jnp.asarray(tokens))
  np.testing.assert_allclose(ours, _hf_logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


def test_loader_lists_every_mismatch(saved):
  _, path = saved['gemma2']
  cfg, params = hf_gemma.load_hf_gemma(path)
  named = {f'model.layers.{i}.self_attn.q_proj.weight': np.zeros((32, 32), np.float32)
           for i in range(4)}
  named['model.embed_tokens.weight'] = np.zeros((128, 32), np.float32)
  named['model.layers.0.self_attn.rotary.weight'] = np.zeros((3,), np.float32)
  wrong = cfg.replace(num_heads=2, head_dim=8)  # q_proj should then be [16, 32]
  with pytest.raises(common.CheckpointMismatchError) as err:
    hf_gemma.params_from_hf(named, wrong)
  msg = str(err.value)
  assert 'model.layers.0.self_attn.rotary.weight' in msg
  assert 'does not fit attn/q_proj/kernel' in msg and 'final_norm/scale' in msg
  assert 'missing from the checkpoint (45)' in msg  # 11 per layer x 4 + final norm
  assert 'layers_3/mlp/down_proj/kernel' in err.value.missing

  tied = {'model.embed_tokens.weight': np.ones((4, 2), np.float32),
          'lm_head.weight': np.zeros((4, 2), np.float32)}
  with pytest.raises(ValueError, match='untied head is not supported'):
    hf_gemma.params_from_hf(tied, cfg)


@pytest.mark.parametrize('change, message', [
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e4}),
     "rope_type 'yarn' is not supported"),
    (dict(attention_bias=True), 'attention_bias=true'),
    (dict(model_type='llama'), "model_type='llama' is not a Gemma text decoder"),
    (dict(tie_word_embeddings=False), 'tie_word_embeddings=false'),
])
def test_config_refuses_what_the_model_does_not_implement(change, message):
  base = transformers.Gemma2Config(**_TINY, num_hidden_layers=2).to_dict()
  with pytest.raises(ValueError, match=message):
    hf_gemma.config_from_hf({**base, **change})


def test_config_validation_and_bf16_embedding_scale():
  with pytest.raises(ValueError, match='local layers need sliding_window'):
    gemma.GemmaConfig(num_layers=2, layer_types=('local', 'global'))
  with pytest.raises(ValueError, match='3 entries'):
    gemma.GemmaConfig(num_layers=3, layer_types=('local', 'global'), sliding_window=4)
  # HF rounds sqrt(3072) = 55.4256 to bf16 (55.5) before multiplying: so do we.
  cfg = gemma.GemmaConfig(vocab_size=4, d_model=3072, num_layers=1, num_heads=1, head_dim=4,
                          d_ff=4, dtype=jnp.bfloat16)
  params = {'input_embedding': jnp.ones((4, 3072))}
  x = gemma.Embedder(4, 3072, jnp.bfloat16).apply({'params': params}, jnp.array([[1]]),
                                                  method=gemma.Embedder.encode)
  assert x.dtype == jnp.bfloat16 and float(x[0, 0, 0]) == 55.5
  with pytest.raises(ValueError, match='exactly one of tokens and input_embeddings'):
    gemma.Gemma(cfg).init(jax.random.key(0))
