"""PaliGemma 1 / 2: HF parity (logits, prefix-LM, window, greedy), big_vision npz, layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from adalink_jax.checkpoints import paligemma as pg_ckpt
from adalink_jax.models import paligemma as pg

N_IMG, IMAGE_TOKEN, VOCAB = 16, 127, 128


def _hf_config(version: int) -> transformers.PaliGemmaConfig:
  text = dict(model_type='gemma' if version == 1 else 'gemma2', vocab_size=VOCAB, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2 if version == 1 else 4,
              num_attention_heads=4, num_key_value_heads=1 if version == 1 else 2, head_dim=8,
              hidden_activation='gelu_pytorch_tanh', pad_token_id=0, eos_token_id=1,
              bos_token_id=2)
  if version == 2:  # window 4 << image (16) + prompt: the window meets the prefix block
    text.update(sliding_window=4, query_pre_attn_scalar=8, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0)
  # Our ViT 'tiny' shape, so the big_vision npz test can use paligemma_config('*_tiny').
  vision = dict(model_type='siglip_vision_model', hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
                vision_use_head=False, hidden_act='gelu_pytorch_tanh')
  cfg = transformers.PaliGemmaConfig(text_config=text, vision_config=vision,
                                     image_token_id=IMAGE_TOKEN, projection_dim=32)
  cfg._attn_implementation = 'eager'  # pylint: disable=protected-access
  return cfg


@pytest.fixture(scope='module', params=[1, 2], ids=['paligemma1', 'paligemma2'])
def hf_model(request, tmp_path_factory):
  """(version, HF model with random weights, its save_pretrained directory)."""
  torch.manual_seed(request.param)
  model = transformers.PaliGemmaForConditionalGeneration(_hf_config(request.param)).eval()
  gen = torch.Generator().manual_seed(request.param)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.2)
  path = tmp_path_factory.mktemp(f'pg{request.param}')
  model.save_pretrained(path)
  return request.param, model, path


def _batch(seed: int, text_len: int = 10, prefix_text: int = 5, pad: int = 3):
  """Images [2, 16, 16, 3], text [2, t] (bos first), text mask (example 1 right-padded)."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  text = rng.integers(3, 100, (2, text_len)).astype(np.int32)
  text[:, 0] = 2
  mask = np.ones_like(text, bool)
  mask[1, text_len - pad:] = False
  text[~mask] = 0
  prefix_len = np.full((2,), N_IMG + prefix_text, np.int32)
  return images, text, mask, prefix_len


def _hf_logits(model, images, text, mask, prefix_len, labels=None):
  ids = np.concatenate([np.full((2, N_IMG), IMAGE_TOKEN), text], 1)
  full_mask = np.concatenate([np.ones((2, N_IMG), bool), mask], 1)
  token_type = (np.arange(ids.shape[1])[None] >= prefix_len[:, None]).astype(np.int64)
  kw = {} if labels is None else dict(labels=torch.tensor(labels))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids),
                pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
                token_type_ids=torch.tensor(token_type),
                attention_mask=torch.tensor(full_mask.astype(np.int64)), **kw)
  return out.logits.numpy(), full_mask, out.loss


def _ours(cfg, params, images, text, mask, prefix_len):
  return np.asarray(pg.PaliGemma(cfg).apply({'params': params}, jnp.asarray(images),
                                             jnp.asarray(text), jnp.asarray(prefix_len),
                                             jnp.asarray(mask)))


def test_hf_logits_match_with_prefix_lm_and_window(hf_model):
  version, model, path = hf_model
  cfg, params = pg_ckpt.load_hf_paligemma(path)
  assert cfg.num_image_tokens == N_IMG and cfg.llm.num_layers == (2 if version == 1 else 4)
  batch = _batch(0)
  ref, full_mask, _ = _hf_logits(model, *batch)
  ours = _ours(cfg, params, *batch)
  assert ours.shape == ref.shape == (2, N_IMG + 10, VOCAB)
  err = np.abs(ours - ref)[full_mask].max()
  assert err < 1e-4, f'max |ours - HF| = {err}'
  # The test sees the mask: a causal-only model, or (PaliGemma 2) big_vision's window that
  # cuts the prefix, gives other logits.
  causal = _ours(cfg, params, batch[0], batch[1], batch[2], np.zeros(2, np.int32))
  assert np.abs(causal - ref)[full_mask].max() > 1e-2
  if version == 2:
    cut = _ours(cfg.replace(window_cuts_prefix=True), params, *batch)
    assert np.abs(cut - ref)[full_mask].max() > 1e-2


