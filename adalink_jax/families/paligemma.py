"""The PaliGemma family (PaliGemma 1 and 2): SigLIP image tokens ahead of the prompt in a
Gemma prefix-LM; loaded from a big_vision ``.npz`` or an HF directory.

``config.model``: ``name`` (a size of ``paligemma.PALIGEMMA_SIZES``), ``image_size``,
``llm`` / ``vit`` (overrides), dtypes, ``separator_id`` (the token ending the prompt:
``'\\n'``, id 108 in Gemma's vocabulary, as PaliGemma's processor adds). ``config.init``:
``paligemma`` (path) and ``paligemma_format`` ('big_vision' | 'hf').
"""
from __future__ import annotations

import logging

from adalink_jax.families import base
from adalink_jax.families.gemma import DecoderOnlyModel, check_llm_shapes
from adalink_jax.models import paligemma as pg_lib

log = logging.getLogger(__name__)
NEWLINE_ID = 108  # '\n' in Gemma's SentencePiece vocabulary


class PaliGemmaModel(DecoderOnlyModel):
  family = 'paligemma'
  init_towers = ('paligemma',)

  def build(self, m):
    over = dict(base.overrides(m.get('llm')), dtype=self.activation_dtype)
    pcfg = pg_lib.paligemma_config(m.name, m.get('image_size', None), **over)
    vit_over = base.overrides(m.get('vit'))
    if vit_over:
      pcfg = pcfg.replace(vit=pcfg.vit.replace(**vit_over))
    self.paligemma_config = pcfg
    sep = m.get('separator_id', NEWLINE_ID)
    self._build_llm(pcfg.llm, pcfg.vit, prefix_lm=True, one_based_positions=True,
                    window_cuts_prefix=pcfg.window_cuts_prefix,
                    separator_id=None if sep is None or sep < 0 else int(sep))

  @property
  def image_shape(self):
    h, w = self.paligemma_config.vit.image_size
    return (h, w, self.paligemma_config.vit.num_channels)

  def load(self, init, params, shardings):
    path = init.get('paligemma')
    if not path:
      return params
    fmt = init.get('paligemma_format', 'big_vision')
    from adalink_jax.checkpoints import paligemma as pg_ckpt  # pylint: disable=g-import-not-at-top
    log.info('loading PaliGemma from %s (%s)', path, fmt)
    towers = {k: params[k] for k in ('img', 'img_proj', 'llm')}
    sh = {k: shardings[k] for k in towers}
    # The checkpoint's tree is the plain model's: a method's hook parameters stay as initialised.
    cfg = self.paligemma_config.replace(llm=self.llm_config.replace(hooks=()))
    if fmt == 'big_vision':
      loaded = pg_ckpt.load_big_vision_paligemma(path, cfg, shardings=sh)
    elif fmt == 'hf':
      got, loaded = pg_ckpt.load_hf_paligemma(path, shardings=sh)
      check_llm_shapes(got.llm, cfg.llm, f'config.init.paligemma={path!r}')
    else:
      raise ValueError(f"config.init.paligemma_format={fmt!r}; choose 'big_vision' or 'hf'")
    return dict(params, **{k: base.overlay(params[k], v) for k, v in loaded.items()})
