"""Multimodal instruction tuning: full fine-tuning of a PaLI-style base on the 'mmit' mixture.

Produces the MMIT checkpoint that every configs/*_mmit.py starts from:
  python -m adalink_jax.train --config=configs/mmit_instruction_tune.py --workdir=DIR \
      --config.init.t5=/ckpt/flan-t5-xl --config.init.vit=/ckpt/siglip_so400m_14_224.npz
  python -m adalink_jax.export --workdir=DIR --backbone --out=DIR/backbone
"""
from adalink_jax import config_lib


def get_config(arg=None):
  # Full fine-tuning by default; keys given in `arg` override these (later keys win).
  c = config_lib.multimodal('coco_captions', 'mmit', 'cider',
                            'method=ft,steps=50000,lr=1e-4' + (f',{arg}' if arg else ''))
  c.data.task = 'mmit'                   # the multimodal instruction mixture
  c.data.eval_task = 'coco_captions_mmit'
  c.init.native = ''
  c.init.t5 = 'FLAN_T5_XL_HF_DIR'
  c.init.vit = 'SIGLIP_SO400M_14_224_NPZ'
  return c


def sweep(add):
  for lr in (3e-5, 1e-4, 3e-4):
    add(**{'optimizer.learning_rate': lr})
