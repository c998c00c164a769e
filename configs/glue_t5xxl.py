"""GLUE with a frozen T5 1.1 XXL (text AdaLink at the input embeddings; paper's GLUE table).

  python -m adalink_jax.train --config=configs/glue_t5xxl.py:method=adalink,rank=64 --workdir=DIR \
      --config.init.t5=/ckpt/t5-v1_1-xxl --config.data.tfds_data_dir=/data/tfds
"""
from adalink_jax import config_lib


def get_config(arg=None):
  return config_lib.glue('t5_1_1_xxl', arg)


def sweep(add):
  config_lib.sweep_methods(add)
