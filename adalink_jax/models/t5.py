"""T5 encoder-decoder (T5 1.0, T5 1.1 / FLAN-T5, UL2-style shapes) with an embedding seam.

Forward pass: ``embed each modality -> input adapter (the seam) -> encoder -> decoder``.
AdaLink and prompt tuning are *input adapters*: modules that receive the
:class:`EncoderInputs` (embeddings, which positions are text / image, the task id)
and return new ones. The transformer blocks know nothing about them.

Parameter names follow t5x (``token_embedder/embedding``,
``encoder/layers_0/attention/query/kernel``, ``decoder/logits_dense/kernel`` ...)
so T5X checkpoints map one to one; with ``scan_layers`` the blocks are stacked
under ``encoder/layers`` with a leading ``layers`` axis.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax import partitioning
from adalink_jax.models import intrusive
from adalink_jax.models import layers
from adalink_jax.models.axes import param
from adalink_jax.models.seam import IMAGE, TEXT, EncoderInputs  # noqa: F401  (re-exported)

Dtype = Any
_NEG_INF = -1e10    # added to masked attention logits (fp32 softmax)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape and numerics of a T5 model. ``mlp_activations=('gelu','linear')`` is T5 1.1."""
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  d_kv: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  mlp_activations: tuple[str, ...] = ('gelu', 'linear')
  # T5 1.0 ties the LM head to the embedding and scales logits by d_model**-0.5.
  tie_embeddings: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32        # activations
  param_dtype: Dtype = jnp.float32  # stored weights
  scan_layers: bool = False
  # 'none' | 'full' (recompute whole block) | 'minimal' (save matmul outputs only).
  remat_policy: str = 'none'
  # Intrusive hooks ((site, hook) pairs, see models.intrusive); () means the blocks are exactly T5.
  hooks: intrusive.Hooks = ()
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0

  def replace(self, **kw) -> 'T5Config':
    return dataclasses.replace(self, **kw)


_V11 = dict(vocab_size=32128, mlp_activations=('gelu', 'linear'), tie_embeddings=False)
_V10 = dict(vocab_size=32128, mlp_activations=('relu',), tie_embeddings=True)

# Public shapes. t5_1_1_* and flan_t5_* are the same architecture (FLAN-T5 is T5 1.1 fine-tuned).
T5_SIZES: dict[str, dict[str, Any]] = {
    't5_1_1_tiny': dict(_V11, vocab_size=256, d_model=32, num_heads=4, d_kv=8, d_ff=64,
                        num_encoder_layers=2, num_decoder_layers=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16),
    't5_1_1_small': dict(_V11, d_model=512, num_heads=6, d_kv=64, d_ff=1024,
                         num_encoder_layers=8, num_decoder_layers=8),
    't5_1_1_base': dict(_V11, d_model=768, num_heads=12, d_kv=64, d_ff=2048,
                        num_encoder_layers=12, num_decoder_layers=12),
    't5_1_1_large': dict(_V11, d_model=1024, num_heads=16, d_kv=64, d_ff=2816,
                         num_encoder_layers=24, num_decoder_layers=24),
    't5_1_1_xl': dict(_V11, d_model=2048, num_heads=32, d_kv=64, d_ff=5120,
                      num_encoder_layers=24, num_decoder_layers=24),
    't5_1_1_xxl': dict(_V11, d_model=4096, num_heads=64, d_kv=64, d_ff=10240,
                       num_encoder_layers=24, num_decoder_layers=24),
    't5_tiny': dict(_V10, vocab_size=256, d_model=32, num_heads=4, d_kv=8, d_ff=64,
                    num_encoder_layers=2, num_decoder_layers=2,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16),
    't5_small': dict(_V10, d_model=512, num_heads=8, d_kv=64, d_ff=2048,
                     num_encoder_layers=6, num_decoder_layers=6),
    't5_base': dict(_V10, d_model=768, num_heads=12, d_kv=64, d_ff=3072,
                    num_encoder_layers=12, num_decoder_layers=12),
    't5_large': dict(_V10, d_model=1024, num_heads=16, d_kv=64, d_ff=4096,
                     num_encoder_layers=24, num_decoder_layers=24),
    # Encoder-decoders of the PaLI family (UL2-style, gated GELU, 250k multilingual vocab).
    # 'pali3_3b' follows the 3B encoder-decoder of PaLI-3; 'palix_32b' is a 32B-class shape
    # for shape-only use (PaLI-X's exact LM shape is not public): d_model 4096 gives the
    # paper's 1,048,576 AdaLink parameters at rank 64 on two modalities.
    'pali3_3b': dict(_V11, vocab_size=250112, d_model=2048, num_heads=32, d_kv=64, d_ff=5120,
                     num_encoder_layers=24, num_decoder_layers=24),
    'palix_32b': dict(_V11, vocab_size=250112, d_model=4096, num_heads=64, d_kv=128,
                      d_ff=24576, num_encoder_layers=32, num_decoder_layers=32),
}
for _s in ('small', 'base', 'large', 'xl', 'xxl'):
  T5_SIZES[f'flan_t5_{_s}'] = T5_SIZES[f't5_1_1_{_s}']


