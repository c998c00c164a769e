"""The embedded demo on a tiny PaliGemma-shaped model (ViT + Gemma prefix-LM) instead of ViT + T5.

  python -m adalink_jax.train --config=configs/demo_paligemma.py --workdir=workdirs/demo_pg

Same data, vocabulary and protocol as configs/demo.py: on first use the tiny PaliGemma is
pre-trained with full fine-tuning on rendered shapes and frozen (kept apart from the T5 demo's
backbone), then AdaLink (rank 8 on text and image tokens) learns the new questions.
"""
import pathlib

import ml_collections

from adalink_jax import cli

_DEMO = cli.load_config_module(str(pathlib.Path(__file__).with_name('demo.py')))


def get_config(arg=None):
  c = _DEMO.get_config()
  c.model = ml_collections.ConfigDict(dict(
      family='paligemma', name='paligemma_tiny', image_size=32, dtype='float32',
      frozen_dtype='float32', separator_id=-1,  # the demo vocabulary has no newline token
      vit=dict(patch_size=8, width=64, depth=2, mlp_dim=128, num_heads=4),
      llm=dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=1,
               head_dim=16, d_ff=128)))
  c.init = ml_collections.ConfigDict(dict(native='', paligemma='', paligemma_format='big_vision'))
  if arg == 'pretrain':
    return pretrain_config(c)
  return c


def pretrain_config(demo_config):
  return _DEMO.pretrain_config(demo_config)


def sweep(add):
  _DEMO.sweep(add)
