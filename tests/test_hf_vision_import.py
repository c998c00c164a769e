"""HF SigLIP / ViT safetensors image towers -> our ViT.

Reference we did not write: HF transformers' PyTorch SiglipVisionModel, SiglipModel and
ViTModel, built at random, moved off their init, written with save_pretrained (the official
format, incl. sharded and bf16 files); our ViT on the loaded weights must reproduce their
last_hidden_state and pooler_output.
"""
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adalink_jax import trainer
from adalink_jax.checkpoints import common
from adalink_jax.checkpoints import hf_vision
from adalink_jax.models import vit as vit_lib
from tests.test_train import tiny_config, assets  # noqa: F401  (fixture)

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_channels=3, image_size=32, patch_size=8)
B = 2


def _perturb(model, seed):
  """Moves every weight off its init (unit LN scales, zero biases) so mapping errors show."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
  return model.eval()


def _images(seed, size=32):
  return np.random.default_rng(seed).uniform(-1, 1, (B, size, size, 3)).astype(np.float32)


def _hf_out(model, x):
  with torch.no_grad():
    out = model(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2)))
  pooled = out.pooler_output
  return (out.last_hidden_state.float().numpy(),
          None if pooled is None else pooled.float().numpy())


def _expected(cfg):
  x = jnp.zeros((1, *cfg.image_size, cfg.num_channels))
  return nn.unbox(jax.eval_shape(lambda: vit_lib.ViT(cfg).init(jax.random.key(0), x))['params'])


def _ours(cfg, params, x):
  """(encoder output incl. any [cls] [b, l, w], pooled output) of our ViT."""
  out, st = vit_lib.ViT(cfg).apply({'params': params}, x, capture_intermediates=True,
                                   mutable=['intermediates'])
  return np.asarray(st['intermediates']['Transformer']['__call__'][0]), np.asarray(out)


def _config(path):
  return json.loads((path / 'config.json').read_text())


@pytest.fixture(scope='module')
def siglip_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = _perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      **VISION, attn_implementation='eager')), 1)
  path = tmp_path_factory.mktemp('siglip_vision')
  model.save_pretrained(path)
  return path, model


def test_siglip_vision_model_matches_hf(siglip_dir):
  path, model = siglip_dir
  cfg = hf_vision.vit_config_from_hf(_config(path))
  assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.patch_size, cfg.image_size,
          cfg.pool_type, cfg.mlp_activation, cfg.layer_norm_epsilon) == (
              64, 2, 128, 4, (8, 8), (32, 32), 'map', 'gelu', 1e-6)
  params = hf_vision.load_hf_vision(path, _expected(cfg), config=cfg)
  x = _images(0)
  want_tokens, want_pooled = _hf_out(model, x)
  tokens, pooled = _ours(cfg, params, x)
  assert tokens.shape == (B, 16, 64) and pooled.shape == (B, 64)
  np.testing.assert_allclose(tokens, want_tokens, atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, want_pooled, atol=1e-4, rtol=0)
  assert np.abs(want_pooled).mean() > 0.1  # a real signal, not near-zero outputs
  # PaLI-style token encoder: the MAP head in the file is skipped.
  cfg_none = cfg.replace(pool_type='none')
  p_none = hf_vision.load_hf_vision(path / 'model.safetensors', _expected(cfg_none))
  assert 'MAPHead_0' not in p_none
  np.testing.assert_allclose(_ours(cfg_none, p_none, x)[1], want_tokens, atol=1e-4, rtol=0)
  # Settings no shape shows are checked against config.json when the config is given.
  with pytest.raises(ValueError, match='mlp_activation'):
    hf_vision.load_hf_vision(path, _expected(cfg), config=cfg.replace(mlp_activation='gelu_exact'))


def test_siglip_model_sharded_file_scanned_and_placed(tmp_path):
  torch.manual_seed(2)
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
  model = _perturb(transformers.SiglipModel(transformers.SiglipConfig(
      vision_config=VISION, text_config=text, attn_implementation='eager')), 3)
  model.save_pretrained(tmp_path, max_shard_size='40KB')
  assert (tmp_path / 'model.safetensors.index.json').is_file()
  cfg = hf_vision.vit_config_from_hf(_config(tmp_path), scan_layers=True)
  expected = _expected(cfg)
  mesh = Mesh(np.array(jax.devices()[:8]), ('x',))
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), expected)
  mlp_sharding = NamedSharding(mesh, P(None, None, 'x'))  # [layers, 64, 128]: 128 over 8 devices
  shardings['Transformer']['encoderblock']['MlpBlock_0']['Dense_0']['kernel'] = mlp_sharding
  params = hf_vision.load_hf_vision(tmp_path, expected, shardings=shardings)
  kernel = params['Transformer']['encoderblock']['MlpBlock_0']['Dense_0']['kernel']
  assert kernel.shape == (2, 64, 128) and kernel.sharding == mlp_sharding
  x = _images(4)
  want_tokens, want_pooled = _hf_out(model.vision_model, x)
  tokens, pooled = _ours(cfg, params, x)
  np.testing.assert_allclose(tokens, want_tokens, atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, want_pooled, atol=1e-4, rtol=0)


def test_bf16_cast_and_bf16_file(siglip_dir, tmp_path):
  path, model = siglip_dir
  cfg = hf_vision.vit_config_from_hf(_config(path))
  f32 = common.flatten(hf_vision.load_hf_vision(path, _expected(cfg)))
  bf16 = common.flatten(hf_vision.load_hf_vision(path, _expected(cfg), dtype=jnp.bfloat16))
  assert f32.keys() == bf16.keys()
  for k in f32:
    assert bf16[k].dtype == jnp.bfloat16, k
    np.testing.assert_array_equal(bf16[k], f32[k].astype(jnp.bfloat16), err_msg=k)
  # A file written in bf16 (read without torch) loads exactly.
  model.to(torch.bfloat16).save_pretrained(tmp_path)
  model.float()
  q = model.encoder.layers[1].self_attn.q_proj.weight.detach().numpy()
  params = hf_vision.load_hf_vision(tmp_path, _expected(cfg))
  got = params['Transformer']['encoderblock_1']['MultiHeadDotProductAttention_0']['query']['kernel']
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, q.T.reshape(64, 4, 16))
  x = _images(5)
  np.testing.assert_allclose(_ours(cfg, params, x)[1], _hf_out(model, x)[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize('cls_name, qkv_bias, prefix', [('ViTModel', True, ''),
                                                         ('ViTForImageClassification', False,
                                                          'vit.')])
def test_plain_vit_matches_hf(tmp_path, cls_name, qkv_bias, prefix):
  torch.manual_seed(6)
  hf_cfg = transformers.ViTConfig(**VISION, qkv_bias=qkv_bias, attn_implementation='eager')
  model = _perturb(getattr(transformers, cls_name)(hf_cfg), 7)
  model.save_pretrained(tmp_path)
  cfg = hf_vision.vit_config_from_hf(_config(tmp_path))
  assert (cfg.pool_type, cfg.mlp_activation, cfg.layer_norm_epsilon) == ('tok', 'gelu_exact', 1e-12)
  params = hf_vision.load_hf_vision(tmp_path, _expected(cfg), config=cfg)
  x = _images(8)
  tower = model if cls_name == 'ViTModel' else model.vit
  with torch.no_grad():
    want = tower(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  tokens, pooled = _ours(cfg, params, x)
  assert tokens.shape == (B, 17, 64)
  np.testing.assert_allclose(tokens, want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, want[:, 0], atol=1e-4, rtol=0)
  bias = params['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']['key']['bias']
  assert (float(jnp.abs(bias).max()) == 0.0) == (not qkv_bias)
  # Without a [cls] parameter the function would differ: refused, with the fix named.
  with pytest.raises(ValueError, match="pool_type='tok'"):
    hf_vision.load_hf_vision(tmp_path, _expected(cfg.replace(pool_type='none')))


def _bv_resample_posemb(old, new):
  """big_vision/models/vit.py ``resample_posemb`` as published (logging dropped)."""
  gs_old, gs_new = int(np.sqrt(old.shape[1])), int(np.sqrt(new.shape[1]))
  grid = old.reshape(gs_old, gs_old, -1)
  grid = scipy.ndimage.zoom(grid, (gs_new / gs_old, gs_new / gs_old, 1), order=1)
  return grid.reshape(1, gs_new * gs_new, -1)


@pytest.mark.parametrize('family, size', [('siglip', 64), ('siglip', 48), ('vit', 64)])
def test_other_resolution_resamples_posemb_like_big_vision(tmp_path, caplog, family, size):
  """A 4x4-grid (32 px) tower loaded at 64 / 48 px: the grid is resampled as big_vision does.

  Reference: the same HF tower class built at ``size`` with that resampled table (HF's own
  ``interpolate_pos_encoding`` is bicubic; we follow big_vision, so it is not the reference).
  """
  torch.manual_seed(12)
  kind = {'siglip': 'SiglipVision', 'vit': 'ViT'}[family]
  hf_cls, hf_cfg_cls = getattr(transformers, f'{kind}Model'), getattr(transformers, f'{kind}Config')
  model = _perturb(hf_cls(hf_cfg_cls(**VISION, attn_implementation='eager')), 13)
  model.save_pretrained(tmp_path)
  cfg = hf_vision.vit_config_from_hf(_config(tmp_path), image_size=size)
  grid = size // 8
  with caplog.at_level(logging.INFO, logger='adalink_jax.checkpoints.big_vision'):
    params = hf_vision.load_hf_vision(tmp_path, _expected(cfg), config=cfg)
  assert f'resampled from 4x4 to {grid}x{grid}' in caplog.text and str(tmp_path) in caplog.text
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  if family == 'siglip':
    key = 'embeddings.position_embedding.weight'
    table = sd[key].numpy()[None]                                   # [1, 16, d]
    resampled = _bv_resample_posemb(table, np.zeros((1, grid * grid, 64)))
    sd[key] = torch.tensor(resampled[0])
  else:
    key = 'embeddings.position_embeddings'
    table = sd[key].numpy()                                         # [1, 1 + 16, d]
    resampled = _bv_resample_posemb(table[:, 1:], np.zeros((1, grid * grid, 64)))
    sd[key] = torch.tensor(np.concatenate([table[:, :1], resampled], axis=1))
  np.testing.assert_array_equal(np.asarray(params['pos_embedding']), resampled)
  sd.pop('embeddings.position_ids', None)
  big = hf_cls(hf_cfg_cls(**{**VISION, 'image_size': size}, attn_implementation='eager')).eval()
  big.load_state_dict(sd, strict=True)
  x = _images(14, size)
  want_tokens, want_pooled = _hf_out(big, x)
  tokens, pooled = _ours(cfg, params, x)
  assert tokens.shape[1] == grid * grid + (family == 'vit')
  np.testing.assert_allclose(tokens, want_tokens, atol=1e-4, rtol=0)
  if family == 'siglip':
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-4, rtol=0)
    with torch.no_grad():  # HF's bicubic interpolation is another function: not what we do
      bicubic = model(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2)),
                      interpolate_pos_encoding=True).last_hidden_state.numpy()
    assert np.abs(bicubic - want_tokens).max() > 1e-3


def test_wrong_config_lists_mismatched_names(siglip_dir):
  path, _ = siglip_dir
  cfg = hf_vision.vit_config_from_hf(_config(path))
  with pytest.raises(common.CheckpointMismatchError) as e:
    hf_vision.load_hf_vision(path, _expected(cfg.replace(mlp_dim=96)))
  mism = {n: (want, got) for n, want, got in e.value.mismatched}
  assert mism['Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel'] == ((64, 96), (64, 128))
  assert mism['MAPHead_0/MlpBlock_0/Dense_1/kernel'] == ((96, 64), (128, 64))
  assert len(mism) == 3 * 3 and not e.value.missing and not e.value.unexpected
  assert 'HF encoder.layers.1.mlp.fc1.weight' in str(e.value)
  with pytest.raises(common.CheckpointMismatchError) as e:
    hf_vision.load_hf_vision(path, _expected(cfg.replace(num_heads=2)))
  mism = {n: (want, got) for n, want, got in e.value.mismatched}
  assert mism['Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'] == (
      (64, 2, 32), (64, 4, 16))
  with pytest.raises(common.CheckpointMismatchError) as e:
    hf_vision.load_hf_vision(path, _expected(cfg.replace(depth=3, scan_layers=True)))
  assert 'Transformer/encoderblock/LayerNorm_0/scale' in e.value.missing
  assert 'layers [2] of 3 are not in the checkpoint' in str(e.value)
  with pytest.raises(common.CheckpointMismatchError) as e:
    hf_vision.load_hf_vision(path, _expected(cfg.replace(depth=1)))
  assert 'encoder.layers.1.mlp.fc2.bias  (HF tensor with no place in the model)' in (
      e.value.unexpected)
  assert len(e.value.unexpected) == 16 and not e.value.missing


def test_missing_files_are_explained(tmp_path):
  cfg = vit_lib.vit_config('tiny')
  with pytest.raises(FileNotFoundError, match='config.json.*model.safetensors') as e:
    hf_vision.load_hf_vision(tmp_path / 'nope', _expected(cfg))
  assert 'save_pretrained' in str(e.value) and 'huggingface-cli download' in str(e.value)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'siglip_vision_model'}))
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='model.safetensors') as e:
    hf_vision.load_hf_vision(tmp_path, _expected(cfg))
  assert 'pytorch_model.bin' in str(e.value) and 'SiglipVisionModel' in str(e.value)
  with pytest.raises(ValueError, match='siglip2'):
    hf_vision.vit_config_from_hf({'model_type': 'siglip2_vision_model'})


def test_pali_backbone_from_hf_siglip(assets, tmp_path, caplog):  # noqa: F811
  """config.init.vit_format='hf' puts the tower into a PaLI's params['img'] (trainer path)."""
  torch.manual_seed(9)
  # configs/demo.py's tower shape; PaLI keeps every token, so no MAP head.
  model = _perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      **VISION, vision_use_head=False, attn_implementation='eager')), 10)
  model.save_pretrained(tmp_path / 'siglip')
  c = tiny_config(assets, **{'init.vit': str(tmp_path / 'siglip'), 'init.vit_format': 'hf'})
  t = trainer.Trainer(c, str(tmp_path / 'w'))
  with caplog.at_level(logging.WARNING):
    _, frozen = t.init_params()
  assert 'img_proj' in caplog.text
  vit_cfg = t.setup.pali_config.vit
  assert vit_cfg.pool_type == 'none' and vit_cfg.width == 64
  x = _images(11)
  img = jax.tree.map(np.asarray, frozen['img'])
  np.testing.assert_allclose(vit_lib.ViT(vit_cfg).apply({'params': img}, x), _hf_out(model, x)[0],
                             atol=1e-4, rtol=0)
