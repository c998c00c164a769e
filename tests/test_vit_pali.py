"""ViT (big_vision / SigLIP style) and the PaLI-style model.

References we did not write: HF transformers' PyTorch ``SiglipVisionModel`` (whole tiny
ViT incl. MAP head, weights copied from ours), an explicit-loop numpy sincos formula,
closed-form parameter counts, and teacher-forced decoding for the KV-cache loop.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from adalink_jax import decoding
from adalink_jax.models import pali as pali_lib
from adalink_jax.models import t5 as t5_lib
from adalink_jax.models import vit as vit_lib

B = 2


def _images(seed, size=16, b=B):
  return jax.random.uniform(jax.random.key(seed), (b, size, size, 3), jnp.float32, -1.0, 1.0)


def _init_vit(cfg, seed=0):
  model = vit_lib.ViT(cfg)
  params = nn.unbox(model.init(jax.random.key(seed), _images(99, cfg.image_size[0]))['params'])
  return model, params


def _perturb(params, seed, scale=0.1):
  """Moves every leaf off its init (zero biases, unit LN scales) so weight mapping errors show."""
  rng = np.random.default_rng(seed)  # numpy: no per-shape XLA compilation
  return jax.tree_util.tree_map(
      lambda l: l + jnp.asarray(scale * rng.standard_normal(l.shape), l.dtype), params)


# ------------------------------------------------------------------ ViT


@pytest.mark.parametrize('pool, shape', [('none', (B, 16, 32)), ('gap', (B, 32)),
                                         ('map', (B, 32)), ('tok', (B, 32))])
def test_vit_output_shapes_per_pooling(pool, shape):
  cfg = vit_lib.vit_config('tiny', pool_type=pool)
  model, params = _init_vit(cfg)
  out = model.apply({'params': params}, _images(1))
  assert out.shape == shape and out.dtype == jnp.float32
  assert ('MAPHead_0' in params) == (pool == 'map')
  assert ('cls' in params) == (pool == 'tok')
  assert params['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']['query'][
      'kernel'].shape == (32, 4, 8)
  assert params['embedding']['kernel'].shape == (4, 4, 3, 32)


def test_gap_is_mean_of_tokens_and_tok_uses_cls():
  cfg = vit_lib.vit_config('tiny')
  model, params = _init_vit(cfg)
  params = _perturb(params, 3)
  x = _images(2)
  tokens = model.apply({'params': params}, x)
  gap = vit_lib.ViT(cfg.replace(pool_type='gap')).apply({'params': params}, x)
  np.testing.assert_allclose(gap, tokens.mean(axis=1), atol=1e-6)
  tok_model = vit_lib.ViT(cfg.replace(pool_type='tok'))
  p_tok = dict(params, cls=jnp.zeros((1, 1, 32)))
  a = tok_model.apply({'params': p_tok}, x)
  cls = jnp.asarray(np.random.default_rng(4).standard_normal((1, 1, 32)), jnp.float32)
  b = tok_model.apply({'params': dict(p_tok, cls=cls)}, x)
  assert float(jnp.abs(a - b).max()) > 1e-3


def _sincos_reference(h, w, width, temperature=10000.0):
  """Explicit loops over positions and frequencies (MoCo v3 description)."""
  q = width // 4
  out = np.zeros((h * w, width), np.float64)
  for y in range(h):
    for x in range(w):
      for k in range(q):
        omega = temperature ** (-k / (q - 1))
        row = y * w + x
        out[row, k] = math.sin(x * omega)
        out[row, q + k] = math.cos(x * omega)
        out[row, 2 * q + k] = math.sin(y * omega)
        out[row, 3 * q + k] = math.cos(y * omega)
  return out


def test_sincos2d_matches_independent_formula_and_has_no_param():
  pe = vit_lib.posemb_sincos_2d(3, 5, 16)
  assert pe.shape == (1, 15, 16)
  np.testing.assert_allclose(np.asarray(pe[0]), _sincos_reference(3, 5, 16), atol=1e-6)
  cfg = vit_lib.vit_config('tiny', posemb='sincos2d')
  model, params = _init_vit(cfg)
  assert 'pos_embedding' not in params
  # With the learned table set to the sincos values the two models agree exactly.
  learned = vit_lib.ViT(cfg.replace(posemb='learn'))
  p_learn = dict(params, pos_embedding=vit_lib.posemb_sincos_2d(4, 4, 32))
  x = _images(4)
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             learned.apply({'params': p_learn}, x), atol=1e-6)


def _to_hf_siglip(params, cfg):
  """Our big_vision-layout tree -> state dict of HF SiglipVisionModel."""
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  w = cfg.width
  sd = {
      'embeddings.patch_embedding.weight': t(np.transpose(params['embedding']['kernel'],
                                                          (3, 2, 0, 1))),
      'embeddings.patch_embedding.bias': t(params['embedding']['bias']),
      'embeddings.position_embedding.weight': t(params['pos_embedding'][0]),
      'post_layernorm.weight': t(params['Transformer']['encoder_norm']['scale']),
      'post_layernorm.bias': t(params['Transformer']['encoder_norm']['bias']),
  }
  ln = lambda pre, p: {f'{pre}.weight': t(p['scale']), f'{pre}.bias': t(p['bias'])}
  dense = lambda pre, p: {f'{pre}.weight': t(np.asarray(p['kernel']).T),
                          f'{pre}.bias': t(p['bias'])}
  qkv = lambda p: (np.asarray(p['kernel']).reshape(w, w).T, np.asarray(p['bias']).reshape(w))
  for i in range(cfg.depth):
    blk = params['Transformer'][f'encoderblock_{i}']
    pre = f'encoder.layers.{i}'
    sd.update(ln(f'{pre}.layer_norm1', blk['LayerNorm_0']))
    sd.update(ln(f'{pre}.layer_norm2', blk['LayerNorm_1']))
    att = blk['MultiHeadDotProductAttention_0']
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      kern, bias = qkv(att[ours])
      sd[f'{pre}.self_attn.{theirs}.weight'] = t(kern)
      sd[f'{pre}.self_attn.{theirs}.bias'] = t(bias)
    sd[f'{pre}.self_attn.out_proj.weight'] = t(np.asarray(att['out']['kernel']).reshape(w, w).T)
    sd[f'{pre}.self_attn.out_proj.bias'] = t(att['out']['bias'])
    sd.update(dense(f'{pre}.mlp.fc1', blk['MlpBlock_0']['Dense_0']))
    sd.update(dense(f'{pre}.mlp.fc2', blk['MlpBlock_0']['Dense_1']))
  head = params['MAPHead_0']
  att = head['MultiHeadDotProductAttention_0']
  parts = [qkv(att[n]) for n in ('query', 'key', 'value')]
  sd['head.probe'] = t(head['probe'])
  sd['head.attention.in_proj_weight'] = t(np.concatenate([k for k, _ in parts], axis=0))
  sd['head.attention.in_proj_bias'] = t(np.concatenate([b for _, b in parts], axis=0))
  sd['head.attention.out_proj.weight'] = t(np.asarray(att['out']['kernel']).reshape(w, w).T)
  sd['head.attention.out_proj.bias'] = t(att['out']['bias'])
  sd.update(ln('head.layernorm', head['LayerNorm_0']))
  sd.update(dense('head.mlp.fc1', head['MlpBlock_0']['Dense_0']))
  sd.update(dense('head.mlp.fc2', head['MlpBlock_0']['Dense_1']))
  return sd


@pytest.mark.parametrize('ours, hf_act', [('gelu', 'gelu_pytorch_tanh'), ('gelu_exact', 'gelu')])
def test_vit_matches_hf_siglip_vision_model(ours, hf_act):
  cfg = vit_lib.vit_config('tiny', pool_type='map', mlp_activation=ours)
  model, params = _init_vit(cfg, seed=5)
  params = _perturb(params, 6)
  hf_cfg = transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_channels=3, image_size=16, patch_size=4, hidden_act=hf_act, layer_norm_eps=1e-6,
      vision_use_head=True, attn_implementation='eager')
  hf = transformers.SiglipVisionModel(hf_cfg).eval()
  missing, unexpected = hf.load_state_dict(_to_hf_siglip(params, cfg), strict=False)
  assert not unexpected and all('position_ids' in m for m in missing), (missing, unexpected)

  x = _images(7)
  with torch.no_grad():
    out = hf(pixel_values=torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)))
  pooled = model.apply({'params': params}, x)
  tokens = vit_lib.ViT(cfg.replace(pool_type='none')).apply(
      {'params': {k: v for k, v in params.items() if k != 'MAPHead_0'}}, x)
  np.testing.assert_allclose(tokens, out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=0)
  # The two activations really differ here, so the test does tell them apart.
  other = vit_lib.ViT(cfg.replace(mlp_activation='gelu_exact' if ours == 'gelu' else 'gelu'))
  assert float(jnp.abs(other.apply({'params': params}, x) - pooled).max()) > 1e-5


def test_scan_and_remat_match_python_loop():
  cfg = vit_lib.vit_config('tiny')
  model, params = _init_vit(cfg)
  params = _perturb(params, 8)
  x = _images(9)
  ref = model.apply({'params': params}, x)
  tr = params['Transformer']
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                   *[tr[f'encoderblock_{i}'] for i in range(cfg.depth)])
  p_scan = dict(params, Transformer={'encoderblock': stacked, 'encoder_norm': tr['encoder_norm']})
  scan_model = vit_lib.ViT(cfg.replace(scan_layers=True, remat_policy='full'))
  init_shapes = nn.unbox(scan_model.init(jax.random.key(0), x)['params'])
  assert jax.tree_util.tree_map(jnp.shape, init_shapes) == jax.tree_util.tree_map(jnp.shape, p_scan)
  np.testing.assert_allclose(scan_model.apply({'params': p_scan}, x), ref, atol=1e-5)
  g = lambda m, p: jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x) ** 2))(p)
  np.testing.assert_allclose(g(scan_model, p_scan)['embedding']['kernel'],
                             g(model, params)['embedding']['kernel'], atol=1e-4)


def test_vit_config_parsing_bf16_and_errors():
  c = vit_lib.vit_config('So400m/14', image_size=224)
  assert (c.width, c.depth, c.mlp_dim, c.num_heads, c.patch_size, c.num_patches) == (
      1152, 27, 4304, 16, (14, 14), 256)
  assert vit_lib.vit_config('B/16').grid == (14, 14)
  assert vit_lib.vit_config('22B/14').width == 6144
  with pytest.raises(ValueError, match='unknown ViT variant'):
    vit_lib.vit_config('Q/16')
  with pytest.raises(ValueError, match='pool_type'):
    vit_lib.vit_config('tiny', pool_type='cls')
  cfg = vit_lib.vit_config('tiny')
  model, params = _init_vit(cfg)
  with pytest.raises(ValueError, match='image_size'):
    model.apply({'params': params}, _images(1, size=20))
  bf = vit_lib.ViT(cfg.replace(dtype=jnp.bfloat16)).apply({'params': params}, _images(1))
  ref = model.apply({'params': params}, _images(1))
  assert bf.dtype == jnp.bfloat16
  assert float(jnp.abs(bf.astype(jnp.float32) - ref).max()) < 0.1


# ------------------------------------------------------------------ PaLI


class RecordingAdapter(nn.Module):
  """A real seam module: records what it sees and shifts image tokens by a learned vector."""

  @nn.compact
  def __call__(self, inputs: t5_lib.EncoderInputs) -> t5_lib.EncoderInputs:
    self.sow('intermediates', 'modality', inputs.modality)
    shift = self.param('image_shift', nn.initializers.zeros, (inputs.embeddings.shape[-1],))
    is_image = (inputs.modality == t5_lib.IMAGE)[..., None]
    return inputs._replace(embeddings=inputs.embeddings + is_image * shift)


@pytest.fixture(scope='module')
def tiny_pali():
  cfg = pali_lib.pali_config('tiny')
  model = pali_lib.PaLI(cfg, encoder_input_adapter=RecordingAdapter())
  text = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]], jnp.int32)
  dec = jnp.array([[0, 3, 4], [0, 5, 6]], jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), _images(1), text, dec)['params'])
  return model, params, text, dec


def test_pali_forward_image_first_and_image_dependence(tiny_pali):
  model, params, text, dec = tiny_pali
  assert set(params) == {'img', 'img_proj', 't5', 'encoder_input_adapter'}
  assert params['img_proj']['kernel'].shape == (32, 32)
  n = model.config.num_image_tokens
  (enc, mask), st = model.apply({'params': params}, text, _images(1), method=model.encode,
                                mutable=['intermediates'])
  assert enc.shape == (B, n + text.shape[1], 32) and n == 16
  modality = st['intermediates']['encoder_input_adapter']['modality'][0]
  np.testing.assert_array_equal(modality, np.array([[1] * n + [0] * 5] * B))
  np.testing.assert_array_equal(mask, np.concatenate([np.ones((B, n), bool), text != 0], 1))

  logits = model.apply({'params': params}, _images(1), text, dec)
  assert logits.shape == (B, 3, 256) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  other = model.apply({'params': params}, _images(2), text, dec)
  assert float(jnp.abs(other - logits).max()) > 1e-3
  # The adapter's image shift moves the logits only when there is an image.
  shifted = jax.tree_util.tree_map(lambda a: a, params)
  shifted['encoder_input_adapter'] = {'image_shift': jnp.full((32,), 0.5)}
  moved = model.apply({'params': shifted}, _images(1), text, dec)
  assert float(jnp.abs(moved - logits).max()) > 1e-3
  t_only = model.apply({'params': params}, None, text, dec)
  t_only_shift = model.apply({'params': shifted}, None, text, dec)
  np.testing.assert_array_equal(t_only, t_only_shift)


def test_pali_text_only_equals_t5_and_image_path_equals_manual(tiny_pali):
  model, params, text, dec = tiny_pali
  enc, mask = model.apply({'params': params}, text, method=model.encode)
  assert enc.shape == (B, 5, 32) and mask.shape == (B, 5)
  t5 = t5_lib.T5(model.config.t5, encoder_input_adapter=RecordingAdapter())
  t5_params = {**params['t5'], 'encoder_input_adapter': params['encoder_input_adapter']}
  np.testing.assert_allclose(model.apply({'params': params}, None, text, dec),
                             t5.apply({'params': t5_params}, text, dec), atol=1e-6)
  # Image path = ViT tokens -> x @ W + b -> T5 with image_embeddings.
  vit_tokens = vit_lib.ViT(model.config.vit).apply({'params': params['img']}, _images(1))
  proj = vit_tokens @ params['img_proj']['kernel'] + params['img_proj']['bias']
  np.testing.assert_allclose(model.apply({'params': params}, _images(1), text, dec),
                             t5.apply({'params': t5_params}, text, dec, image_embeddings=proj),
                             atol=1e-5)


def test_pali_greedy_decode_with_kv_cache(tiny_pali):
  model, params, text, _ = tiny_pali
  max_len = 6
  images = _images(3)
  enc, mask = model.apply({'params': params}, text, images, method=model.encode)
  _, state = model.apply({'params': params}, enc, mask, jnp.zeros((B, max_len), jnp.int32),
                         decode=True, method=model.decode, mutable=['cache'])
  step = jax.jit(lambda cache, tok: model.apply(
      {'params': params, 'cache': cache}, enc, mask, tok, decode=True, method=model.decode,
      mutable=['cache']))
  cache = state['cache']
  tokens = jnp.zeros((B, max_len + 1), jnp.int32)  # position 0 = decoder_start_id
  step_logits = []
  for i in range(max_len):
    logits, state = step(cache, tokens[:, i:i + 1])
    cache = state['cache']
    step_logits.append(logits[:, 0])
    tokens = tokens.at[:, i + 1].set(jnp.argmax(logits[:, 0], axis=-1))
  # Reference: the whole greedy prefix teacher-forced in one call, no cache (causal, so
  # position i sees exactly what step i saw).
  full = model.apply({'params': params}, enc, mask, tokens[:, :max_len], method=model.decode)
  np.testing.assert_allclose(jnp.stack(step_logits, axis=1), full, atol=1e-5)
  assert int(cache['t5']['decoder']['decode_index']) == max_len
  greedy = np.asarray(tokens[:, 1:])
  # adalink_jax.decoding (while_loop, stops at EOS, pads after it) must produce the same tokens.
  eos = model.config.t5.eos_id
  seen_eos = np.cumsum(greedy == eos, axis=1) - (greedy == eos) > 0
  expected = np.where(seen_eos, 0, greedy)
  np.testing.assert_array_equal(decoding.greedy_decode(model, params, enc, mask, max_len),
                                expected)
  np.testing.assert_array_equal(
      decoding.generate(model, params, text, images, method='greedy', max_decode_len=max_len),
      expected)


# ------------------------------------------------------------------ parameter counts


def _vit_count(c):
  w, m = c.width, c.mlp_dim
  block = 4 * w + 4 * w * w + 4 * w + w * m + m + m * w + w
  return (math.prod(c.patch_size) * c.num_channels * w + w + c.num_patches * w +
          c.depth * block + 2 * w)


def _t5_count(c):
  d, hk, ff, nmlp = c.d_model, c.num_heads * c.d_kv, c.d_ff, len(c.mlp_activations)
  mlp = (nmlp + 1) * d * ff
  enc = c.num_encoder_layers * (2 * d + 4 * d * hk + mlp) + d
  dec = c.num_decoder_layers * (3 * d + 8 * d * hk + mlp) + d
  rel = 2 * c.num_heads * c.relative_attention_num_buckets
  emb = c.vocab_size * d * (1 if c.tie_embeddings else 2)
  return enc + dec + rel + emb


@pytest.mark.parametrize('name, lo, hi', [('tiny', 0, 1e6), ('pali3', 3.5e9, 5e9),
                                          ('palix', 30e9, 60e9)])
def test_param_counts_without_allocating(name, lo, hi):
  cfg = pali_lib.pali_config(name)
  live_before = sum(a.nbytes for a in jax.live_arrays())
  shapes = pali_lib.param_shapes(cfg.replace(vit=cfg.vit.replace(scan_layers=True),
                                             t5=cfg.t5.replace(scan_layers=True)))
  leaves = jax.tree_util.tree_leaves(shapes)
  assert leaves and all(isinstance(l, jax.ShapeDtypeStruct) for l in leaves)
  assert sum(a.nbytes for a in jax.live_arrays()) - live_before < 1 << 20
  n = pali_lib.count_params(shapes)
  expected = _vit_count(cfg.vit) + cfg.vit.width * cfg.t5.d_model + cfg.t5.d_model + _t5_count(
      cfg.t5)
  assert n == expected == pali_lib.config_param_count(cfg)
  assert lo < n < hi, n
