"""PaliGemma (1 and 2): SigLIP image tokens ahead of the prompt in a Gemma prefix-LM.

``images -> ViT (every patch token) -> img_proj (width -> d_model) -> [image; text] -> Gemma``.

As transformers 5.24 ``modeling_paligemma`` and big_vision's PaliGemma: the projected image
tokens enter the decoder *unscaled*, the text tokens are Gemma's embeddings (times sqrt(d)),
positions are 1-based over real tokens (HF; RoPE is relative, so the offset is immaterial),
and attention is prefix-LM: every slot before ``prefix_len`` (image + ``<bos>`` prefix ``\\n``)
sees the whole prefix, the suffix is causal. On sliding-window (Gemma 2) layers HF's window
does not cut the prefix block (``blockwise_overlay`` OR-ed onto the sliding causal mask);
big_vision's / the gemma library's does (band AND prefix mask): ``window_cuts_prefix``.
The two differ only when image + prefix is longer than the window (4096 image tokens at 896px).

The seam: :meth:`PaliGemma.embed` returns a :class:`~adalink_jax.models.seam.EncoderInputs`
(embeddings, mask, modality ``IMAGE``/``TEXT`` per slot, task id) -- what AdaLink and prompt
tuning act on -- and :meth:`PaliGemma.decode_from_embeddings` runs the decoder on it.

Parameter tree: ``img/...`` (big_vision ViT names), ``img_proj/{kernel, bias}`` (big_vision
``img/head``, HF ``multi_modal_projector.linear``), ``llm/...`` (:mod:`gemma` names).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax.models import gemma as gemma_lib
from adalink_jax.models import layers
from adalink_jax.models import vit as vit_lib
from adalink_jax.models.seam import IMAGE, TEXT, EncoderInputs

PALIGEMMA_VOCAB = 257_152  # Gemma's 256000 + 1024 <locXXXX> + 128 <segXXX> (big_vision)
_SHARED = ('dtype', 'param_dtype', 'scan_layers', 'remat_policy')


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
  """A ViT (``pool_type='none'``), a Gemma decoder, and how windows meet the prefix."""
  vit: vit_lib.ViTConfig
  llm: gemma_lib.GemmaConfig
  window_cuts_prefix: bool = False  # False: HF; True: big_vision / gemma library

  def __post_init__(self):
    if self.vit.pool_type != 'none':
      raise ValueError(f'PaliGemmaConfig.vit.pool_type must be "none" (every image token goes '
                       f'to the decoder), got {self.vit.pool_type!r}')

  @property
  def num_image_tokens(self) -> int:
    return self.vit.num_patches

  def replace(self, **kw) -> 'PaliGemmaConfig':
    return dataclasses.replace(self, **kw)


# name -> (ViT variant, Gemma size, PaliGemma-specific Gemma overrides). Public ones: big_vision
# PaliGemma (So400m/14 + Gemma 2B) and PaliGemma 2 (+ Gemma 2 2B / 9B / 27B).
_PG = dict(vocab_size=PALIGEMMA_VOCAB)
PALIGEMMA_SIZES: dict[str, tuple[str, str, dict]] = {
    'paligemma_tiny': ('tiny', 'gemma_tiny', {}),
    'paligemma2_tiny': ('tiny', 'gemma2_tiny', {}),
    'paligemma_3b': ('So400m/14', 'gemma_2b', _PG),
    'paligemma2_3b': ('So400m/14', 'gemma2_2b', _PG),
    'paligemma2_10b': ('So400m/14', 'gemma2_9b', _PG),
    'paligemma2_28b': ('So400m/14', 'gemma2_27b', _PG),
}


def paligemma_config(name: str, image_size: Optional[int] = None, **overrides
                     ) -> PaliGemmaConfig:
  """Named shapes; ``image_size`` 224 / 448 / 896 for the public ones (default 224, tiny 16).

  ``overrides`` go to the Gemma config; ``dtype``, ``param_dtype``, ``scan_layers`` and
  ``remat_policy`` go to the ViT too.
  """
  if name not in PALIGEMMA_SIZES:
    raise ValueError(f'unknown PaliGemma size {name!r}; known: {sorted(PALIGEMMA_SIZES)}')
  vit_name, llm_name, llm_kw = PALIGEMMA_SIZES[name]
  shared = {k: v for k, v in overrides.items() if k in _SHARED}
  vit_kw = dict(pool_type='none', **shared)
  if image_size is not None or vit_name != 'tiny':
    vit_kw['image_size'] = image_size or 224
  vit = vit_lib.vit_config(vit_name, **vit_kw)
  return PaliGemmaConfig(vit, gemma_lib.gemma_config(llm_name, **{**llm_kw, **overrides}))


# ------------------------------------------------------------------ prompt format


class PromptLayout(NamedTuple):
  """One example's text tokens around ``num_image`` image slots (all numpy).

  tokens ``[t]``: ``<bos> prefix '\\n' suffix <eos>`` (no image slots); prefix_len: slots with
  full attention, image ones included (``num_image + 1 + len(prefix)``); targets ``[n + t]``:
  the next token of every slot (0 at the last); loss_weights ``[n + t]``: 1 where the target
  is a suffix token or ``<eos>`` (HF labels shifted: the prefix, image included, is never a
  target); token_type_ids ``[n + t]``: HF's 0 = prefix, 1 = suffix.
  """
  tokens: np.ndarray
  prefix_len: int
  targets: np.ndarray
  loss_weights: np.ndarray
  token_type_ids: np.ndarray


def paligemma_prompt(prefix: str, suffix: Optional[str] = None) -> tuple[str, Optional[str]]:
  """PaliGemma's prompt texts: ``(prefix + '\\n', suffix)``; e.g. ``'caption en'``,
  ``'answer en ' + question``.

  The model sees ``<image>*n <bos> {prefix}\\n {suffix} <eos>``: the newline ends the prefix
  (HF ``PaliGemmaProcessor``: image tokens + bos + prompt + '\\n'; the suffix is tokenized on
  its own and gets eos). Tokenize both texts without bos/eos and pass them to
  :func:`prompt_layout`.
  """
  if '\n' in prefix:
    raise ValueError(f'PaliGemma prefix {prefix!r} contains a newline; the newline is the '
                     'prefix/suffix separator, remove it from the prompt')
  return f'{prefix}\n', suffix


def prompt_layout(prefix_ids: Sequence[int], suffix_ids: Optional[Sequence[int]] = None, *,
                  num_image_tokens: int, bos_id: int = 2, eos_id: int = 1) -> PromptLayout:
  """Token layout of one example; ``prefix_ids`` tokenize ``prefix + '\\n'``.

  Without ``suffix_ids`` (inference) there is no ``<eos>`` and no loss.
  """
  prefix = [bos_id, *prefix_ids]
  suffix = [] if suffix_ids is None else [*suffix_ids, eos_id]
  tokens = np.asarray(prefix + suffix, np.int32)
  n, t = num_image_tokens, len(tokens)
  prefix_len = n + len(prefix)
  full = np.concatenate([np.zeros(n, np.int32), tokens])
  targets = np.concatenate([full[1:], [0]]).astype(np.int32)
  weights = (np.arange(n + t) >= prefix_len - 1) & (np.arange(n + t) < n + t - 1)
  types = (np.arange(n + t) >= prefix_len).astype(np.int32)
  return PromptLayout(tokens, prefix_len, targets, weights.astype(np.float32), types)


# ------------------------------------------------------------------ masks


def prefix_lm_masks(key_mask: jax.Array, query_slots: jax.Array, key_slots: jax.Array,
                    prefix_len: jax.Array, window: Optional[int],
                    window_cuts_prefix: bool = False) -> tuple[jax.Array, jax.Array]:
  """(global, local) bool ``[b, q, k]``: prefix-LM; local adds the sliding window.

  ``window_cuts_prefix=False`` (HF): inside the prefix block every slot sees every other one
  whatever the distance; True (big_vision): the symmetric band ``|q - k| < window`` applies
  everywhere.
  """
  g = gemma_lib.attention_mask(key_mask, query_slots, key_slots, prefix_len)
  if window is None:
    return g, g
  q, k = query_slots[:, None], key_slots[None, :]
  near = (jnp.abs(q - k) < window)[None]
  if not window_cuts_prefix:
    p = prefix_len[:, None, None]
    near = near | ((q[None] < p) & (k[None] < p))
  return g, g & near


def one_based_positions(mask: jax.Array) -> jax.Array:
  """HF PaliGemma's RoPE positions: 1 for the first real token (``cumsum(mask)``)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1), 1)


