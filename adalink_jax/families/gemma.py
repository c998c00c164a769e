"""The Gemma family (Gemma 1 / 2 / 3 text decoders): decoder-only, loaded from GGUF or HF.

``config.model``: ``name`` (a size of ``gemma.GEMMA_SIZES``), ``gemma`` (overrides), dtypes,
``prefix_lm`` (default False: causal, as the checkpoints were pre-trained; True: full
attention over the prompt). ``config.init.gemma``: a ``.gguf`` file (``gemma_format='gguf'``,
e.g. the real Gemma 3 270M) or an HF ``save_pretrained`` directory (``'hf'``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from adalink_jax import decoding
from adalink_jax.checkpoints.common import CheckpointMismatchError
from adalink_jax.families import base
from adalink_jax.models import gemma as gemma_lib
from adalink_jax.models import prefix_lm
from adalink_jax.peft import methods as peft

log = logging.getLogger(__name__)
# Fields that decide parameter shapes: a checkpoint must agree with the config on these.
SHAPE_FIELDS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads',
                'head_dim', 'd_ff', 'use_post_norms', 'use_qk_norm')


class DecoderOnlyModel(base.BaseModel):
  """Shared by Gemma and PaliGemma: :class:`~adalink_jax.models.prefix_lm.PrefixLM` on the
  encoder-decoder batch layout; the prefix is prefilled once, then cached steps."""
  embedding_path = ('llm', 'embedder', 'input_embedding')

  def _build_llm(self, llm_config: gemma_lib.GemmaConfig, vit=None, **layout) -> None:
    built = peft.build(self.peft_config, llm_config)
    llm = built.model_config
    self.model_config = prefix_lm.PrefixLMConfig(llm=llm, vit=vit, **layout)
    self.model = prefix_lm.PrefixLM(self.model_config, built.encoder_input_adapter,
                                    built.decoder_input_adapter)
    self.trainable = built.trainable

  @property
  def llm_config(self) -> gemma_lib.GemmaConfig:
    return self.model_config.llm

  @property
  def pad_id(self) -> int:
    return self.llm_config.pad_id

  @property
  def eos_id(self) -> int:
    return self.llm_config.eos_id

  @property
  def vocab_size(self) -> int:
    return self.llm_config.vocab_size

  def init(self, rng, batch):
    return self.model.init(rng, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
                           batch.get('image'), batch['task_id'])['params']

  def forward(self, params, batch, rng):
    del rng  # Gemma has no dropout
    if 'encoder_segment_ids' in batch:
      raise ValueError(f'config.data.pack=True: packed rows are not supported by the '
                       f'{self.family!r} family (its prefix/suffix layout needs one example per '
                       'row); set config.data.pack=False')
    return self.model.apply({'params': params}, batch['encoder_input_tokens'],
                            batch['decoder_target_tokens'], batch.get('image'),
                            batch.get('task_id'))

  def prefix(self, params, batch, room):
    """(the logits after the prompt ``[b, vocab]``, its cache with ``room`` free slots)."""
    return self.model.apply({'params': params}, batch['encoder_input_tokens'], batch.get('image'),
                            batch.get('task_id'), max(int(room), 1),
                            method=prefix_lm.PrefixLM.prefill)

  def decoder(self, params, batch, max_decode_len, repeat=1, prefix=None) -> decoding.Decoder:
    task_id = base.repeat_rows(batch.get('task_id'), repeat)
    variables = {'params': params}
    logits, cache = prefix or self.prefix(params, batch, max_decode_len)
    if repeat > 1:  # beams: row i * repeat + j is example i's (prefilled once, not per beam)
      rows = jnp.repeat(jnp.arange(logits.shape[0]), repeat)
      logits, cache = jnp.take(logits, rows, axis=0), prefix_lm.gather_cache(cache, rows)
    model = self.model

    def step(state, tokens, i):
      first, cache = state

      def fresh(_):  # step 0: the prefill already gave the first token's logits
        return first, cache

      def next_token(_):
        return model.apply(variables, tokens, cache, task_id,
                           method=prefix_lm.PrefixLM.decode_step)

      out, cache = jax.lax.cond(i == 0, fresh, next_token, None)
      return out, (first, cache)

    def gather(state, rows):
      first, cache = state
      return jnp.take(first, rows, axis=0), prefix_lm.gather_cache(cache, rows)

    return decoding.Decoder((logits, cache), step, gather)

  # What one candidate group may hold beyond the prefill: per row, the logits of its tokens
  # (x vocab, fp32) and its copy of the cache. At 512 MiB, a 16-row batch of 48-token prompts
  # on Gemma 3 270M scores 8 labels of two tokens + EOS per group (TREC has 6).
  score_group_bytes = 512 << 20

  def score_candidates(self, params, batch, candidates, prefix=None):
    """The prefix prefilled once; every candidate then extends a copy of its cache by its own
    tokens in one pass. Candidates go in groups of ``b * group`` rows whose logits and cache
    copies fit :attr:`score_group_bytes` (at least one candidate per group)."""
    c, t = candidates.shape
    b = batch['encoder_input_tokens'].shape[0]
    variables, task_id = {'params': params}, batch.get('task_id')
    first, cache = prefix or self.prefix(params, batch, t - 1)
    first_lp = jax.nn.log_softmax(first.astype(jnp.float32))  # [b, vocab]: every first token
    row_bytes = (4 * self.vocab_size * max(t - 1, 1) +
                 2 * cache.k[:, :1].size * cache.k.dtype.itemsize)
    group = int(min(c, max(1, self.score_group_bytes // row_bytes // b)))
    groups = -(-c // group)
    padded = jnp.concatenate([candidates, jnp.broadcast_to(
        candidates[:1], (groups * group - c, t))]).reshape(groups, group, t)
    rows = jnp.repeat(jnp.arange(b), group)  # row i * group + k: example i, candidate k
    group_cache, group_task = prefix_lm.gather_cache(cache, rows), base.repeat_rows(task_id, group)

    def scores(cands):  # [group, t] -> [b, group]
      targets = jnp.tile(cands, (b, 1))
      lp = jnp.take(first_lp, cands[:, 0], axis=1).reshape(b * group, 1)
      if t > 1:
        logits, _ = self.model.apply(variables, targets[:, :-1], group_cache, group_task,
                                     method=prefix_lm.PrefixLM.extend)
        lp = jnp.concatenate([lp, decoding.token_log_probs(logits, targets[:, 1:])], axis=1)
      return decoding.summed_to_eos(lp, targets, self.eos_id)[0].reshape(b, group)
    out = jax.lax.map(scores, padded)  # [groups, b, group]
    return out.transpose(1, 0, 2).reshape(b, groups * group)[:, :c]


def check_llm_shapes(got: gemma_lib.GemmaConfig, want: gemma_lib.GemmaConfig, where: str):
  """A checkpoint's Gemma config against the run's: one error listing every differing field
  (pick the ``config.model.name`` / overrides of the checkpoint)."""
  diff = [(f'config.model field {f}', (getattr(want, f),), (getattr(got, f),))
          for f in SHAPE_FIELDS if getattr(got, f) != getattr(want, f)]
  if got.layer_types != want.layer_types:
    diff.append(('config.model field layer_types', want.layer_types, got.layer_types))
  if diff:
    raise CheckpointMismatchError(mismatched=diff, source=where)


def load_llm(init: Any, key: str, llm: gemma_lib.GemmaConfig, shardings: Any) -> dict:
  """``config.init.<key>`` (+ ``<key>_format``: 'gguf' | 'hf') -> Gemma params for ``llm``."""
  from adalink_jax.checkpoints import packaged  # pylint: disable=g-import-not-at-top
  path, fmt = packaged.resolve(init[key]), init.get(f'{key}_format', 'gguf')
  same = {f.name: getattr(llm, f.name) for f in dataclasses.fields(llm)
          if f.name in ('dtype', 'param_dtype', 'scan_layers', 'remat_policy')}
  log.info('loading the Gemma decoder from %s (%s)', path, fmt)
  where = f'config.init.{key}={path!r}'
  # pylint: disable=g-import-not-at-top
  from adalink_jax.checkpoints import hf_gemma
  if fmt == 'gguf':
    from adalink_jax.checkpoints import gemma_gguf
    from adalink_jax.checkpoints import gguf
    if os.path.isfile(path):
      path = gguf.GGUFFile(path)  # the header (~8 s for 262k tokens) is parsed once, not twice
    header, load = gguf.config_from_gguf, gemma_gguf.load_gguf_gemma
  elif fmt == 'hf':
    config_json = pathlib.Path(path).expanduser() / 'config.json'
    header = lambda _: json.loads(config_json.read_text())
    load = hf_gemma.load_hf_gemma
  else:
    raise ValueError(f"config.init.{key}_format={fmt!r}; choose 'gguf' or 'hf'")
  try:  # the shapes first, from the header alone: a wrong file fails before any tensor is read
    got = hf_gemma.config_from_hf(header(path))
  except FileNotFoundError:
    got = None  # the loader names what is missing and where to get it
  if got is not None:
    check_llm_shapes(got, llm, where)
  got, params = load(path, shardings=shardings, **same)
  check_llm_shapes(got, llm, where)
  return params


class GemmaModel(DecoderOnlyModel):
  family = 'gemma'
  init_towers = ('gemma',)

  def build(self, m):
    over = dict(base.overrides(m.get('gemma')), dtype=self.activation_dtype)
    self._build_llm(gemma_lib.gemma_config(m.name, **over), None,
                    prefix_lm=bool(m.get('prefix_lm', False)), one_based_positions=False,
                    separator_id=m.get('separator_id', None))

  def load(self, init, params, shardings):
    if not init.get('gemma'):
      return params
    loaded = load_llm(init, 'gemma', self.llm_config.replace(hooks=()), shardings['llm'])
    return dict(params, llm=base.overlay(params['llm'], loaded))
