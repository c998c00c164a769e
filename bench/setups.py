"""What the benchmarks run: model shapes, batch shapes and method settings per size.

Sizes: ``tiny`` (seconds; the smoke test) and ``full`` (the reported numbers). Everything is
built through :func:`adalink_jax.model_builder.build`, the path the trainer uses, so the
benchmarked step is the trainer's step.

Full-size choices (2 shared CPU cores, the whole ``--size=full`` run should take ~10 min):
T5 1.1 base at encoder length 512 -- the MFU target -- runs at batch 1 (one FT step is ~0.4
TFLOP); T5 1.1 small at length 256, batch 2; the PaLI-style model is ViT-S/16 at 224 px (196
image tokens) + T5 1.1 small with 32 text tokens, batch 2. Targets are 32 tokens everywhere.
"""
from __future__ import annotations

import copy
from typing import Any

import ml_collections

from adalink_jax.models import t5 as t5_lib
from adalink_jax.models import vit as vit_lib
from adalink_jax.peft import registry

# Method settings (the paper's AdaLink rank; usual values for the baselines). A registered
# method not listed here is benchmarked with its module's defaults.
PEFT = {
    'ft': dict(method='ft'),
    'adalink': dict(method='adalink', rank=64),  # modalities filled in per model
    'lora': dict(method='lora', rank=16, lora_alpha=32.0,
                 lora_targets=('query', 'key', 'value', 'out')),
    'prompt': dict(method='prompt', prompt_length=20),
    'adapter': dict(method='adapter', adapter_dim=64, adapter_where=('attention', 'mlp')),
}
# Every registered method: those above first (FT, the baseline of every ratio, leads), then
# the rest of the registry in its order.
METHODS = registry.check(tuple(PEFT), 'bench.setups.PEFT') + tuple(
    m for m in registry.names() if m not in PEFT)


def _t5_shape(name: str) -> dict:
  return {k: v for k, v in t5_lib.T5_SIZES[name].items()}


def _vit_shape(name: str, image_size: int) -> dict:
  size, patch = name.split('/')
  return dict(vit_lib.VIT_SIZES[size], patch_size=int(patch), image_size=image_size)


_ONE_LAYER = dict(num_encoder_layers=1, num_decoder_layers=1)

# name -> model block (model_builder's config.model) + batch shape.
TRAIN_MODELS: dict[str, dict[str, dict[str, Any]]] = {
    'tiny': {
        # One layer per stack: the smoke test pays mostly for XLA compiles.
        't5_tiny': dict(model=dict(family='t5', name='t5_1_1_tiny', t5=_ONE_LAYER),
                        batch=2, text_len=16, target_len=8),
        'pali_tiny': dict(model=dict(family='pali', name='tiny', t5=_ONE_LAYER,
                                     vit=dict(depth=1)),
                          batch=2, text_len=8, target_len=8),
    },
    'full': {
        't5_small': dict(model=dict(family='t5', name='t5_1_1_small'),
                         batch=2, text_len=256, target_len=32),
        't5_base': dict(model=dict(family='t5', name='t5_1_1_base'),
                        batch=1, text_len=512, target_len=32),
        # pali_config('tiny') with every field overridden: ViT-S/16 at 224 px + T5 1.1 small.
        'pali_s16_t5small': dict(model=dict(family='pali', name='tiny',
                                            vit=_vit_shape('S/16', 224),
                                            t5=_t5_shape('t5_1_1_small')),
                                 batch=2, text_len=32, target_len=32),
    },
}

# The model whose train step carries the MFU target.
MFU_MODEL = {'tiny': 't5_tiny', 'full': 't5_base'}

# Decoding: a T5 with the given encoder length; max_len decoded tokens (no early stop).
DECODE = {
    'tiny': dict(model=dict(family='t5', name='t5_1_1_tiny', t5=_ONE_LAYER), text_len=8, max_len=6,
                 batches=(2,), beams=2, reps=2),
    'full': dict(model=dict(family='t5', name='t5_1_1_small'), text_len=64, max_len=16,
                 batches=(1, 32), beams=4, reps=3),
}

# Scale simulation: the AdaLink step of each model over a fake mesh (nothing allocated), name ->
# spec (bench.scale_sim). PaliGemma 2 10B (SigLIP So400m/14 at 224 px + Gemma 2 9B) shares the
# PaLI-X mesh, batch and lengths. Tiny: one model per family, 8 devices.
_TINY_SHAPE = dict(mesh=dict(data=2, fsdp=4, model=1), batch_per_device=1, text_len=8,
                  target_len=8, timeout_s=120)
_FULL_SHAPE = dict(mesh=dict(data=1, fsdp=256, model=1), batch_per_device=1, text_len=64,
                  target_len=32, timeout_s=900)
SCALE = {
    'tiny': {
        'pali_tiny': dict(model=dict(family='pali', name='tiny'), **_TINY_SHAPE),
        'paligemma2_tiny': dict(model=dict(family='paligemma', name='paligemma2_tiny'),
                                **_TINY_SHAPE),
    },
    'full': {
        'palix': dict(model=dict(family='pali', name='palix'), **_FULL_SHAPE),
        'paligemma2_10b': dict(model=dict(family='paligemma', name='paligemma2_10b',
                                          image_size=224), **_FULL_SHAPE),
    },
}


def peft_block(method: str, family: str) -> dict:
  """The ``peft`` config block of a method; AdaLink adapts the image tokens too on PaLI."""
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; choose from {METHODS}')
  block = dict(PEFT.get(method, dict(method=method)))
  if method == 'adalink':
    block['modalities'] = ('text', 'image') if family in ('pali', 'paligemma') else ('text',)
  return block


def config(model: dict, method: str, *, dtype: str = 'float32',
           t5_extra: dict | None = None) -> ml_collections.ConfigDict:
  """A ConfigDict with ``model`` and ``peft`` blocks for :func:`model_builder.build`."""
  m = copy.deepcopy(dict(model))
  m['dtype'] = dtype
  if t5_extra:
    m['t5'] = dict(m.get('t5') or {}, **t5_extra)
  return ml_collections.ConfigDict(dict(model=m, peft=peft_block(method, m['family'])))