# ------------------------------------------------------------------ the model


class PaliGemma(nn.Module):
  """ViT + projection + Gemma. ``input_adapter(EncoderInputs) -> EncoderInputs`` is the seam.

  Entry points (``model.apply(vars, ..., method=...)``):
  ``__call__(images, tokens, prefix_len, text_mask)`` -> logits ``[b, n + t, vocab]`` fp32;
  ``embed`` + ``decode_from_embeddings``: the same in two halves;
  ``prefill(inputs, prefix_len, max_len)`` and ``decode_step`` (Gemma's) for cached decoding.
  """
  config: PaliGemmaConfig
  input_adapter: Optional[nn.Module] = None

  def setup(self):
    cfg = self.config
    self.img = vit_lib.ViT(cfg.vit)
    # Input side named 'mlp' (not 'embed') so the kernel's two dims never share a mesh axis.
    self.img_proj = layers.Dense(cfg.llm.d_model, ('mlp', 'embed'), use_bias=True,
                                 dtype=cfg.llm.dtype, param_dtype=cfg.llm.param_dtype)
    self.llm = gemma_lib.Gemma(cfg.llm)

  def embed_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """``images[b, H, W, 3]`` in [-1, 1] -> image tokens ``[b, n, d_model]`` (not scaled)."""
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f'images must be floating point in [-1, 1], got dtype {images.dtype}')
    return self.img_proj(self.img(images, deterministic)).astype(self.config.llm.dtype)

  def embed(self, images: jax.Array, tokens: jax.Array, text_mask: Optional[jax.Array] = None,
            task_id: Optional[jax.Array] = None, deterministic: bool = True) -> EncoderInputs:
    """-> ``EncoderInputs`` over ``[image; text]`` slots ``[b, n + t]`` (before the seam).

    tokens ``[b, t]``: ``<bos> prefix '\\n' [suffix <eos>]``; text_mask ``[b, t]`` (default
    ``tokens != pad_id``). modality: ``IMAGE`` on image slots, ``TEXT`` on text ones.
    """
    img = self.embed_image(images, deterministic)
    txt = self.llm.embed(tokens)
    b, n = img.shape[:2]
    if text_mask is None:
      text_mask = tokens != self.config.llm.pad_id
    x = jnp.concatenate([img, txt.astype(img.dtype)], axis=1)
    mask = jnp.concatenate([jnp.ones((b, n), bool), text_mask.astype(bool)], axis=1)
    modality = jnp.concatenate([jnp.full((b, n), IMAGE, jnp.int32),
                                jnp.full(tokens.shape, TEXT, jnp.int32)], axis=1)
    return EncoderInputs(x, mask, modality, task_id)

  def _masks(self, key_mask, query_slots, key_slots, prefix_len):
    cfg = self.config
    window = cfg.llm.sliding_window if gemma_lib.LOCAL in cfg.llm.layer_types else None
    return prefix_lm_masks(key_mask, query_slots, key_slots, prefix_len, window,
                           cfg.window_cuts_prefix)

  def decode_from_embeddings(self, inputs: EncoderInputs, prefix_len: jax.Array,
                             positions: Optional[jax.Array] = None) -> jax.Array:
    """``inputs`` (after the seam) -> logits ``[b, L, vocab]`` fp32.

    prefix_len ``[b]``: slots with full attention, counted over ``inputs`` (image + bos +
    prefix + newline, plus any prompt the seam prepended); positions default to HF's.
    """
    x, mask = inputs.embeddings, inputs.mask
    _check_prefix_len(prefix_len, x.shape[0])
    positions = one_based_positions(mask) if positions is None else positions
    slots = jnp.arange(x.shape[1])
    masks = self._masks(mask, slots, slots, prefix_len)
    # Gemma's own masks cannot express HF's window-spares-prefix rule; see module docstring.
    h, _ = self.llm.blocks(x, positions, masks, None, None)
    return self.llm.head(h)

  def __call__(self, images: jax.Array, tokens: jax.Array, prefix_len: jax.Array,
               text_mask: Optional[jax.Array] = None, task_id: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """Teacher-forced logits ``[b, n + t, vocab]``; ``prefix_len[b]`` counts image slots too."""
    inputs = self.embed(images, tokens, text_mask, task_id, deterministic)
    if self.input_adapter is not None:
      inputs = self.input_adapter(inputs)
    return self.decode_from_embeddings(inputs, prefix_len)

  def prefill(self, inputs: EncoderInputs, prefix_len: jax.Array, max_len: Optional[int] = None
              ) -> tuple[jax.Array, gemma_lib.DecodeCache]:
    """The prompt (its last slot real) into a new cache -> (last logits ``[b, vocab]``, cache).

    As :meth:`Gemma.prefill` but with this model's prefix-LM masks and 1-based positions.
    """
    x, mask = inputs.embeddings, inputs.mask.astype(bool)
    b, length = x.shape[:2]
    _check_prefix_len(prefix_len, b)
    if max_len is not None and int(max_len) < length:
      raise ValueError(f'PaliGemma.prefill: max_len={max_len} is shorter than the prompt '
                       f'({length} slots); pass max_len >= prompt + new tokens')
    masks_fn = lambda key_mask, q, k: self._masks(key_mask, q, k, prefix_len)
    return self.llm.prefill(x, mask, one_based_positions(mask), max_len=max_len,
                            masks_fn=masks_fn)

  def decode_step(self, token: jax.Array, cache: gemma_lib.DecodeCache
                  ) -> tuple[jax.Array, gemma_lib.DecodeCache]:
    """``token[b]`` (a suffix token: causal, windowed) -> (logits ``[b, vocab]``, cache)."""
    return self.llm.decode_step(token, cache)


def _check_prefix_len(prefix_len: Any, batch: int) -> None:
  if prefix_len is None or tuple(jnp.shape(prefix_len)) != (batch,):
    raise ValueError(f'PaliGemma: prefix_len must be an int array [batch={batch}] (image + '
                     f'<bos> + prefix + newline slots per example), got '
                     f'{None if prefix_len is None else jnp.shape(prefix_len)}')


# ------------------------------------------------------------------ helpers


def greedy_generate(model: PaliGemma, params: Any, images: jax.Array, tokens: jax.Array,
                    max_new_tokens: int, text_mask: Optional[jax.Array] = None) -> jax.Array:
  """Greedy continuation of prompts (all prefix: ``<bos> prefix '\\n'``, left-padded text)
  -> ``[b, max_new_tokens]``. No early stop: the caller cuts at ``eos_id``."""
  if max_new_tokens < 1:
    raise ValueError(f'greedy_generate: max_new_tokens={max_new_tokens} must be >= 1')
  n = model.config.num_image_tokens
  length = n + tokens.shape[1]
  max_len = length + max_new_tokens - 1
  variables = {'params': params}

  @jax.jit
  def run(variables, images, tokens, text_mask):
    inputs = model.apply(variables, images, tokens, text_mask, method=PaliGemma.embed)
    prefix_len = jnp.full((tokens.shape[0],), length, jnp.int32)
    logits, cache = model.apply(variables, inputs, prefix_len, max_len, method=PaliGemma.prefill)
    return gemma_lib.greedy_steps(lambda token, c: model.apply(
        variables, token, c, method=PaliGemma.decode_step), logits, cache, max_new_tokens)

  return run(variables, images, tokens, text_mask)


def param_shapes(config: PaliGemmaConfig) -> Any:
  """The (unboxed) parameter tree of ``PaliGemma(config)`` as ``ShapeDtypeStruct``s."""
  h, w = config.vit.image_size
  images = jax.ShapeDtypeStruct((1, h, w, config.vit.num_channels), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  prefix = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(
      lambda im, tx, p: PaliGemma(config).init(jax.random.key(0), im, tx, p), images, tokens,
      prefix)
  return nn.unbox(variables['params'])


def param_count(config: PaliGemmaConfig) -> int:
  """Number of parameters of a config, without allocating (scanned for fast tracing)."""
  fast = config.replace(vit=config.vit.replace(scan_layers=True),
                        llm=config.llm.replace(scan_layers=True))
  leaves = jax.tree_util.tree_leaves(param_shapes(fast))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))