def t5_config(name: str, **overrides) -> T5Config:
  """Returns the named public shape (``t5_1_1_base``, ``flan_t5_xxl``, ``t5_small`` ...)."""
  if name not in T5_SIZES:
    raise ValueError(f'unknown T5 size {name!r}; known: {sorted(T5_SIZES)}')
  return T5Config(**{**T5_SIZES[name], **overrides})


# ------------------------------------------------------------------ position bias


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucketing of ``memory_pos - query_pos``: exact for small offsets, log-spaced beyond.

  Offsets at or beyond ``max_distance`` share the last bucket. Works on numpy or jax arrays.
  """
  xp = jnp if isinstance(relative_position, jax.Array) else np
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = (n < 0).astype(np.int32) * num_buckets
    n = xp.abs(n)
  else:
    n = xp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Guard log(0); the value is discarded by the `where` for small n anyway.
  n_safe = xp.maximum(n, 1).astype(np.float32)
  val_if_large = max_exact + (
      xp.log(n_safe / max_exact) / np.log(max_distance / max_exact) *
      (num_buckets - max_exact)).astype(np.int32)
  val_if_large = xp.minimum(val_if_large, num_buckets - 1)
  return ret + xp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
  """Learned per-head bias from bucketed relative positions, shared by a stack.

  ``[1, heads, q, k]`` from ``arange`` positions (``query_offset`` shifts the queries while
  decoding), or ``[b, heads, q, k]`` from explicit ``query_positions[b, q]`` and
  ``key_positions[b, k]`` (packed rows, where positions restart at each segment).
  """
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, qlen: int, klen: int, query_offset: Any = 0,
               query_positions: Optional[jax.Array] = None,
               key_positions: Optional[jax.Array] = None) -> jax.Array:
    rel_embedding = param(self, 'rel_embedding', nn.initializers.normal(0.02),
                          (self.num_heads, self.num_buckets), self.param_dtype,
                          ('heads', 'relpos_buckets'))
    if query_positions is not None:
      relative = (key_positions.astype(jnp.int32)[:, None, :] -
                  query_positions.astype(jnp.int32)[:, :, None])
      buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                         self.max_distance)
      # A gather, not the one-hot below: a [b, q, k, buckets] one-hot would be `buckets`
      # times the size of the attention logits.
      bias = jnp.take(rel_embedding.astype(self.dtype), buckets, axis=1)  # [h, b, q, k]
      return jnp.transpose(bias, (1, 0, 2, 3))
    if isinstance(query_offset, int):
      # Static positions: the buckets are a numpy constant and the bias one gather. The one-hot
      # contraction below builds a [q, k, buckets] array at every step (~1% of a T5-base step
      # at 512 tokens); a gather along the unsharded bucket axis is sharding-friendly too.
      buckets = relative_position_bucket(
          np.arange(klen, dtype=np.int32)[None, :] -
          (np.arange(qlen, dtype=np.int32)[:, None] + query_offset),
          self.bidirectional, self.num_buckets, self.max_distance)
      return jnp.take(rel_embedding.astype(self.dtype), buckets, axis=1)[None]
    context = jnp.arange(qlen, dtype=jnp.int32)[:, None] + query_offset
    memory = jnp.arange(klen, dtype=jnp.int32)[None, :]
    buckets = relative_position_bucket(memory - context, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    # Traced offset (decoding): a one-hot contraction keeps this sharding-friendly.
    onehot = jax.nn.one_hot(buckets, self.num_buckets, dtype=self.dtype)
    bias = jnp.einsum('hn,qkn->hqk', rel_embedding.astype(self.dtype), onehot)
    return bias[None]


# ------------------------------------------------------------------ attention


class MultiHeadAttention(nn.Module):
  """T5 attention (no 1/sqrt(d) logit scaling: it is folded into the query init).

  ``x_q[b, q, embed], x_kv[b, k, embed], bias[b|1, heads, q, k] -> [b, q, embed]``.
  In decode mode self-attention keys/values go to the ``cache`` collection as
  ``[b, max_len, heads, kv]`` and ``decode_index`` is the step being written; with
  ``cache_cross`` (cross-attention) the projected encoder keys/values are cached once.
  ``hooks``: the model's hook table; sites 'query', 'key', 'value', 'out' are used here.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  hooks: intrusive.Hooks = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array, bias: jax.Array, *,
               deterministic: bool = True, decode: bool = False,
               decode_index: Optional[jax.Array] = None, cache_cross: bool = False
               ) -> jax.Array:
    h, d = self.num_heads, self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q_init = nn.initializers.variance_scaling(1.0 / d, 'fan_in', 'normal')
    proj = lambda name, x, init=layers.default_kernel_init: layers.Dense(
        h * d, ('embed', 'joined_kv'), kernel_init=init, hooks=intrusive.at(self.hooks, name),
        name=name, **kw)(x).reshape(x.shape[:-1] + (h, d))
    q = proj('query', x_q, q_init)
    if decode and cache_cross:
      # Cross-attention while decoding: keys/values of the encoded prefix are projected once,
      # when the cache is created, and reused at every step.
      k_var = self.variable('cache', 'cross_key', lambda: proj('key', x_kv))
      v_var = self.variable('cache', 'cross_value', lambda: proj('value', x_kv))
      k, v = k_var.value, v_var.value
    else:
      k = proj('key', x_kv)
      v = proj('value', x_kv)

    if decode and not cache_cross:
      is_initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
      if is_initialized:
        # One new position per call: write it, then attend over the whole cache;
        # the caller's bias masks positions beyond decode_index.
        start = (0, decode_index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, start)
        k, v = cached_key.value, cached_value.value

    dropout = None
    if self.dropout_rate and not deterministic:
      dropout = lambda w: nn.Dropout(self.dropout_rate)(w, deterministic=False)
    out = layers.dot_product_attention(q, k, v, bias, self.dtype, dropout)
    out = out.reshape(x_q.shape[:-1] + (h * d,))
    return layers.Dense(x_q.shape[-1], ('joined_kv', 'embed'),
                        hooks=intrusive.at(self.hooks, 'out'), name='out', **kw)(out)


