"""docvqa (anls) on PaliGemma: AdaLink (or a baseline) on the public PaLI-family checkpoints.

  python -m adalink_jax.train --config=configs/docvqa_paligemma.py:method=adalink,rank=64 --workdir=DIR
arg keys and checkpoints: adalink_jax/config_lib.py paligemma() (checkpoint=pt|mix: the
raw vs instruction-tuned comparison).
"""
from adalink_jax import config_lib


def get_config(arg=None):
  return config_lib.paligemma('docvqa', 'anls', arg)


def sweep(add):
  config_lib.sweep_methods(add)
