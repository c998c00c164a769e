"""GLUE (T5's text-to-text tasks, proportional mixture) on a Gemma decoder, text AdaLink.

  python -m adalink_jax.train --config=configs/glue_gemma.py:method=adalink,rank=64 --workdir=DIR
arg keys: method (adalink|prompt|lora|adapter|ia3|ft), rank, model (gemma_2b|gemma2_2b|
gemma3_1b ...), steps, batch, lr, eval_task. Point config.init.gemma at an HF save_pretrained
directory (or a .gguf with --config.init.gemma_format=gguf) and config.data.vocab at its
SentencePiece model.
"""
from adalink_jax import config_lib


def get_config(arg=None):
  return config_lib.text_gemma('glue_v002_proportional_raw', arg)


def sweep(add):
  config_lib.sweep_methods(add)