def mask_bias(query_mask: Optional[jax.Array], key_mask: jax.Array) -> jax.Array:
  """Boolean masks ``[b, q]``, ``[b, k]`` -> additive bias ``[b, 1, q|1, k]`` (0 or -1e10)."""
  allowed = key_mask[:, None, None, :]
  if query_mask is not None:
    allowed = allowed & query_mask[:, None, :, None]
  return jnp.where(allowed, 0.0, _NEG_INF).astype(jnp.float32)


def segment_bias(query_segment_ids: jax.Array, key_segment_ids: jax.Array,
                 key_mask: jax.Array, causal: bool = False) -> jax.Array:
  """Packed rows: ``[b, q]``, ``[b, k]`` segment ids and ``key_mask[b, k]`` -> ``[b, 1, q, k]``.

  A query sees a key iff both carry the same segment id, the key is real (``key_mask``) and,
  with ``causal``, the key is not after the query (by index in the row, as in t5x).
  """
  allowed = query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
  allowed = allowed & key_mask[:, None, :]
  if causal:
    q, k = query_segment_ids.shape[1], key_segment_ids.shape[1]
    allowed = allowed & (jnp.arange(k)[None, :] <= jnp.arange(q)[:, None])[None]
  return jnp.where(allowed[:, None], 0.0, _NEG_INF).astype(jnp.float32)


