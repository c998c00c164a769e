"""From the ``model`` and ``peft`` config blocks to a model, its forward function and its split.

``config.model``: ``family`` ('t5' | 'pali'), ``name`` (a size from ``t5.T5_SIZES`` or
``pali_config``), ``dtype`` (activations), ``frozen_dtype`` (storage of frozen weights, e.g.
'bfloat16'), ``t5`` / ``vit`` (dicts of config overrides).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adalink_jax.peft import methods as peft
from adalink_jax.peft.train import PACKING_KEYS
from adalink_jax.models import pali as pali_lib
from adalink_jax.models import t5 as t5_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype(name: str) -> Any:
  """'bfloat16' -> jnp.bfloat16 with an error naming the choices."""
  if name not in DTYPES:
    raise ValueError(f'unknown dtype {name!r}; choose from {sorted(DTYPES)}')
  return DTYPES[name]


@dataclasses.dataclass
class Setup:
  """A model ready to train: the module, how to call it on a batch, and what trains."""
  model: nn.Module
  family: str
  trainable: Callable[[str], bool]
  frozen_dtype: Any
  # forward(params, batch, rng) -> logits [b, t, vocab]; dropout on when rng is not None.
  forward: Callable[..., jax.Array]
  # encode(params, batch) -> (encoded, mask): the prefix for decoding.
  encode: Callable[..., tuple[jax.Array, jax.Array]]
  t5_config: t5_lib.T5Config
  pali_config: Optional[pali_lib.PaLIConfig] = None

  def init_batch(self, batch_size: int, text_len: int, target_len: int) -> dict:
    """Zeros with the shapes of a batch, for ``init`` and ``eval_shape``."""
    b = dict(encoder_input_tokens=jnp.zeros((batch_size, text_len), jnp.int32),
             decoder_input_tokens=jnp.zeros((batch_size, target_len), jnp.int32),
             task_id=jnp.zeros((batch_size,), jnp.int32))
    if self.pali_config is not None:
      h, w = self.pali_config.vit.image_size
      b['image'] = jnp.zeros((batch_size, h, w, self.pali_config.vit.num_channels), jnp.float32)
    return b

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    """Boxed parameters (``nn.LogicallyPartitioned`` leaves)."""
    if self.family == 'pali':
      return self.model.init(rng, batch['image'], batch['encoder_input_tokens'],
                             batch['decoder_input_tokens'], task_id=batch['task_id'])['params']
    return self.model.init(rng, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
                           task_id=batch['task_id'])['params']


def _overrides(block: Any) -> dict:
  return dict(block) if block else {}


def build(config: Any) -> Setup:
  """``config.model`` + ``config.peft`` -> :class:`Setup`."""
  m = config.model
  act_dtype = dtype(m.get('dtype', 'float32'))
  frozen_dtype = dtype(m.get('frozen_dtype', 'float32'))
  t5_over = dict(_overrides(m.get('t5')), dtype=act_dtype)
  peft_cfg = dict(config.get('peft') or {})
  family = m.get('family', 't5')
  if family == 't5':
    built = peft.build(peft_cfg, t5_lib.t5_config(m.name, **t5_over))
    model = t5_lib.T5(built.t5_config, built.encoder_input_adapter, built.decoder_input_adapter)
    pcfg = None

    def forward(params, batch, rng):
      # Packed text batches (seqio pack=True) carry segment ids and positions.
      packing = {k: batch[k] for k in PACKING_KEYS if k in batch}
      return model.apply({'params': params}, batch['encoder_input_tokens'],
                         batch['decoder_input_tokens'], task_id=batch.get('task_id'),
                         deterministic=rng is None, rngs={} if rng is None else {'dropout': rng},
                         **packing)

    def encode(params, batch):
      return model.apply({'params': params}, batch['encoder_input_tokens'],
                         task_id=batch.get('task_id'), method=model.encode)
  elif family == 'pali':
    pcfg = pali_lib.pali_config(m.name, **t5_over)
    vit_over = _overrides(m.get('vit'))
    if vit_over:
      pcfg = pcfg.replace(vit=pcfg.vit.replace(**vit_over))
    built = peft.build(peft_cfg, pcfg.t5)
    pcfg = pcfg.replace(t5=built.t5_config)
    model = pali_lib.PaLI(pcfg, built.encoder_input_adapter, built.decoder_input_adapter)

    def forward(params, batch, rng):
      return model.apply({'params': params}, batch.get('image'), batch['encoder_input_tokens'],
                         batch['decoder_input_tokens'], task_id=batch.get('task_id'),
                         deterministic=rng is None, rngs={} if rng is None else {'dropout': rng})

    def encode(params, batch):
      return model.apply({'params': params}, batch['encoder_input_tokens'], batch.get('image'),
                         task_id=batch.get('task_id'), method=model.encode)
  else:
    raise ValueError(f"config.model.family={family!r}; choose 't5' or 'pali'")
  return Setup(model=model, family=family, trainable=built.trainable, frozen_dtype=frozen_dtype,
               forward=forward, encode=encode, t5_config=built.t5_config, pali_config=pcfg)