def test_greedy_matches_hf_generate(hf_model):
  version, model, path = hf_model
  cfg, params = pg_ckpt.load_hf_paligemma(path)
  images, text, _, _ = _batch(1, text_len=6, pad=0)
  ids = np.concatenate([np.full((2, N_IMG), IMAGE_TOKEN), text], 1)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids.astype(np.int64)),
                         pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
                         token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
                         attention_mask=torch.ones(ids.shape, dtype=torch.long),
                         max_new_tokens=8, do_sample=False, min_new_tokens=8)
  ref = ref.numpy()[:, ids.shape[1]:]
  ours = np.asarray(pg.greedy_generate(pg.PaliGemma(cfg), params, jnp.asarray(images),
                                       jnp.asarray(text), 8))
  np.testing.assert_array_equal(ours, ref)
  if version == 2:  # 22-slot prompt, window 4: big_vision's window-cut prefix decodes otherwise
    cut = pg.greedy_generate(pg.PaliGemma(cfg.replace(window_cuts_prefix=True)), params,
                             jnp.asarray(images), jnp.asarray(text), 8)
    assert (np.asarray(cut) != ref).any()


def _big_vision_npz(model, hf_dir, version: int, file) -> None:
  """The saved HF weights in big_vision's PaliGemma layout (convert_paligemma2_weights_to_hf.py's
  mapping, reversed)."""
  sd = safetensors.numpy.load_file(hf_dir / 'model.safetensors')
  vt, lm = 'vision_tower.', 'language_model.model.'  # as transformers 5.24 saves them
  vc, tc = model.config.vision_config, model.config.text_config
  w, h = vc.hidden_size, vc.num_attention_heads
  out = {'img/embedding/kernel': sd[f'{vt}embeddings.patch_embedding.weight'].transpose(2, 3, 1, 0),
         'img/embedding/bias': sd[f'{vt}embeddings.patch_embedding.bias'],
         'img/pos_embedding': sd[f'{vt}embeddings.position_embedding.weight'][None],
         'img/Transformer/encoder_norm/scale': sd[f'{vt}post_layernorm.weight'],
         'img/Transformer/encoder_norm/bias': sd[f'{vt}post_layernorm.bias'],
         'img/head/kernel': sd['multi_modal_projector.linear.weight'].T,
         'img/head/bias': sd['multi_modal_projector.linear.bias'],
         'llm/embedder/input_embedding': sd[f'{lm}embed_tokens.weight'],
         'llm/final_norm/scale': sd[f'{lm}norm.weight']}
  stack = lambda fn, n: np.stack([fn(i) for i in range(n)])
  blk = 'img/Transformer/encoderblock/'
  layer = lambda i, s: sd[f'{vt}encoder.layers.{i}.{s}']
  for ours, theirs in (('LayerNorm_0/scale', 'layer_norm1.weight'),
                       ('LayerNorm_0/bias', 'layer_norm1.bias'),
                       ('LayerNorm_1/scale', 'layer_norm2.weight'),
                       ('LayerNorm_1/bias', 'layer_norm2.bias'),
                       ('MlpBlock_0/Dense_0/bias', 'mlp.fc1.bias'),
                       ('MlpBlock_0/Dense_1/bias', 'mlp.fc2.bias'),
                       ('MultiHeadDotProductAttention_0/out/bias', 'self_attn.out_proj.bias')):
    out[blk + ours] = stack(lambda i, t=theirs: layer(i, t), vc.num_hidden_layers)
  for ours, theirs in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
    out[f'{blk}MlpBlock_0/{ours}/kernel'] = stack(
        lambda i, t=theirs: layer(i, f'mlp.{t}.weight').T, vc.num_hidden_layers)
  att = f'{blk}MultiHeadDotProductAttention_0/'
  for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
    out[f'{att}{ours}/kernel'] = stack(
        lambda i, t=theirs: layer(i, f'self_attn.{t}.weight').T.reshape(w, h, -1),
        vc.num_hidden_layers)
    out[f'{att}{ours}/bias'] = stack(
        lambda i, t=theirs: layer(i, f'self_attn.{t}.bias').reshape(h, -1), vc.num_hidden_layers)
  out[f'{att}out/kernel'] = stack(
      lambda i: layer(i, 'self_attn.out_proj.weight').T.reshape(h, -1, w), vc.num_hidden_layers)
  nl, d, nh, kh, hd = (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads,
                       tc.num_key_value_heads, tc.head_dim)
  t = lambda i, s: sd[f'{lm}layers.{i}.{s}.weight']
  out['llm/layers/attn/q_einsum/w'] = stack(
      lambda i: t(i, 'self_attn.q_proj').reshape(nh, hd, d).transpose(0, 2, 1), nl)
  out['llm/layers/attn/kv_einsum/w'] = stack(lambda i: np.stack([
      t(i, f'self_attn.{p}_proj').reshape(kh, hd, d).transpose(0, 2, 1) for p in 'kv']), nl)
  out['llm/layers/attn/attn_vec_einsum/w'] = stack(
      lambda i: t(i, 'self_attn.o_proj').T.reshape(nh, hd, d), nl)
  out['llm/layers/mlp/gating_einsum'] = stack(
      lambda i: np.stack([t(i, 'mlp.gate_proj').T, t(i, 'mlp.up_proj').T]), nl)
  out['llm/layers/mlp/linear'] = stack(lambda i: t(i, 'mlp.down_proj').T, nl)
  norms = {'pre_attention_norm': 'input_layernorm'}
  if version == 1:
    norms['pre_ffw_norm'] = 'post_attention_layernorm'
  else:
    norms.update(post_attention_norm='post_attention_layernorm',
                 pre_ffw_norm='pre_feedforward_layernorm',
                 post_ffw_norm='post_feedforward_layernorm')
  for ours, theirs in norms.items():
    out[f'llm/layers/{ours}/scale'] = stack(lambda i, s=theirs: t(i, s), nl)
  np.savez(file, **{f'params/{k}': np.asarray(v, np.float32) for k, v in out.items()})


