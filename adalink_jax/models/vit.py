"""Vision Transformer in the big_vision / SigLIP style (the image encoder of PaLI models).

``images[b, H, W, C] in [-1, 1] -> patch conv -> + position embedding -> pre-LN blocks
-> final LayerNorm -> pooling``. Pooling ``'none'`` returns every token (what PaLI
feeds to its language model); ``'gap'``, ``'map'`` and ``'tok'`` return one vector.

Parameter names and layouts follow big_vision so its npz checkpoints map leaf for
leaf: ``embedding/{kernel [p, p, c, w], bias}``, ``pos_embedding [1, n, w]``, ``cls``,
``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,
key,value}/{kernel [w, heads, head_dim], bias [heads, head_dim]}, .../out/{kernel
[heads, head_dim, w], bias}, LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}``,
``Transformer/encoder_norm``, ``MAPHead_0/{probe, MultiHeadDotProductAttention_0,
LayerNorm_0, MlpBlock_0}``. With ``scan_layers`` the blocks are stacked under
``Transformer/encoderblock`` with a leading ``layers`` axis (big_vision's scan layout).

Numerics follow big_vision: LayerNorm epsilon 1e-6, attention logits scaled by
``head_dim ** -0.5``, and the MLP activation is flax's default ``nn.gelu``, i.e. the
*tanh approximation* (``'gelu'`` here, HF's ``gelu_pytorch_tanh``); ``'gelu_exact'``
is available for models trained with the erf form.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax.models import layers
from adalink_jax.models.axes import param

Dtype = Any
POOL_TYPES = ('none', 'gap', 'map', 'tok')
POSEMB_TYPES = ('learn', 'sincos2d')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape and numerics of a ViT. ``image_size`` fixes the learned position-embedding grid."""
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  patch_size: tuple[int, int] = (16, 16)
  image_size: tuple[int, int] = (224, 224)
  num_channels: int = 3
  posemb: str = 'learn'          # 'learn' | 'sincos2d'
  pool_type: str = 'none'        # 'none' | 'gap' | 'map' | 'tok'
  mlp_activation: str = 'gelu'   # big_vision: flax nn.gelu = tanh approximation
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat_policy: str = 'none'     # 'none' | 'full' | 'minimal'

  def __post_init__(self):
    # Accept ints for square sizes; store tuples so the config stays hashable.
    for f in ('patch_size', 'image_size'):
      v = getattr(self, f)
      object.__setattr__(self, f, (int(v), int(v)) if np.isscalar(v) else tuple(int(i) for i in v))
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f'ViTConfig.posemb={self.posemb!r}; choose from {POSEMB_TYPES}')
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f'ViTConfig.pool_type={self.pool_type!r}; choose from {POOL_TYPES}')
    if self.width % self.num_heads:
      raise ValueError(f'ViTConfig.width={self.width} is not divisible by '
                       f'num_heads={self.num_heads}')
    for hw, p, side in zip(self.image_size, self.patch_size, ('height', 'width')):
      if hw % p:
        raise ValueError(f'ViTConfig.image_size {side} {hw} is not a multiple of '
                         f'patch_size {p}')

  @property
  def grid(self) -> tuple[int, int]:
    """Patch grid ``(h, w)`` for ``image_size``."""
    return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def replace(self, **kw) -> 'ViTConfig':
    return dataclasses.replace(self, **kw)


# Public shapes (big_vision decode_variant; Table 2 of arXiv:2106.04560; SigLIP So400m;
# ViT-22B from arXiv:2302.05442). ViT-22B is shape-only here: the real model uses parallel
# blocks, QK-norm and bias-free QKV, so our sequential block counts ~0.1% more parameters.
VIT_SIZES: dict[str, dict[str, int]] = {
    'tiny': dict(width=32, depth=2, mlp_dim=64, num_heads=4),
    'Ti': dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    'S': dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    'B': dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    'L': dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    'So400m': dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    'g': dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    '22B': dict(width=6144, depth=48, mlp_dim=24576, num_heads=48),
}
_TINY_DEFAULTS = dict(patch_size=(4, 4), image_size=(16, 16))


