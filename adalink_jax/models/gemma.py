"""Gemma text decoders (Gemma 1, 2 and 3) with an embedding seam and a KV-cache decode path.

Forward pass: ``embed(tokens) -> [the seam: adapters edit embeddings] -> blocks -> logits``.
:meth:`Gemma.embed` and :meth:`Gemma.decode_from_embeddings` are the two halves, so an input
adapter (AdaLink, prompt tuning) acts after the embedder and before the first block.

Variants are one module, chosen by :class:`GemmaConfig` fields:
  Gemma 1: all layers global, no post-norms, query scale ``head_dim**-0.5``.
  Gemma 2: local (sliding-window) / global layers alternating, attention-logit and final-logit
    soft-capping, post-attention / post-FFN norms, query scale ``query_pre_attn_scalar**-0.5``.
  Gemma 3: 5 local : 1 global, RMSNorm on queries and keys per head, RoPE base 10k on local
    and 1M on global layers (optionally linearly scaled), no soft-capping.

Parameter tree (``layers_<i>/...``, or ``layers/...`` stacked on a leading ``layers`` axis
with ``scan_layers``)::

  embedder/input_embedding [vocab, embed]          (tied LM head)
  layers_i/pre_attention_norm/scale [embed]
  layers_i/attn/{q,k,v}_proj/kernel [embed, heads|kv_heads, head_dim]
  layers_i/attn/o_proj/kernel [heads, head_dim, embed]
  layers_i/attn/{query,key}_norm/scale [head_dim]  (Gemma 3)
  layers_i/post_attention_norm/scale, layers_i/post_ffw_norm/scale  (Gemma 2, 3)
  layers_i/pre_ffw_norm/scale
  layers_i/mlp/{gate,up}_proj/kernel [embed, mlp], layers_i/mlp/down_proj/kernel [mlp, embed]
  final_norm/scale

Norm scales are stored as HF / big_vision store them: the norm multiplies by ``1 + scale``.
Attention masks are over *slots* (indices in the row / cache), as in HF: causal, sliding
window and prefix-LM are decided by slot, RoPE by ``positions``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax.models import intrusive
from adalink_jax.models import layers
from adalink_jax.models.axes import param
from adalink_jax.models.t5 import constrain_activations

Dtype = Any
GLOBAL, LOCAL = 'global', 'local'
_MASKED = -2.3819763e38  # logit of a hidden key (big_vision's value): finite, so no NaN rows


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Shape and numerics of a Gemma decoder. ``layer_types=()`` means all layers global."""
  vocab_size: int = 256000
  d_model: int = 2048
  num_layers: int = 18
  num_heads: int = 8
  num_kv_heads: int = 1
  head_dim: int = 256
  d_ff: int = 16384
  layer_types: tuple[str, ...] = ()
  sliding_window: Optional[int] = None
  query_pre_attn_scalar: Optional[float] = None  # None: head_dim (Gemma 1)
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  use_post_norms: bool = False  # Gemma 2/3: norm after attention and after the MLP
  use_qk_norm: bool = False     # Gemma 3
  rope_base_global: float = 10_000.0
  rope_base_local: float = 10_000.0
  rope_scale_global: float = 1.0  # linear RoPE scaling: positions / factor
  rope_scale_local: float = 1.0
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32        # activations
  param_dtype: Dtype = jnp.float32  # stored weights
  scan_layers: bool = False
  remat_policy: str = 'none'  # 'none' | 'full' | 'minimal', as in T5
  # Intrusive hooks ((site, hook) pairs, see models.intrusive); () means plain Gemma.
  hooks: intrusive.Hooks = ()
  pad_id: int = 0
  eos_id: int = 1
  bos_id: int = 2

  def __post_init__(self):
    types = tuple(self.layer_types) or (GLOBAL,) * self.num_layers
    object.__setattr__(self, 'layer_types', types)
    if len(types) != self.num_layers or set(types) - {GLOBAL, LOCAL}:
      raise ValueError(f'GemmaConfig.layer_types must hold {self.num_layers} entries, each '
                       f'{GLOBAL!r} or {LOCAL!r}; got {types}')
    if LOCAL in types and not (self.sliding_window or 0) >= 1:
      raise ValueError(f'GemmaConfig: local layers need sliding_window >= 1, got '
                       f'{self.sliding_window}; set it or make every layer global')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'GemmaConfig: num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f'GemmaConfig.remat_policy {self.remat_policy!r}; choose from '
                       f'{sorted(_REMAT_POLICIES)}')

  def replace(self, **kw) -> 'GemmaConfig':
    return dataclasses.replace(self, **kw)

  @property
  def query_scale(self) -> float:
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5