def test_big_vision_npz_loads_and_matches_hf(hf_model, tmp_path):
  version, model, path = hf_model
  file = tmp_path / 'paligemma.npz'
  _big_vision_npz(model, path, version, file)
  name = 'paligemma_tiny' if version == 1 else 'paligemma2_tiny'
  # PaliGemma 2 through the scanned layout (stacked layers on both towers).
  cfg = pg.paligemma_config(name, scan_layers=version == 2)
  params = pg_ckpt.load_big_vision_paligemma(file, cfg)
  batch = _batch(2)
  ref, full_mask, _ = _hf_logits(model, *batch)
  err = np.abs(_ours(cfg, params, *batch) - ref)[full_mask].max()
  assert err < 1e-4, f'max |ours(npz) - HF| = {err}'


@pytest.mark.parametrize('hf_model', [1], indirect=True)
def test_big_vision_npz_mismatch_lists_names(hf_model, tmp_path):
  version, model, path = hf_model
  file = tmp_path / 'pg.npz'
  _big_vision_npz(model, path, version, file)
  cfg = pg.paligemma_config('paligemma2_tiny')  # Gemma 2 decoder vs a Gemma 1 file
  with pytest.raises(ValueError, match=r'post_attention_norm/scale[\s\S]*layers_3'):
    pg_ckpt.load_big_vision_paligemma(file, cfg)


@pytest.mark.parametrize('hf_model', [1], indirect=True)  # the layout is decoder-independent
def test_prompt_layout_loss_equals_hf_labels(hf_model):
  """Our targets / weights give HF's loss for labels built as PaliGemmaProcessor does."""
  _, model, path = hf_model
  assert pg.paligemma_prompt('caption en') == ('caption en\n', None)
  with pytest.raises(ValueError, match='newline'):
    pg.paligemma_prompt('answer en what\nis it')
  layout = pg.prompt_layout([10, 11, 12, 108], [20, 21], num_image_tokens=N_IMG)
  assert layout.tokens.tolist() == [2, 10, 11, 12, 108, 20, 21, 1]
  assert layout.prefix_len == N_IMG + 5
  assert layout.token_type_ids.tolist() == [0] * (N_IMG + 5) + [1] * 3
  cfg, params = pg_ckpt.load_hf_paligemma(path)
  images = _batch(3)[0]
  text = np.stack([layout.tokens] * 2)
  ids = np.concatenate([np.full((2, N_IMG), IMAGE_TOKEN), text], 1)
  labels = np.where(np.stack([layout.token_type_ids] * 2) == 1, ids, -100)
  prefix_len = np.full((2,), layout.prefix_len, np.int32)
  _, _, hf_loss = _hf_logits(model, images, text, np.ones_like(text, bool), prefix_len, labels)
  logits = _ours(cfg, params, images, text, np.ones_like(text, bool), prefix_len)
  logp = np.asarray(jax.nn.log_softmax(logits, -1))  # [2, n + t, vocab], two images
  nll = -np.take_along_axis(logp, np.stack([layout.targets] * 2)[..., None], 2)[..., 0]
  ours = (nll * layout.loss_weights).sum() / (2 * layout.loss_weights.sum())
  assert layout.loss_weights.sum() == 3  # suffix (2) + eos
  np.testing.assert_allclose(ours, float(hf_loss), rtol=1e-5)


def test_named_shapes_and_axis_names():
  counts = {n: pg.param_count(pg.paligemma_config(n)) for n in
            ('paligemma_3b', 'paligemma2_3b', 'paligemma2_10b', 'paligemma2_28b')}
  # Published sizes: 2.92B, 3.03B, 9.66B, 27.65B (HF model cards / PaliGemma 2 report).
  for name, want in (('paligemma_3b', 2.92e9), ('paligemma2_3b', 3.03e9),
                     ('paligemma2_10b', 9.66e9), ('paligemma2_28b', 27.65e9)):
    assert abs(counts[name] / want - 1) < 0.01, (name, counts[name])
  assert pg.paligemma_config('paligemma2_3b', image_size=896).num_image_tokens == 4096
  cfg = pg.paligemma_config('paligemma2_tiny', scan_layers=True)
  variables = jax.eval_shape(lambda: pg.PaliGemma(cfg).init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 3), jnp.int32),
      jnp.ones((1,), jnp.int32)))
  leaves = jax.tree_util.tree_leaves(variables['params'],
                                     is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  with pytest.raises(ValueError, match='unknown PaliGemma size'):
    pg.paligemma_config('paligemma3_1b')
