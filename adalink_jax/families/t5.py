"""The T5 family (T5 1.1 / FLAN-T5 / mT5 shapes): an encoder-decoder, loaded from HF or T5X."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from adalink_jax import decoding
from adalink_jax.families import base
from adalink_jax.models import t5 as t5_lib
from adalink_jax.peft import methods as peft
from adalink_jax.peft import train as peft_train



class EncoderDecoderModel(base.BaseModel):
  """Shared by T5 and PaLI: the prefix is encoded once, the decoder steps with a KV cache."""
  embedding_path = ('token_embedder', 'embedding')

  def encode(self, params: Any, batch: Mapping[str, jax.Array]):
    """-> (``encoded[b, l, d]``, ``mask[b, l]``): the prefix for decoding."""
    raise NotImplementedError

  def prefix(self, params, batch, room):
    del room  # the decoder's cache is its own, sized per call
    return self.encode(params, batch)

  def decoder(self, params, batch, max_decode_len, repeat=1, prefix=None) -> decoding.Decoder:
    encoded, mask = prefix or self.encode(params, batch)
    return decoding.encoder_decoder(self.model, params, encoded, mask, max_decode_len,
                                    batch.get('task_id'), repeat=repeat)

  def score_candidates(self, params, batch, candidates, prefix=None):
    """The prefix encoded once; each candidate then costs one decoder pass."""
    encoded, mask = prefix or self.encode(params, batch)
    b = encoded.shape[0]

    def one(cand):
      return decoding.score_sequences(
          self.model, params, encoded, mask, jnp.broadcast_to(cand, (b,) + cand.shape),
          self.eos_id, self.decoder_start_id, batch.get('task_id'))[0]
    return jax.lax.map(one, candidates).T

  @property
  def t5_config(self) -> t5_lib.T5Config:
    return self.model_config

  @property
  def decoder_start_id(self) -> int:
    return self.t5_config.decoder_start_id

  def load(self, init, params, shardings):
    from adalink_jax.checkpoints import backbone  # pylint: disable=g-import-not-at-top
    return backbone.load_encoder_decoder(init, params, shardings, self)


class T5Model(EncoderDecoderModel):
  """``config.model``: ``name`` (a size of ``t5.T5_SIZES``), ``t5`` (overrides), dtypes."""
  family = 't5'
  init_towers = ('t5',)
  pali_config = None

  def build(self, m):
    over = dict(base.overrides(m.get('t5')), dtype=self.activation_dtype)
    built = peft.build(self.peft_config, t5_lib.t5_config(m.name, **over))
    self.model_config = built.model_config
    self.model = t5_lib.T5(self.model_config, built.encoder_input_adapter,
                           built.decoder_input_adapter)
    self.trainable = built.trainable

  def init(self, rng, batch):
    return self.model.init(rng, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
                           task_id=batch['task_id'])['params']

  def forward(self, params, batch, rng: Optional[jax.Array]):
    # The one T5 forward (packed batches included), shared with peft.train's raw-model path.
    return peft_train.t5_forward(self.model)(params, batch, rng)

  def encode(self, params, batch):
    return self.model.apply({'params': params}, batch['encoder_input_tokens'],
                            task_id=batch.get('task_id'), method=self.model.encode)