def layer_pattern(num_layers: int, period: int) -> tuple[str, ...]:
  """Every ``period``-th layer global, the rest local (HF: ``(i + 1) % period`` -> local)."""
  return tuple(LOCAL if (i + 1) % period else GLOBAL for i in range(num_layers))


_G1 = dict(vocab_size=256000, head_dim=256)
_G2 = dict(vocab_size=256000, query_pre_attn_scalar=256, attn_logit_softcap=50.0,
           final_logit_softcap=30.0, use_post_norms=True, sliding_window=4096)
_G3 = dict(vocab_size=262144, query_pre_attn_scalar=256, use_post_norms=True, use_qk_norm=True,
           rope_base_global=1_000_000.0, rope_base_local=10_000.0)


def _g2(n, **kw):
  return dict(_G2, num_layers=n, layer_types=layer_pattern(n, 2), **kw)


def _g3(n, **kw):
  return dict(_G3, num_layers=n, layer_types=layer_pattern(n, 6), **kw)


# Public shapes (HF config.json of the google/* checkpoints; gemma3_270m also checked against
# the GGUF metadata of the released 270M). *_tiny are for tests.
GEMMA_SIZES: dict[str, dict[str, Any]] = {
    'gemma_tiny': dict(_G1, vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                       num_kv_heads=1, head_dim=8, d_ff=64),
    'gemma2_tiny': _g2(4, vocab_size=128, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                       d_ff=64, sliding_window=4, query_pre_attn_scalar=8),
    'gemma3_tiny': _g3(7, vocab_size=128, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                       d_ff=64, sliding_window=4, query_pre_attn_scalar=8),
    'gemma_2b': dict(_G1, d_model=2048, num_layers=18, num_heads=8, num_kv_heads=1, d_ff=16384),
    'gemma_7b': dict(_G1, d_model=3072, num_layers=28, num_heads=16, num_kv_heads=16,
                     d_ff=24576),
    'gemma2_2b': _g2(26, d_model=2304, num_heads=8, num_kv_heads=4, head_dim=256, d_ff=9216),
    'gemma2_9b': _g2(42, d_model=3584, num_heads=16, num_kv_heads=8, head_dim=256, d_ff=14336),
    'gemma2_27b': _g2(46, d_model=4608, num_heads=32, num_kv_heads=16, head_dim=128,
                      d_ff=36864, query_pre_attn_scalar=144),
    'gemma3_270m': _g3(18, d_model=640, num_heads=4, num_kv_heads=1, head_dim=256, d_ff=2048,
                       sliding_window=512),
    'gemma3_1b': _g3(26, d_model=1152, num_heads=4, num_kv_heads=1, head_dim=256, d_ff=6912,
                     sliding_window=512),
    'gemma3_4b': _g3(34, vocab_size=262208, d_model=2560, num_heads=8, num_kv_heads=4,
                     head_dim=256, d_ff=10240, sliding_window=1024, rope_scale_global=8.0),
}


