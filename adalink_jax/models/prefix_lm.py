"""A decoder-only model trained and decoded on the encoder-decoder batch layout.

The decoder-only family (Gemma, PaliGemma) consumes the same batches as the T5 family --
``encoder_input_tokens`` (the prompt, right-padded), ``decoder_target_tokens`` (the answer and
``<eos>``, right-padded), optionally ``image`` and ``task_id`` -- so tasks, packing-free
pipelines, evaluation and checkpoints are shared. This module turns them into one sequence::

    [pad ... | image tokens | <bos> prompt [sep] ] [target_0 ... target_{t-2}]
     `------------------ prefix: P slots ------'  `--- suffix: t - 1 slots --'

* the prefix is built, passed through the seam (``encoder_input_adapter``: AdaLink / prompt tuning
  on image and prompt slots), then *left-aligned* (each row rolled so its last real slot is
  ``P - 1``): slot distances between real tokens then equal position distances, so sliding
  windows and RoPE see a contiguous sequence, and cached decoding appends right after it;
* the suffix embeddings optionally pass ``decoder_input_adapter`` (AdaLink on the target tokens,
  the T5 family's ``decoder_inputs`` flag);
* attention is prefix-LM (full over the prefix, causal over the suffix; PaliGemma) or causal
  (``prefix_lm=False``; a plain Gemma LM, as it was pre-trained);
* the LM head runs only on the ``t`` slots that predict a target (``P - 1 ... P + t - 2``):
  the logits are ``[b, t, vocab]``, aligned with ``decoder_target_tokens`` exactly as the
  T5 family's, and a 262k-entry head costs ``t`` rows instead of ``P + t``.

Parameter tree: ``img/...`` and ``img_proj/...`` (with an image tower, PaliGemma's names) and
``llm/...`` (:mod:`gemma` names), so the PaliGemma and Gemma readers fill it directly.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adalink_jax.models import gemma as gemma_lib
from adalink_jax.models import layers
from adalink_jax.models import paligemma as pg_lib
from adalink_jax.models import vit as vit_lib
from adalink_jax.models.seam import IMAGE, TEXT, EncoderInputs


@dataclasses.dataclass(frozen=True)
class PrefixLMConfig:
  """A Gemma decoder, an optional image tower, and how the prompt is laid out and attended."""
  llm: gemma_lib.GemmaConfig
  vit: Optional[vit_lib.ViTConfig] = None
  prefix_lm: bool = True            # False: causal over everything (a plain LM)
  one_based_positions: bool = True  # HF PaliGemma's RoPE positions (relative: immaterial)
  window_cuts_prefix: bool = False  # see models/paligemma.py
  separator_id: Optional[int] = None  # appended after the prompt ('\n' for PaliGemma)
  # True: the LM head over every slot, then the answer's rows kept (what a plain decoder-only
  # forward does; only for comparisons -- same logits, more work).
  full_head: bool = False

  @property
  def num_image_tokens(self) -> int:
    return 0 if self.vit is None else self.vit.num_patches

  def replace(self, **kw) -> 'PrefixLMConfig':
    return dataclasses.replace(self, **kw)


def left_align(inputs: EncoderInputs) -> EncoderInputs:
  """Rolls each row so its last real slot is the row's last slot (padding moves to the front)."""
  length = inputs.mask.shape[1]
  slots = jnp.arange(length)
  last = jnp.max(jnp.where(inputs.mask, slots[None], -1), axis=1)
  shift = (length - 1 - last)[:, None]
  index = (slots[None] - shift) % length
  take = lambda x: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  return EncoderInputs(take(inputs.embeddings), take(inputs.mask), take(inputs.modality),
                       inputs.task_id)


