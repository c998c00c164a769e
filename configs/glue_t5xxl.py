"""GLUE with a frozen T5 1.1 XXL (text AdaLink at the input embeddings; paper's GLUE table).

  python -m adalink_jax.train --config=configs/glue_t5xxl.py:method=adalink,rank=64 --workdir=DIR \
      --config.init.t5=/ckpt/t5-v1_1-xxl --config.data.tfds_data_dir=/data/tfds

One adapter per GLUE task: `:num_tasks=8`. The bank then holds the mixture's 8 benchmarks in
global task-id order (glue_cola, glue_sst2, glue_mrpc, glue_qqp, glue_stsb, glue_mnli,
glue_qnli, glue_rte -> bank indices 0-7; recorded as `bank_tasks` in the adapter card), or
the order given by --config.peft.bank_tasks; fold one with `export --fold --task=glue_rte`.
"""
from adalink_jax import config_lib


def get_config(arg=None):
  return config_lib.glue('t5_1_1_xxl', arg)


def sweep(add):
  config_lib.sweep_methods(add)