def causal_bias(qlen: int, klen: int, query_offset: Any = 0) -> jax.Array:
  """``[1, 1, q, k]`` additive bias that hides keys after each query position."""
  q = jnp.arange(qlen)[:, None] + query_offset
  k = jnp.arange(klen)[None, :]
  return jnp.where(k <= q, 0.0, _NEG_INF).astype(jnp.float32)[None, None]


# ------------------------------------------------------------------ blocks


def constrain_activations(x: jax.Array) -> jax.Array:
  """Keeps ``[batch, length, embed]`` activations split over the batch mesh axes.

  Without it XLA may propagate the FSDP sharding of the weights into the activations and
  replicate the batch on every device (for the PaLI-X shape on 256 devices: 46 GiB per device
  instead of 7.5). A no-op outside a mesh context (single-device use, tests).
  """
  return nn.with_logical_constraint(
      x, ('activation_batch', 'activation_length', 'activation_embed'),
      rules=partitioning.LOGICAL_AXIS_RULES)


def _sublayer_kwargs(cfg: T5Config) -> dict[str, Any]:
  return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention + MLP. ``x[b, l, d], bias[b, h, l, l] -> [b, l, d]``."""
  config: T5Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array):
    cfg = self.config
    x = constrain_activations(x)
    kw = _sublayer_kwargs(cfg)
    drop = lambda y: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=self.deterministic)
    adapter = functools.partial(_maybe_bottleneck, cfg)

    y = layers.RMSNorm(cfg.layer_norm_epsilon, name='pre_attention_layer_norm', **kw)(x)
    y = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, cfg.hooks,
                           name='attention', **kw)(y, y, bias, deterministic=self.deterministic)
    x = x + drop(adapter('attention', y))
    y = layers.RMSNorm(cfg.layer_norm_epsilon, name='pre_mlp_layer_norm', **kw)(x)
    y = _mlp(cfg, y, self.deterministic)
    x = x + drop(adapter('mlp', y))
    return x, None  # (carry, output) so the same block serves nn.scan


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention and MLP."""
  config: T5Config
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, y: jax.Array, encoded: jax.Array, self_bias: jax.Array,
               cross_bias: jax.Array, decode_index: Optional[jax.Array]):
    cfg = self.config
    y = constrain_activations(y)
    kw = _sublayer_kwargs(cfg)
    drop = lambda z: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        z, deterministic=self.deterministic)
    adapter = functools.partial(_maybe_bottleneck, cfg)

    z = layers.RMSNorm(cfg.layer_norm_epsilon, name='pre_self_attention_layer_norm', **kw)(y)
    z = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, cfg.hooks,
                           name='self_attention', **kw)(
                               z, z, self_bias, deterministic=self.deterministic,
                               decode=self.decode, decode_index=decode_index)
    y = y + drop(adapter('attention', z))
    z = layers.RMSNorm(cfg.layer_norm_epsilon, name='pre_cross_attention_layer_norm', **kw)(y)
    z = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, cfg.hooks,
                           name='encoder_decoder_attention', **kw)(
                               z, encoded, cross_bias, deterministic=self.deterministic,
                               decode=self.decode, cache_cross=True)
    y = y + drop(z)
    z = layers.RMSNorm(cfg.layer_norm_epsilon, name='pre_mlp_layer_norm', **kw)(y)
    z = _mlp(cfg, z, self.deterministic)
    y = y + drop(adapter('mlp', z))
    return y, None


def _mlp(cfg: T5Config, x: jax.Array, deterministic: bool) -> jax.Array:
  hooks = intrusive.at(cfg.hooks, 'wi', 'mlp_hidden', 'wo')
  return layers.MlpBlock(cfg.d_ff, cfg.mlp_activations, cfg.dropout_rate, hooks=hooks,
                         name='mlp', **_sublayer_kwargs(cfg))(x, deterministic=deterministic)


def _maybe_bottleneck(cfg: T5Config, where: str, y: jax.Array) -> jax.Array:
  """The hooks at site ``<where>_out`` (e.g. a bottleneck adapter) on a sub-block's output."""
  return intrusive.apply(cfg.hooks, f'{where}_out', y, axes=('embed',), **_sublayer_kwargs(cfg))


_REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in the backward pass
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stack(block_cls, cfg: T5Config, num_layers: int, static_argnums: tuple[int, ...]):
  """Wraps a block class with remat and/or scan as the config asks."""
  if cfg.remat_policy != 'none':
    if cfg.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f'remat_policy {cfg.remat_policy!r}; choose none, '
                       f'{", ".join(_REMAT_POLICIES)}')
    block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                         prevent_cse=not cfg.scan_layers, static_argnums=static_argnums)
  if cfg.scan_layers:
    block_cls = nn.scan(block_cls, variable_axes={'params': 0, 'cache': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=nn.broadcast, length=num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
  return block_cls


class Encoder(nn.Module):
  """``embeddings[b, l, d], mask[b, l] -> encoded[b, l, d]`` (bidirectional relative bias).

  Packed rows: ``segment_ids[b, l]`` restricts attention to keys of the query's segment;
  ``positions[b, l]`` (restarting at 0 in each segment) drive the relative bias.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True,
               segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    kw = _sublayer_kwargs(cfg)
    length = x.shape[1]
    rel = RelativePositionBias(cfg.relative_attention_num_buckets,
                               cfg.relative_attention_max_distance, cfg.num_heads, True,
                               name='relpos_bias', **kw)(length, length,
                                                         query_positions=positions,
                                                         key_positions=positions)
    if segment_ids is None:
      bias = rel + mask_bias(None, mask)
    else:
      bias = rel + segment_bias(segment_ids, segment_ids, mask)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    block = _stack(EncoderLayer, cfg, cfg.num_encoder_layers, static_argnums=())
    if cfg.scan_layers:
      x, _ = block(cfg, deterministic, name='layers')(x, bias)
    else:
      for i in range(cfg.num_encoder_layers):
        x, _ = block(cfg, deterministic, name=f'layers_{i}')(x, bias)
    x = layers.RMSNorm(cfg.layer_norm_epsilon, name='encoder_norm', **kw)(x)
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class Decoder(nn.Module):
  """``y_emb[b, t, d], encoded[b, l, d] -> logits[b, t, vocab]`` with causal relative bias.

  In decode mode ``y_emb`` holds one position and a ``cache/decode_index`` counter
  says which; call it once with full-length inputs to create the cache.

  Packed rows (teacher forcing only): ``segment_ids[b, t]`` with ``encoder_segment_ids[b, l]``
  keep self-attention causal within a segment and cross-attention on the same segment;
  ``positions[b, t]`` drive the relative bias. Decode mode does not use them.
  """
  config: T5Config
  shared_embedding: Optional[layers.Embed] = None

  @nn.compact
  def __call__(self, y: jax.Array, encoded: jax.Array, encoder_mask: jax.Array,
               deterministic: bool = True, decode: bool = False,
               segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               encoder_segment_ids: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    if decode:  # one position at a time over a cache: packing does not apply
      segment_ids = positions = encoder_segment_ids = None
    kw = _sublayer_kwargs(cfg)
    qlen = y.shape[1]
    decode_index = None
    if decode:
      initialized = self.has_variable('cache', 'decode_index')
      index_var = self.variable('cache', 'decode_index', lambda: jnp.zeros((), jnp.int32))
      if initialized:
        decode_index = index_var.value
        index_var.value = decode_index + 1
        klen = self.get_variable('cache', 'max_length_marker').shape[0]
      else:
        self.variable('cache', 'max_length_marker', jnp.zeros, (qlen,), jnp.int8)
        klen = qlen
    else:
      klen = qlen
    offset = 0 if decode_index is None else decode_index
    rel = RelativePositionBias(cfg.relative_attention_num_buckets,
                               cfg.relative_attention_max_distance, cfg.num_heads, False,
                               name='relpos_bias', **kw)(qlen, klen, offset,
                                                         query_positions=positions,
                                                         key_positions=positions)
    if segment_ids is None:
      self_bias = rel + causal_bias(qlen, klen, offset)
      cross_bias = mask_bias(None, encoder_mask)
    else:
      self_bias = rel + segment_bias(segment_ids, segment_ids, segment_ids > 0, causal=True)
      cross_bias = segment_bias(segment_ids, encoder_segment_ids, encoder_mask)

    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    block = _stack(DecoderLayer, cfg, cfg.num_decoder_layers, static_argnums=())
    if cfg.scan_layers:
      y, _ = block(cfg, deterministic, decode, name='layers')(
          y, encoded, self_bias, cross_bias, decode_index)
    else:
      for i in range(cfg.num_decoder_layers):
        y, _ = block(cfg, deterministic, decode, name=f'layers_{i}')(
            y, encoded, self_bias, cross_bias, decode_index)
    y = layers.RMSNorm(cfg.layer_norm_epsilon, name='decoder_norm', **kw)(y)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    if cfg.tie_embeddings:
      # T5 1.0: reuse the input embedding and rescale, as Mesh TF / HF do.
      return self.shared_embedding.attend(y * (cfg.d_model ** -0.5))
    return layers.Dense(cfg.vocab_size, ('embed', 'vocab'), name='logits_dense', **kw)(y)


# ------------------------------------------------------------------ the model


class T5(nn.Module):
  """Encoder-decoder with the AdaLink seam between the embedders and the encoder.

  encoder_input_adapter: module called as ``adapter(EncoderInputs) -> EncoderInputs`` on the
    encoder inputs (text and, for PaLI-style models, image tokens). Where AdaLink and prompt
    tuning plug in.
  decoder_input_adapter: same on the decoder token embeddings (modality all TEXT).
  """
  config: T5Config
  encoder_input_adapter: Optional[nn.Module] = None
  decoder_input_adapter: Optional[nn.Module] = None

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

  def embed_inputs(self, text_tokens: jax.Array, image_embeddings: Optional[jax.Array] = None,
                   task_id: Optional[jax.Array] = None, *,
                   segment_ids: Optional[jax.Array] = None) -> EncoderInputs:
    """Embeds each modality and lays them out as ``[image; text]`` (before the seam).

    With packed ``segment_ids[b, l]`` (text only) the mask is ``segment_ids > 0``.
    """
    x = self.token_embedder(text_tokens)
    mask = text_tokens != self.config.pad_id if segment_ids is None else segment_ids > 0
    modality = jnp.full(text_tokens.shape, TEXT, jnp.int32)
    if image_embeddings is not None:
      b, n = image_embeddings.shape[:2]
      x = jnp.concatenate([image_embeddings.astype(x.dtype), x], axis=1)
      mask = jnp.concatenate([jnp.ones((b, n), bool), mask], axis=1)
      modality = jnp.concatenate([jnp.full((b, n), IMAGE, jnp.int32), modality], axis=1)
    return EncoderInputs(x, mask, modality, task_id)

  def encode(self, text_tokens: jax.Array, image_embeddings: Optional[jax.Array] = None,
             task_id: Optional[jax.Array] = None, deterministic: bool = True, *,
             encoder_segment_ids: Optional[jax.Array] = None,
             encoder_positions: Optional[jax.Array] = None
             ) -> tuple[jax.Array, jax.Array]:
    """``text_tokens[b, l]`` (+ ``image_embeddings[b, n, d]``) -> (encoded, encoder_mask).

    Packed (seqio ``pack=True``, text only): ``encoder_segment_ids[b, l]`` (0 = padding) and
    ``encoder_positions[b, l]`` keep the examples sharing a row from seeing each other.
    """
    _check_packed('encoder_segment_ids', encoder_segment_ids, text_tokens)
    _check_packed('encoder_positions', encoder_positions, text_tokens)
    packed = encoder_segment_ids is not None or encoder_positions is not None
    if packed and image_embeddings is not None:
      raise ValueError('encoder_segment_ids / encoder_positions (packed rows) are for '
                       'text-only batches; got image_embeddings as well')
    inputs = self.embed_inputs(text_tokens, image_embeddings, task_id,
                               segment_ids=encoder_segment_ids)
    if self.encoder_input_adapter is not None:
      inputs = self.encoder_input_adapter(inputs)
    if packed and inputs.mask.shape != text_tokens.shape:
      raise ValueError(
          f'the encoder input adapter changed the encoder length {text_tokens.shape} -> '
          f'{inputs.mask.shape} (e.g. prompt tuning); packed rows would need the prompt once '
          'per segment, which is not supported: train it without packing')
    encoded = self.encoder(inputs.embeddings, inputs.mask, deterministic,
                           segment_ids=encoder_segment_ids, positions=encoder_positions)
    return encoded, inputs.mask

  def decode(self, encoded: jax.Array, encoder_mask: jax.Array, decoder_input_tokens: jax.Array,
             task_id: Optional[jax.Array] = None, deterministic: bool = True,
             decode: bool = False, *, encoder_segment_ids: Optional[jax.Array] = None,
             decoder_segment_ids: Optional[jax.Array] = None,
             decoder_positions: Optional[jax.Array] = None) -> jax.Array:
    """``decoder_input_tokens[b, t]`` -> logits ``[b, t, vocab]`` (fp32).

    Packed teacher forcing: ``decoder_segment_ids[b, t]`` with ``encoder_segment_ids[b, l]``
    (cross-attention only to the same segment) and ``decoder_positions[b, t]``.
    ``decode=True`` (KV-cache decoding, one example per row) ignores all three.
    """
    if not decode:
      _check_packed('decoder_segment_ids', decoder_segment_ids, decoder_input_tokens)
      _check_packed('decoder_positions', decoder_positions, decoder_input_tokens)
      _check_packed('encoder_segment_ids', encoder_segment_ids, encoder_mask)
      if (decoder_segment_ids is None) != (encoder_segment_ids is None):
        raise ValueError('packed decoding needs both decoder_segment_ids and '
                         'encoder_segment_ids (cross-attention matches them); got only '
                         + ('decoder_segment_ids' if encoder_segment_ids is None
                            else 'encoder_segment_ids'))
    y = self.token_embedder(decoder_input_tokens)
    if self.decoder_input_adapter is not None:
      # Token-based mask even when packed: each segment starts with the start token (= pad id),
      # exactly as the same example does alone.
      y = self.decoder_input_adapter(EncoderInputs(
          y, decoder_input_tokens != self.config.pad_id,
          jnp.full(decoder_input_tokens.shape, TEXT, jnp.int32), task_id)).embeddings
    logits = self.decoder(y, encoded, encoder_mask, deterministic=deterministic, decode=decode,
                          segment_ids=decoder_segment_ids, positions=decoder_positions,
                          encoder_segment_ids=encoder_segment_ids)
    return logits.astype(jnp.float32)

  def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array,
               image_embeddings: Optional[jax.Array] = None,
               task_id: Optional[jax.Array] = None, deterministic: bool = True, *,
               encoder_segment_ids: Optional[jax.Array] = None,
               encoder_positions: Optional[jax.Array] = None,
               decoder_segment_ids: Optional[jax.Array] = None,
               decoder_positions: Optional[jax.Array] = None) -> jax.Array:
    """Teacher-forced logits ``[b, t, vocab]``.

    Packed batches (seqio ``pack=True``): pass the four ``*_segment_ids`` / ``*_positions``
    ``[b, l|t]`` int arrays of the batch; each packed example then gets the logits it gets alone.
    """
    encoded, mask = self.encode(encoder_input_tokens, image_embeddings, task_id, deterministic,
                                encoder_segment_ids=encoder_segment_ids,
                                encoder_positions=encoder_positions)
    return self.decode(encoded, mask, decoder_input_tokens, task_id, deterministic,
                       encoder_segment_ids=encoder_segment_ids,
                       decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions)


def _check_packed(name: str, value: Optional[jax.Array], like: jax.Array) -> None:
  """Segment ids / positions must be integer ``[b, l]`` like the tokens they describe."""
  if value is None:
    return
  if value.shape != like.shape[:2] or not jnp.issubdtype(value.dtype, jnp.integer):
    raise ValueError(f'{name} must be an integer array of shape {tuple(like.shape[:2])} '
                     f'(like the tokens), got {value.dtype}{list(value.shape)}')


def shift_right(targets: jax.Array, start_id: int = 0) -> jax.Array:
  """Decoder inputs from targets: ``[t0, t1, ...] -> [start, t0, ...]``."""
  shifted = jnp.roll(targets, 1, axis=-1)
  return shifted.at[..., 0].set(start_id)
