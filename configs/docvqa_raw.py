"""docvqa (anls), raw PaLI-style prompts, starting from public SigLIP + FLAN-T5 weights.

  python -m adalink_jax.train --config=configs/docvqa_raw.py:method=adalink,rank=64 --workdir=DIR
arg keys: method (adalink|prompt|lora|adapter|ft), rank, model (pali3|palix|tiny), steps, batch,
lr, image_size. Data locations: --config.data.data_dirs / --config.data.tfds_data_dir.
"""
from adalink_jax import config_lib


def get_config(arg=None):
  return config_lib.multimodal('docvqa', 'raw', 'anls', arg)


def sweep(add):
  config_lib.sweep_methods(add)
