"""The PaLI-style family: a ViT's image tokens ahead of the prompt in a T5 encoder-decoder."""
from __future__ import annotations

from adalink_jax.families import base
from adalink_jax.families.t5 import EncoderDecoderModel
from adalink_jax.models import pali as pali_lib
from adalink_jax.peft import methods as peft


class PaLIModel(EncoderDecoderModel):
  """``config.model``: ``name`` (``pali_config``), ``t5`` / ``vit`` overrides, dtypes."""
  family = 'pali'
  init_towers = ('t5', 'vit')
  embedding_path = ('t5', 'token_embedder', 'embedding')

  def build(self, m):
    pcfg = pali_lib.pali_config(m.name, **dict(base.overrides(m.get('t5')),
                                               dtype=self.activation_dtype))
    vit_over = base.overrides(m.get('vit'))
    if vit_over:
      pcfg = pcfg.replace(vit=pcfg.vit.replace(**vit_over))
    built = peft.build(self.peft_config, pcfg.t5)
    self.pali_config = pcfg.replace(t5=built.model_config)
    self.model_config = self.pali_config.t5
    self.model = pali_lib.PaLI(self.pali_config, built.encoder_input_adapter,
                               built.decoder_input_adapter)
    self.trainable = built.trainable

  @property
  def image_shape(self):
    h, w = self.pali_config.vit.image_size
    return (h, w, self.pali_config.vit.num_channels)

  def init(self, rng, batch):
    return self.model.init(rng, batch['image'], batch['encoder_input_tokens'],
                           batch['decoder_input_tokens'], task_id=batch['task_id'])['params']

  def forward(self, params, batch, rng):
    return self.model.apply({'params': params}, batch.get('image'), batch['encoder_input_tokens'],
                            batch['decoder_input_tokens'], task_id=batch.get('task_id'),
                            deterministic=rng is None,
                            rngs={} if rng is None else {'dropout': rng})

  def encode(self, params, batch):
    return self.model.apply({'params': params}, batch['encoder_input_tokens'], batch.get('image'),
                            task_id=batch.get('task_id'), method=self.model.encode)