def vit_config(name: str, **overrides) -> ViTConfig:
  """``'B/16'``, ``'So400m/14'``, ``'22B/14'``, ``'tiny'`` (4x4 patches, 16x16 images) ...

  The part after ``/`` is the patch size; ``image_size`` and any other field can be
  overridden, e.g. ``vit_config('So400m/14', image_size=224, pool_type='map')``.
  """
  m = re.fullmatch(r'([A-Za-z0-9]+)(?:/(\d+))?', name)
  if m is None or m.group(1) not in VIT_SIZES:
    raise ValueError(f'unknown ViT variant {name!r}; use <size>[/<patch>] with size in '
                     f'{sorted(VIT_SIZES)}, e.g. "B/16"')
  size, patch = m.groups()
  kw: dict[str, Any] = dict(VIT_SIZES[size])
  if size == 'tiny':
    kw.update(_TINY_DEFAULTS)
  if patch is not None:
    kw['patch_size'] = (int(patch), int(patch))
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)}
  if unknown:
    raise ValueError(f'unknown ViTConfig fields {sorted(unknown)}')
  return ViTConfig(**{**kw, **overrides})


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype: Dtype = jnp.float32) -> jax.Array:
  """Fixed 2-D sin-cos position embedding ``[1, h*w, width]`` (MoCo v3 / big_vision).

  Rows are positions in row-major ``(y, x)`` order; channels are
  ``[sin(x*omega), cos(x*omega), sin(y*omega), cos(y*omega)]`` with
  ``omega_k = temperature ** -(k / (width/4 - 1))``.
  """
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs width % 4 == 0, got width={width}')
  quarter = width // 4
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  ang_y = y.reshape(-1)[:, None] * omega[None, :]
  ang_x = x.reshape(-1)[:, None] * omega[None, :]
  pe = np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


def _flat_init(init, n_in: int):
  """Initialises an N-D kernel as the 2-D ``[prod(in), prod(out)]`` matrix, as DenseGeneral does."""
  def wrapped(key, shape, dtype=jnp.float32):
    flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
    return init(key, flat, dtype).reshape(shape)
  return wrapped


_xavier = nn.initializers.xavier_uniform()


class PatchEmbed(nn.Module):
  """Non-overlapping patch convolution: ``[b, H, W, c] -> [b, H/p, W/p, width]``.

  Kernel ``[p, p, c, width]`` (HWIO, like flax ``nn.Conv``) plus a bias.
  """
  width: int
  patch_size: tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    ph, pw = self.patch_size
    c = images.shape[-1]
    kernel = param(self, 'kernel', nn.initializers.lecun_normal(), (ph, pw, c, self.width),
                   self.param_dtype, ('patch', 'patch', 'channels', 'embed'))
    bias = param(self, 'bias', nn.initializers.zeros, (self.width,), self.param_dtype,
                 ('embed',))
    y = jax.lax.conv_general_dilated(
        images.astype(self.dtype), kernel.astype(self.dtype), window_strides=(ph, pw),
        padding='VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias.astype(self.dtype)


class _HeadsDense(nn.Module):
  """``[..., width] -> [..., heads, head_dim]`` with kernel ``[width, heads, head_dim]`` + bias."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = param(self, 'kernel', _flat_init(_xavier, 1),
                   (x.shape[-1], self.num_heads, self.head_dim), self.param_dtype,
                   ('embed', 'heads', 'kv'))
    bias = param(self, 'bias', nn.initializers.zeros, (self.num_heads, self.head_dim),
                 self.param_dtype, ('heads', 'kv'))
    y = jnp.einsum('...d,dhk->...hk', x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class _OutDense(nn.Module):
  """``[..., heads, head_dim] -> [..., width]`` with kernel ``[heads, head_dim, width]`` + bias."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, k = x.shape[-2:]
    kernel = param(self, 'kernel', _flat_init(_xavier, 2), (h, k, self.features),
                   self.param_dtype, ('heads', 'kv', 'embed'))
    bias = param(self, 'bias', nn.initializers.zeros, (self.features,), self.param_dtype,
                 ('embed',))
    y = jnp.einsum('...hk,hkd->...d', x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class MultiHeadDotProductAttention(nn.Module):
  """Unmasked multi-head attention with biases: ``x_q[b, q, w], x_kv[b, k, w] -> [b, q, w]``.

  Logits are ``q . k / sqrt(head_dim)`` and the softmax runs in fp32.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array, deterministic: bool = True) -> jax.Array:
    width = x_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'attention width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = _HeadsDense(self.num_heads, head_dim, name='query', **kw)(x_q)
    k = _HeadsDense(self.num_heads, head_dim, name='key', **kw)(x_kv)
    v = _HeadsDense(self.num_heads, head_dim, name='value', **kw)(x_kv)
    q = q * jnp.asarray(head_dim ** -0.5, self.dtype)
    dropout = None
    if self.dropout_rate and not deterministic:
      dropout = lambda w: nn.Dropout(self.dropout_rate)(w, deterministic=False)
    out = layers.dot_product_attention(q, k, v, None, self.dtype, dropout)
    return _OutDense(width, name='out', **kw)(out)


class MlpBlock(nn.Module):
  """``Dense_1(act(Dense_0(x)))`` with biases: ``[..., w] -> [..., mlp] -> [..., w]``."""
  mlp_dim: int
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    kw = dict(use_bias=True, kernel_init=_xavier, dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.Dense(self.mlp_dim, ('embed', 'mlp'), name='Dense_0', **kw)(x)
    h = layers.activation(self.activation)(h)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return layers.Dense(x.shape[-1], ('mlp', 'embed'), name='Dense_1', **kw)(h)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``. ``[b, l, w] -> [b, l, w]``."""
  config: ViTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    y = layers.LayerNorm(cfg.layer_norm_epsilon, name='LayerNorm_0', **kw)(x)
    y = MultiHeadDotProductAttention(cfg.num_heads, cfg.dropout_rate,
                                     name='MultiHeadDotProductAttention_0', **kw)(
                                         y, y, self.deterministic)
    x = x + drop(y)
    y = layers.LayerNorm(cfg.layer_norm_epsilon, name='LayerNorm_1', **kw)(x)
    y = MlpBlock(cfg.mlp_dim, cfg.mlp_activation, cfg.dropout_rate, name='MlpBlock_0',
                 **kw)(y, self.deterministic)
    x = x + drop(y)
    return x, None  # (carry, output) so the same block serves nn.scan


_REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in the backward pass
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stack(cfg: ViTConfig):
  """The block class wrapped with remat and/or scan as the config asks."""
  block = Encoder1DBlock
  if cfg.remat_policy != 'none':
    if cfg.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f'ViTConfig.remat_policy={cfg.remat_policy!r}; choose none, '
                       f'{", ".join(_REMAT_POLICIES)}')
    block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy],
                     prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    block = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True,
                                                                    'dropout': True},
                    length=cfg.depth, metadata_params={nn.PARTITION_NAME: 'layers'})
  return block


