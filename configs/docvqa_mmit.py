"""docvqa (anls), MMIT-style instruction prompts, starting from the instruction-tuned (MMIT) checkpoint.

  python -m adalink_jax.train --config=configs/docvqa_mmit.py:method=adalink,rank=64 --workdir=DIR
arg keys: method (adalink|prompt|lora|adapter|ft), rank, model (pali3|palix|tiny), steps, batch,
lr, image_size. Data locations: --config.data.data_dirs / --config.data.tfds_data_dir.
"""
from adalink_jax import config_lib


def get_config(arg=None):
  return config_lib.multimodal('docvqa', 'mmit', 'anls', arg)


def sweep(add):
  config_lib.sweep_methods(add)