class PrefixLM(nn.Module):
  """Entry points (``model.apply(vars, ..., method=...)``):

  ``__call__(prompt[b, p], targets[b, t], images, task_id)`` -> logits ``[b, t, vocab]`` fp32;
  ``prefill(prompt, images, task_id, max_new)`` -> (logits ``[b, vocab]``, cache);
  ``decode_step(token[b], cache, task_id)`` -> (logits ``[b, vocab]``, cache);
  ``extend(tokens[b, n], cache, task_id)`` -> (logits ``[b, n, vocab]``, cache).
  """
  config: PrefixLMConfig
  # Named as in the T5 family so 'what trains' and 'what a backbone lacks' read the same:
  # 'encoder' is the prefix here, 'decoder' the suffix.
  encoder_input_adapter: Optional[nn.Module] = None
  decoder_input_adapter: Optional[nn.Module] = None

  def setup(self):
    cfg = self.config
    if cfg.vit is not None:
      self.img = vit_lib.ViT(cfg.vit)
      self.img_proj = layers.Dense(cfg.llm.d_model, ('mlp', 'embed'), use_bias=True,
                                   dtype=cfg.llm.dtype, param_dtype=cfg.llm.param_dtype)
    self.llm = gemma_lib.Gemma(cfg.llm)

  # ---------------------------------------------------------------- layout

  def _prompt_tokens(self, prompt: jax.Array) -> jax.Array:
    """``prompt[b, p]`` right-padded -> ``<bos> prompt [sep]`` ``[b, p + 1 (+1)]``."""
    cfg = self.config
    b = prompt.shape[0]
    pad = cfg.llm.pad_id
    tokens = jnp.concatenate([jnp.full((b, 1), cfg.llm.bos_id, prompt.dtype), prompt], axis=1)
    if cfg.separator_id is None:
      return tokens
    tokens = jnp.concatenate([tokens, jnp.full((b, 1), pad, prompt.dtype)], axis=1)
    after = jnp.sum(tokens != pad, axis=1)  # bos + real prompt tokens
    return jnp.where(jnp.arange(tokens.shape[1])[None] == after[:, None], cfg.separator_id,
                     tokens)

  def prefix(self, prompt: jax.Array, images: Optional[jax.Array] = None,
             task_id: Optional[jax.Array] = None) -> EncoderInputs:
    """The prefix after the seam, left-aligned: ``[b, P, d]`` (P includes any prompt-tuning
    slots the seam prepended)."""
    cfg = self.config
    tokens = self._prompt_tokens(prompt)
    x = self.llm.embed(tokens)
    mask = tokens != cfg.llm.pad_id
    modality = jnp.full(tokens.shape, TEXT, jnp.int32)
    if cfg.vit is not None:
      if images is None:
        raise ValueError('this model has an image tower: the batch needs "image" [b, H, W, 3]')
      img = self.img_proj(self.img(images, True)).astype(cfg.llm.dtype)
      b, n = img.shape[:2]
      x = jnp.concatenate([img, x.astype(img.dtype)], axis=1)
      mask = jnp.concatenate([jnp.ones((b, n), bool), mask], axis=1)
      modality = jnp.concatenate([jnp.full((b, n), IMAGE, jnp.int32), modality], axis=1)
    inputs = EncoderInputs(x, mask, modality, task_id)
    if self.encoder_input_adapter is not None:
      inputs = self.encoder_input_adapter(inputs)
    return left_align(inputs)

  def _suffix(self, tokens: jax.Array, task_id: Optional[jax.Array]) -> jax.Array:
    x = self.llm.embed(tokens)
    if self.decoder_input_adapter is None:
      return x
    return self.decoder_input_adapter(EncoderInputs(
        x, tokens != self.config.llm.pad_id, jnp.full(tokens.shape, TEXT, jnp.int32),
        task_id)).embeddings

  def _positions(self, mask: jax.Array) -> jax.Array:
    if self.config.one_based_positions:
      return pg_lib.one_based_positions(mask)
    return gemma_lib.default_positions(mask)

  def _masks(self, key_mask, query_slots, key_slots, prefix_slots: int):
    cfg = self.config
    window = cfg.llm.sliding_window if gemma_lib.LOCAL in cfg.llm.layer_types else None
    full = prefix_slots if cfg.prefix_lm else 0
    prefix_len = jnp.full((key_mask.shape[0],), full, jnp.int32)
    return pg_lib.prefix_lm_masks(key_mask, query_slots, key_slots, prefix_len, window,
                                  cfg.window_cuts_prefix)

  # ---------------------------------------------------------------- teacher forcing

  def __call__(self, prompt: jax.Array, targets: jax.Array, images: Optional[jax.Array] = None,
               task_id: Optional[jax.Array] = None) -> jax.Array:
    """Logits ``[b, t, vocab]`` fp32: row ``j`` predicts ``targets[:, j]``."""
    pre = self.prefix(prompt, images, task_id)
    p, t = pre.mask.shape[1], targets.shape[1]
    suffix = targets[:, :t - 1]
    x = jnp.concatenate([pre.embeddings, self._suffix(suffix, task_id).astype(
        pre.embeddings.dtype)], axis=1)
    mask = jnp.concatenate([pre.mask, suffix != self.config.llm.pad_id], axis=1)
    slots = jnp.arange(p + t - 1)
    masks = self._masks(mask, slots, slots, p)
    h, _ = self.llm.blocks(x, self._positions(mask), masks, None, None)
    if self.config.full_head:
      return self.llm.head(h)[:, p - 1:]
    return self.llm.head(h[:, p - 1:])

  # ---------------------------------------------------------------- cached decoding

  def prefill(self, prompt: jax.Array, images: Optional[jax.Array] = None,
              task_id: Optional[jax.Array] = None, max_new: int = 1
              ) -> tuple[jax.Array, gemma_lib.DecodeCache]:
    """The prefix into a cache with room for ``max_new`` tokens -> (first logits, cache)."""
    pre = self.prefix(prompt, images, task_id)
    p = pre.mask.shape[1]
    masks_fn = lambda key_mask, q, k: self._masks(key_mask, q, k, p)
    return self.llm.prefill(pre.embeddings, pre.mask, self._positions(pre.mask),
                            max_len=p + int(max_new), masks_fn=masks_fn)

  def decode_step(self, token: jax.Array, cache: gemma_lib.DecodeCache,
                  task_id: Optional[jax.Array] = None
                  ) -> tuple[jax.Array, gemma_lib.DecodeCache]:
    """``token[b]`` (a suffix token: causal, windowed) -> (logits ``[b, vocab]``, cache)."""
    return self.llm.decode_step_embedded(self._suffix(token[:, None], task_id), cache)

  def extend(self, tokens: jax.Array, cache: gemma_lib.DecodeCache,
             task_id: Optional[jax.Array] = None
             ) -> tuple[jax.Array, gemma_lib.DecodeCache]:
    """``tokens[b, n]`` (suffix tokens, right-padded) in one cached pass -> (logits
    ``[b, n, vocab]``, cache): row ``j`` predicts the token after ``tokens[:, j]``, as the
    teacher-forced :meth:`__call__` does from its suffix slots."""
    return self.llm.extend_embedded(self._suffix(tokens, task_id), cache,
                                    tokens != self.config.llm.pad_id)


def gather_cache(cache: gemma_lib.DecodeCache, rows: jax.Array) -> gemma_lib.DecodeCache:
  """Reorders the cache's batch rows by ``rows[n]`` (beam search)."""
  return gemma_lib.DecodeCache(jnp.take(cache.k, rows, axis=1), jnp.take(cache.v, rows, axis=1),
                               jnp.take(cache.key_mask, rows, axis=0), cache.index,
                               jnp.take(cache.next_position, rows, axis=0))