class Encoder(nn.Module):
  """``depth`` blocks then ``encoder_norm``: ``[b, l, w] -> [b, l, w]``."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    block = _stack(cfg)
    if cfg.scan_layers:
      x, _ = block(cfg, deterministic, name='encoderblock')(x)
    else:
      for i in range(cfg.depth):
        x, _ = block(cfg, deterministic, name=f'encoderblock_{i}')(x)
    return layers.LayerNorm(cfg.layer_norm_epsilon, name='encoder_norm', dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype)(x)


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends over tokens. ``[b, l, w] -> [b, w]``."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    probe = param(self, 'probe', _xavier, (1, 1, x.shape[-1]), cfg.param_dtype,
                  (None, None, 'embed'))
    probe = jnp.tile(probe.astype(cfg.dtype), (x.shape[0], 1, 1))
    x = MultiHeadDotProductAttention(cfg.num_heads, name='MultiHeadDotProductAttention_0',
                                     **kw)(probe, x)
    y = layers.LayerNorm(cfg.layer_norm_epsilon, name='LayerNorm_0', **kw)(x)
    x = x + MlpBlock(cfg.mlp_dim, cfg.mlp_activation, name='MlpBlock_0', **kw)(y)
    return x[:, 0]


class ViT(nn.Module):
  """Image encoder. ``images[b, H, W, C]`` (values in [-1, 1]) ->

  ``[b, n_patches, width]`` for ``pool_type='none'``, else ``[b, width]``.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    if images.ndim != 4 or tuple(images.shape[1:]) != (*cfg.image_size, cfg.num_channels):
      raise ValueError(f'ViT expects images [batch, {cfg.image_size[0]}, {cfg.image_size[1]}, '
                       f'{cfg.num_channels}] (ViTConfig.image_size / num_channels), got '
                       f'{tuple(images.shape)}')
    x = PatchEmbed(cfg.width, cfg.patch_size, cfg.dtype, cfg.param_dtype, name='embedding')(images)
    b, gh, gw, c = x.shape
    x = x.reshape(b, gh * gw, c)
    if cfg.posemb == 'learn':
      pos = param(self, 'pos_embedding', nn.initializers.normal(stddev=1 / np.sqrt(c)),
                  (1, gh * gw, c), cfg.param_dtype, (None, 'pos', 'embed'))
    else:
      pos = posemb_sincos_2d(gh, gw, c)
    # Position embedding goes on the patches only, before the optional [cls] token.
    x = x + pos.astype(cfg.dtype)
    if cfg.pool_type == 'tok':
      cls = param(self, 'cls', nn.initializers.zeros, (1, 1, c), cfg.param_dtype,
                  (None, None, 'embed'))
      x = jnp.concatenate([jnp.tile(cls.astype(cfg.dtype), (b, 1, 1)), x], axis=1)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = Encoder(cfg, name='Transformer')(x, deterministic)

    if cfg.pool_type == 'none':
      return x
    if cfg.pool_type == 'gap':
      return jnp.mean(x, axis=1)
    if cfg.pool_type == 'tok':
      return x[:, 0]
    return MAPHead(cfg, name='MAPHead_0')(x)
