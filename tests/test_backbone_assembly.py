"""A PaLI-style backbone assembled from an HF T5 checkpoint + a big_vision npz, via config.init."""
import logging

import jax
import numpy as np
import pytest
import torch
import transformers

from adalink_jax import trainer
from adalink_jax.checkpoints import backbone, common
from tests.test_train import tiny_config, assets  # noqa: F401  (fixture)


def _hf_tiny_t5(path):
  """Random HF T5 1.1 with the shape of the tiny PaLI's T5 (t5_1_1_tiny, vocab 64)."""
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=64, d_model=64, d_kv=16, num_heads=4, d_ff=128,
                              num_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                              relative_attention_num_buckets=8,
                              relative_attention_max_distance=16,
                              feed_forward_proj='gated-gelu', tie_word_embeddings=False,
                              decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(cfg).float().eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))
  model.save_pretrained(path)
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_pali_from_hf_t5_and_big_vision_npz(assets, tmp_path, caplog):  # noqa: F811
  hf_state = _hf_tiny_t5(tmp_path / 'hf')
  # A big_vision-format npz of an image tower: our ViT names are big_vision's.
  c0 = tiny_config(assets)
  t0 = trainer.Trainer(c0, str(tmp_path / 'w0'))
  vit_params = jax.tree.map(np.asarray, t0.init_params()[1]['img'])
  vit_params = jax.tree.map(lambda x: x + np.float32(0.25), vit_params)  # differ from init
  flat_vit = common.flatten(vit_params)
  np.savez(tmp_path / 'vit.npz', **{f'params/{k}': v for k, v in flat_vit.items()})

  c = tiny_config(assets, **{'init.t5': str(tmp_path / 'hf'), 'init.vit': str(tmp_path / 'vit.npz')})
  t = trainer.Trainer(c, str(tmp_path / 'w1'))
  with caplog.at_level(logging.WARNING):
    trainable, frozen = t.init_params()
  assert 'img_proj' in caplog.text and 'fresh' in caplog.text
  got_vit = common.flatten(jax.tree.map(np.asarray, frozen['img']))
  assert got_vit.keys() == flat_vit.keys()
  for k in flat_vit:
    np.testing.assert_array_equal(got_vit[k], flat_vit[k], err_msg=k)
  t5 = frozen['t5']
  np.testing.assert_array_equal(np.asarray(t5['token_embedder']['embedding']),
                                hf_state['shared.weight'])
  np.testing.assert_array_equal(np.asarray(t5['encoder']['layers_1']['mlp']['wo']['kernel']),
                                hf_state['encoder.block.1.layer.1.DenseReluDense.wo.weight'].T)
  np.testing.assert_array_equal(np.asarray(t5['decoder']['logits_dense']['kernel']),
                                hf_state['lm_head.weight'].T)
  # Adapters are untouched by loading: zero-initialised 'up' still zero.
  assert float(np.abs(np.asarray(trainable['encoder_input_adapter']['text']['up'])).max()) == 0.0


def test_native_backbone_round_trip_and_mismatch(assets, tmp_path):
  c = tiny_config(assets)
  t = trainer.Trainer(c, str(tmp_path / 'w'))
  _, frozen = t.init_params()
  backbone.save_native(str(tmp_path / 'bb'), frozen, {'family': 'pali', 'name': 'tiny'})
  c2 = tiny_config(assets, **{'init.native': str(tmp_path / 'bb'), 'seed': 7})
  _, frozen2 = trainer.Trainer(c2, str(tmp_path / 'w2')).init_params()
  for (k, a), b in zip(common.flatten(frozen).items(), common.flatten(frozen2).values()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
  # A backbone of another shape is refused with the mismatched names and shapes.
  c3 = tiny_config(assets, **{'init.native': str(tmp_path / 'bb'), 'model.t5.d_ff': 96})
  with pytest.raises(common.CheckpointMismatchError, match='wo/kernel'):
    trainer.Trainer(c3, str(tmp_path / 'w3')).init_params()
  c4 = tiny_config(assets, **{'init.native': str(tmp_path / 'nothing')})
  with pytest.raises(FileNotFoundError, match='params.safetensors'):
    trainer.Trainer(c4, str(tmp_path / 'w4')).init_params()