def gemma_config(name: str, **overrides) -> GemmaConfig:
  """The named public shape (``gemma_2b``, ``gemma2_9b``, ``gemma3_270m`` ...)."""
  if name not in GEMMA_SIZES:
    raise ValueError(f'unknown Gemma size {name!r}; known: {sorted(GEMMA_SIZES)}')
  return GemmaConfig(**{**GEMMA_SIZES[name], **overrides})


# ------------------------------------------------------------------ pieces


class RMSNorm(nn.Module):
  """Gemma RMSNorm: fp32 statistics, times ``(1 + scale)`` in fp32, then the input's dtype."""
  epsilon: float = 1e-6
  axis_name: str = 'embed'
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = param(self, 'scale', nn.initializers.zeros, (x.shape[-1],), self.param_dtype,
                  (self.axis_name,))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
  """Token table ``[vocab, embed]``: ``encode`` (scaled by sqrt(d_model)) and the tied head."""
  vocab_size: int
  d_model: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.input_embedding = param(self, 'input_embedding', nn.initializers.normal(0.02),
                                 (self.vocab_size, self.d_model), self.param_dtype,
                                 ('vocab', 'embed'))

  def encode(self, tokens: jax.Array) -> jax.Array:
    """``tokens[b, l]`` int -> ``[b, l, d_model]``."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f'token ids must be integers, got {tokens.dtype}')
    x = jnp.take(self.input_embedding, tokens, axis=0).astype(self.dtype)
    # sqrt(d) rounded to the activation dtype first, as HF does (55.4256 -> 55.5 in bf16).
    return x * jnp.asarray(math.sqrt(self.d_model), self.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    """``x[..., d_model]`` -> logits ``[..., vocab]`` against the same table."""
    return jnp.dot(x.astype(self.dtype), self.input_embedding.astype(self.dtype).T)


class HeadsProjection(nn.Module):
  """``x[b, l, embed] -> [b, l, heads, head_dim]`` with a 3-D kernel (head axis named).

  hooks: this projection's intrusive hooks (``intrusive.at(table, 'query')`` ...); they see the
  output with heads joined, ``[b, l, heads * head_dim]`` (axes ``embed -> joined_kv``).
  """
  num_heads: int
  head_dim: int
  heads_axis: str = 'heads'  # 'kv_heads' for K/V: GQA/MQA have too few heads to shard
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  hooks: intrusive.Hooks = ()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = param(self, 'kernel', layers.default_kernel_init,
                   (x.shape[-1], self.num_heads, self.head_dim), self.param_dtype,
                   ('embed', self.heads_axis, 'kv'))
    y = jnp.einsum('bld,dhk->blhk', x.astype(self.dtype), kernel.astype(self.dtype))
    if not self.hooks:
      return y
    joined = intrusive.run(self.hooks, y.reshape(y.shape[:2] + (-1,)), x,
                           axes=('embed', 'joined_kv'), dtype=self.dtype,
                           param_dtype=self.param_dtype)
    return joined.reshape(y.shape)


def softcap(x: jax.Array, cap: Optional[float]) -> jax.Array:
  """``cap * tanh(x / cap)`` (identity when ``cap`` is None)."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def rope_tables(positions: jax.Array, head_dim: int, base: float, scale: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
  """``positions[b, l]`` -> (cos, sin) ``[b, l, head_dim]`` fp32 (HF's half-split layout)."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * (inv_freq / scale)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x[b, l, h, d]`` rotated by ``cos/sin[b, l, d]`` in x's dtype."""
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def attention_mask(key_mask: jax.Array, query_slots: jax.Array, key_slots: jax.Array,
                   prefix_len: Optional[jax.Array] = None, window: Optional[int] = None
                   ) -> jax.Array:
  """Which keys each query sees -> bool ``[b, q, k]``.

  key_mask[b, k]: real keys. query_slots[q], key_slots[k]: indices in the row (or cache).
  Causal; with ``prefix_len[b]`` keys in the first ``prefix_len`` slots are seen by every
  query (prefix-LM: full attention inside the prefix); with ``window`` only keys with
  ``|q - k| < window`` (Gemma's sliding window, symmetric as in big_vision).
  """
  q, k = query_slots[:, None], key_slots[None, :]
  allowed = (k <= q)[None]
  if prefix_len is not None:
    allowed = allowed | (k[None] < prefix_len[:, None, None])
  allowed = allowed & key_mask[:, None, :].astype(bool)
  if window is not None:
    allowed = allowed & (jnp.abs(q - k) < window)[None]
  return allowed


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, optional QK-norm and logit soft-capping.

  ``x[b, q, embed]``, ``cos/sin[b, q, head_dim]``, ``mask[b, q, k]`` bool. ``cache`` is
  ``(k, v)`` ``[b, max_len, kv_heads, head_dim]`` to write this step's keys into at slot
  ``write_index`` and attend over, or None (keys are this call's). Returns the output and the
  ``(k, v)`` attended over.
  """
  config: GemmaConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, write_index=None):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    at = lambda site: intrusive.at(cfg.hooks, site)
    q = HeadsProjection(cfg.num_heads, cfg.head_dim, name='q_proj', hooks=at('query'), **kw)(x)
    k = HeadsProjection(cfg.num_kv_heads, cfg.head_dim, 'kv_heads', name='k_proj',
                        hooks=at('key'), **kw)(x)
    v = HeadsProjection(cfg.num_kv_heads, cfg.head_dim, 'kv_heads', name='v_proj',
                        hooks=at('value'), **kw)(x)
    if cfg.use_qk_norm:
      q = RMSNorm(cfg.norm_eps, 'kv', cfg.param_dtype, name='query_norm')(q)
      k = RMSNorm(cfg.norm_eps, 'kv', cfg.param_dtype, name='key_norm')(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
      start = (0, write_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
    b, lq = q.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    # Query head h uses KV head h // groups (HF's repeat_kv order).
    q = q.reshape(b, lq, cfg.num_kv_heads, groups, cfg.head_dim)
    logits = jnp.einsum('bqkgd,bskd->bkgqs', q, k.astype(cfg.dtype)) * cfg.query_scale
    logits = softcap(logits.astype(jnp.float32), cfg.attn_logit_softcap)
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
    out = jnp.einsum('bkgqs,bskd->bqkgd', weights, v.astype(cfg.dtype))
    out = out.reshape(b, lq, cfg.num_heads, cfg.head_dim)
    return OutProjection(cfg, name='o_proj')(out), (k, v)


class OutProjection(nn.Module):
  """``[b, l, heads, head_dim] -> [b, l, embed]`` with kernel ``[heads, head_dim, embed]``.

  Hooks at site 'out' see the input with heads joined, ``[b, l, heads * head_dim]``.
  """
  config: GemmaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kernel = param(self, 'kernel', layers.default_kernel_init,
                   (cfg.num_heads, cfg.head_dim, cfg.d_model), cfg.param_dtype,
                   ('heads', 'kv', 'embed'))
    y = jnp.einsum('blhk,hkd->bld', x.astype(cfg.dtype), kernel.astype(cfg.dtype))
    return intrusive.apply(cfg.hooks, 'out', y, x.reshape(x.shape[:2] + (-1,)),
                           axes=('joined_kv', 'embed'), dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype)


class Mlp(nn.Module):
  """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``. Hook sites: 'wi' (gate and up), 'mlp_hidden'
  (the input of down) and 'wo' (down)."""
  config: GemmaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    wi = intrusive.at(cfg.hooks, 'wi')
    gate = layers.Dense(cfg.d_ff, ('embed', 'mlp'), name='gate_proj', hooks=wi, **kw)(x)
    up = layers.Dense(cfg.d_ff, ('embed', 'mlp'), name='up_proj', hooks=wi, **kw)(x)
    h = nn.gelu(gate, approximate=True) * up
    h = intrusive.apply(cfg.hooks, 'mlp_hidden', h, axes=('mlp',), **kw)
    return layers.Dense(cfg.d_model, ('mlp', 'embed'), name='down_proj',
                        hooks=intrusive.at(cfg.hooks, 'wo'), **kw)(h)


# ------------------------------------------------------------------ blocks


class Block(nn.Module):
  """One decoder layer; local or global by ``is_local`` (a bool array, so layers can be scanned).

  ``x[b, q, embed]``; ``cache``: ``(k, v)`` of this layer or None; ``shared``:
  ``((cos, sin) global, (cos, sin) local, mask global, mask local, write_index)``.
  Returns ``(x, updated cache or None)`` -- the ``(carry, output)`` pair nn.scan wants.
  """
  config: GemmaConfig

  @nn.compact
  def __call__(self, x, is_local, cache, shared):
    cfg = self.config
    (cos_g, sin_g), (cos_l, sin_l), mask_g, mask_l, write_index = shared
    cos, sin = jnp.where(is_local, cos_l, cos_g), jnp.where(is_local, sin_l, sin_g)
    mask = jnp.where(is_local, mask_l, mask_g)
    norm = lambda name: RMSNorm(cfg.norm_eps, param_dtype=cfg.param_dtype, name=name)
    # Hooks on a sub-block's output, right before the residual add (e.g. bottleneck adapters).
    out_hooks = lambda site, y: intrusive.apply(cfg.hooks, site, y, axes=('embed',),
                                                dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    x = constrain_activations(x)
    y = norm('pre_attention_norm')(x)
    y, kv = Attention(cfg, name='attn')(y, cos, sin, mask, cache, write_index)
    if cfg.use_post_norms:
      y = norm('post_attention_norm')(y)
    x = x + out_hooks('attention_out', y)
    y = Mlp(cfg, name='mlp')(norm('pre_ffw_norm')(x))
    if cfg.use_post_norms:
      y = norm('post_ffw_norm')(y)
    return x + out_hooks('mlp_out', y), (None if cache is None else kv)


_REMAT_POLICIES = {
    'none': None,
    'full': None,  # save nothing: recompute the whole block in the backward pass
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stack(cfg: GemmaConfig):
  """The block class wrapped in remat and/or scan as the config asks."""
  block = Block
  if cfg.remat_policy != 'none':
    block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy],
                     prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    # The layer type and the per-layer cache are scanned inputs; the rest is shared.
    block = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=(0, 0, nn.broadcast), length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
  return block


# ------------------------------------------------------------------ the model


class DecodeCache(NamedTuple):
  """KV cache for greedy / sampled decoding (a pytree: pass it through jit and scan).

  k, v: ``[layers, b, max_len, kv_heads, head_dim]``; key_mask: ``[b, max_len]`` bool, slots
  holding real tokens; index: ``[]`` int32, the next slot to write; next_position: ``[b]``
  int32, the RoPE position of the next token.
  """
  k: jax.Array
  v: jax.Array
  key_mask: jax.Array
  index: jax.Array
  next_position: jax.Array


def default_positions(mask: jax.Array) -> jax.Array:
  """RoPE positions from ``mask[b, l]``: count of real tokens before each (HF ``generate``)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


class Gemma(nn.Module):
  """Gemma decoder. Entry points (``model.apply(vars, ..., method=...)``):

  ``__call__(tokens, positions, mask, prefix_len)`` -> logits ``[b, L, vocab]`` fp32;
  ``embed(tokens)`` and ``decode_from_embeddings(x, ...)``: the same in two halves (the seam);
  ``prefill(x, mask, ..., max_len)`` -> (last logits ``[b, vocab]``, :class:`DecodeCache`);
  ``decode_step(token[b], cache, position)`` -> (logits ``[b, vocab]``, cache).
  """
  config: GemmaConfig

  def setup(self):
    cfg = self.config
    self.embedder = Embedder(cfg.vocab_size, cfg.d_model, cfg.dtype, cfg.param_dtype)
    block = _stack(cfg)
    if cfg.scan_layers:
      self.layers = block(cfg)
    else:  # a list attribute names its modules layers_0, layers_1, ...
      self.layers = [block(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps, param_dtype=cfg.param_dtype)

  # ---------------------------------------------------------------- internals

  def _masks(self, key_mask, query_slots, key_slots, prefix_len=None, dense=None):
    """(global, local) bool masks ``[b, q, k]``; ``dense`` overrides the global one."""
    cfg = self.config
    g = (attention_mask(key_mask, query_slots, key_slots, prefix_len)
         if dense is None else dense.astype(bool))
    if LOCAL not in cfg.layer_types:
      return g, g
    near = jnp.abs(query_slots[:, None] - key_slots[None, :]) < cfg.sliding_window
    return g, g & near[None]

  def blocks(self, x, positions, masks, cache, write_index):
    """Runs every layer -> (final-normed hidden ``[b, q, d]``, updated (k, v) or None)."""
    cfg = self.config
    x = x.astype(cfg.dtype)
    rope_g = rope_tables(positions, cfg.head_dim, cfg.rope_base_global, cfg.rope_scale_global)
    rope_l = (rope_tables(positions, cfg.head_dim, cfg.rope_base_local, cfg.rope_scale_local)
              if LOCAL in cfg.layer_types else rope_g)
    shared = (rope_g, rope_l, masks[0], masks[1], write_index)
    is_local = jnp.asarray([t == LOCAL for t in cfg.layer_types])
    if cfg.scan_layers:
      x, cache = self.layers(x, is_local, cache, shared)
    else:
      outs = []
      for i, block in enumerate(self.layers):
        layer_cache = None if cache is None else (cache[0][i], cache[1][i])
        x, layer_cache = block(x, is_local[i], layer_cache, shared)
        outs.append(layer_cache)
      if cache is not None:
        cache = (jnp.stack([c[0] for c in outs]), jnp.stack([c[1] for c in outs]))
    return self.final_norm(x), cache

  def head(self, h: jax.Array) -> jax.Array:
    """``h[..., d_model]`` (final-normed) -> fp32 logits ``[..., vocab]`` (tied table, soft-cap)."""
    logits = self.embedder.decode(h).astype(jnp.float32)
    return softcap(logits, self.config.final_logit_softcap)

  # ---------------------------------------------------------------- teacher forcing

  def embed(self, tokens: jax.Array) -> jax.Array:
    """``tokens[b, l]`` -> scaled embeddings ``[b, l, d_model]`` (before the seam)."""
    return self.embedder.encode(tokens)

  def decode_from_embeddings(self, x: jax.Array, mask: Optional[jax.Array] = None,
                             positions: Optional[jax.Array] = None,
                             prefix_len: Optional[jax.Array] = None,
                             attention: Optional[jax.Array] = None) -> jax.Array:
    """``x[b, L, d_model]`` -> logits ``[b, L, vocab]`` fp32.

    mask[b, L]: real tokens (default all); positions[b, L]: RoPE positions (default
    :func:`default_positions`); prefix_len[b]: prefix-LM (full attention over the first
    ``prefix_len`` slots, causal after); attention[b, L, L]: an explicit bool mask instead of
    causal / prefix (the sliding window is still applied on local layers).
    """
    b, length = x.shape[:2]
    mask = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
    positions = default_positions(mask) if positions is None else positions
    _check_shape('mask', mask, (b, length))
    _check_shape('positions', positions, (b, length))
    slots = jnp.arange(length)
    masks = self._masks(mask, slots, slots, prefix_len, attention)
    h, _ = self.blocks(x, positions, masks, None, None)
    return self.head(h)

  def __call__(self, tokens: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None, prefix_len: Optional[jax.Array] = None, *,
               input_embeddings: Optional[jax.Array] = None) -> jax.Array:
    """``tokens[b, L]`` (or ``input_embeddings[b, L, d]``, e.g. adapted) -> logits fp32."""
    if (tokens is None) == (input_embeddings is None):
      raise ValueError('Gemma: pass exactly one of tokens and input_embeddings')
    x = self.embed(tokens) if input_embeddings is None else input_embeddings
    return self.decode_from_embeddings(x, mask, positions, prefix_len)

  # ---------------------------------------------------------------- cached decoding

  def prefill(self, x: jax.Array, mask: Optional[jax.Array] = None,
              positions: Optional[jax.Array] = None, prefix_len: Optional[jax.Array] = None,
              max_len: Optional[int] = None, masks_fn: Optional[Callable] = None
              ) -> tuple[jax.Array, DecodeCache]:
    """Runs the prompt ``x[b, L, d]`` (left-padded: its last slot is real) into a new cache.

    Returns the logits ``[b, vocab]`` of the last slot and a :class:`DecodeCache` of
    ``max_len`` slots (default L; a Python int) with the prompt in slots ``[0, L)``.
    ``masks_fn(key_mask, query_slots, key_slots) -> (global, local)`` replaces this model's
    causal / prefix masks (PaliGemma's window rule).
    """
    cfg = self.config
    b, length = x.shape[:2]
    max_len = length if max_len is None else int(max_len)
    if max_len < length:
      raise ValueError(f'Gemma.prefill: max_len={max_len} is shorter than the prompt '
                       f'({length} slots); pass max_len >= prompt + new tokens')
    mask = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
    positions = default_positions(mask) if positions is None else positions
    _check_shape('mask', mask, (b, length))
    _check_shape('positions', positions, (b, length))
    key_mask = jnp.zeros((b, max_len), bool).at[:, :length].set(mask)
    shape = (cfg.num_layers, b, max_len, cfg.num_kv_heads, cfg.head_dim)
    empty = (jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
    if masks_fn is None:
      masks = self._masks(key_mask, jnp.arange(length), jnp.arange(max_len), prefix_len)
    else:
      masks = masks_fn(key_mask, jnp.arange(length), jnp.arange(max_len))
    h, (k, v) = self.blocks(x, positions, masks, empty, 0)
    next_position = jnp.max(jnp.where(mask, positions, -1), axis=1).astype(jnp.int32) + 1
    cache = DecodeCache(k, v, key_mask, jnp.asarray(length, jnp.int32), next_position)
    return self.head(h[:, -1]), cache

  def decode_step(self, token: jax.Array, cache: DecodeCache,
                  position: Optional[jax.Array] = None) -> tuple[jax.Array, DecodeCache]:
    """``token[b]`` at slot ``cache.index`` (RoPE ``position[b]``, default the cache's) ->
    (logits ``[b, vocab]`` fp32, the cache with the token's keys written)."""
    return self.decode_step_embedded(self.embed(token[:, None]), cache, position)

  def decode_step_embedded(self, x: jax.Array, cache: DecodeCache,
                           position: Optional[jax.Array] = None
                           ) -> tuple[jax.Array, DecodeCache]:
    """:meth:`decode_step` on an embedded token ``x[b, 1, d]`` (e.g. after an input adapter)."""
    logits, cache = self.extend_embedded(x, cache, position=position)
    return logits[:, 0], cache

  def extend_embedded(self, x: jax.Array, cache: DecodeCache, mask: Optional[jax.Array] = None,
                      position: Optional[jax.Array] = None) -> tuple[jax.Array, DecodeCache]:
    """``n`` embedded tokens ``x[b, n, d]`` at slots ``cache.index ...`` in one pass, causal
    among themselves -> (logits ``[b, n, vocab]`` fp32, the cache with their keys written).

    mask[b, n]: which of them are real (default all; padding is written but never attended);
    position[b]: RoPE position of the first (default the cache's), the rest follow it.
    """
    b, n = x.shape[:2]
    max_len = cache.key_mask.shape[1]
    if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + n > max_len:
      raise ValueError(f'Gemma: the cache is full ({max_len} slots, {n} more tokens asked '
                       f'at slot {int(cache.index)}); prefill with a larger max_len')
    mask = jnp.ones((b, n), bool) if mask is None else mask.astype(bool)
    _check_shape('mask', mask, (b, n))
    pos = cache.next_position if position is None else position.astype(jnp.int32)
    index = cache.index
    slots = index + jnp.arange(n)
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, index))
    masks = self._masks(key_mask, slots, jnp.arange(max_len))
    h, (k, v) = self.blocks(x, pos[:, None] + jnp.arange(n)[None], masks,
                             (cache.k, cache.v), index)
    return self.head(h), DecodeCache(k, v, key_mask, index + n, pos + n)


def _check_shape(name: str, value: jax.Array, want: tuple[int, ...]) -> None:
  if tuple(value.shape) != tuple(want):
    raise ValueError(f'Gemma: {name} must have shape {want} (like the tokens), got '
                     f'{tuple(value.shape)}')


# ------------------------------------------------------------------ helpers


def greedy_generate(model: Gemma, params: Any, tokens: jax.Array, mask: jax.Array,
                    max_new_tokens: int, max_len: Optional[int] = None) -> jax.Array:
  """Greedy continuation of left-padded prompts ``tokens[b, L]`` -> ``[b, max_new_tokens]``.

  No early stop: the caller cuts at ``eos_id``. ``max_len`` (cache slots) defaults to
  ``L + max_new_tokens - 1``, the fewest that hold every token fed back.
  """
  length = tokens.shape[1]
  need = length + max_new_tokens - 1
  max_len = need if max_len is None else max_len
  if max_new_tokens < 1 or max_len < need:
    raise ValueError(f'greedy_generate: max_new_tokens={max_new_tokens} must be >= 1 and '
                     f'max_len={max_len} >= prompt {length} + max_new_tokens - 1 = {need}')
  variables = {'params': params}

  @jax.jit
  def run(variables, tokens, mask):
    x = model.apply(variables, tokens, method=Gemma.embed)
    logits, cache = model.apply(variables, x, mask, max_len=max_len, method=Gemma.prefill)
    return greedy_steps(lambda token, c: model.apply(variables, token, c,
                                                    method=Gemma.decode_step),
                        logits, cache, max_new_tokens)

  return run(variables, tokens, mask)


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Token rows of different lengths -> tokens, mask ``[b, longest]``, padding on the left (the
  layout :func:`greedy_generate` and ``prefill`` expect)."""
  width = max(map(len, rows))
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
  return tokens, mask


def greedy_steps(decode_step, logits: jax.Array, cache: Any, max_new_tokens: int) -> jax.Array:
  """Argmax of the prefill ``logits`` [b, vocab], then ``max_new_tokens - 1`` cached steps
  ``decode_step(token, cache) -> (logits, cache)`` (a scan) -> tokens ``[b, max_new_tokens]``."""
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def step(carry, _):
    token, cache = carry
    logits, cache = decode_step(token, cache)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (nxt, cache), nxt

  _, rest = jax.lax.scan(step, (first, cache), None, length=max_new_tokens - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def param_shapes(config: GemmaConfig) -> Any:
  """The (unboxed) parameter tree of ``Gemma(config)`` as ``ShapeDtypeStruct``s (no allocation)."""
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  variables = jax.eval_shape(lambda t: Gemma(config).init(jax.random.key(0), t), tokens)
  return nn.unbox(variables['params'])


def param_count(config: GemmaConfig) -> int:
  """Number of parameters of a config, without allocating."""
  leaves = jax.tree_util.tree_leaves(param_shapes(config.replace(scan_layers=True)))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))
