"""PaLI-style vision-language model: ViT image tokens ahead of the text in a T5 encoder-decoder.

``images -> ViT (all tokens) -> img_proj (width -> d_model) -> [image; text] -> T5``.
The image tokens enter :meth:`T5.encode` as ``image_embeddings``, so the AdaLink seam
(``encoder_input_adapter``) is exactly T5's: it sees both modalities, image first,
with ``modality`` telling them apart. The encoder attends fully over ``[image; text]``.

Parameter tree: ``img/...`` (big_vision ViT names), ``img_proj/{kernel, bias}``,
``t5/...`` (t5x names), plus the adapters' own parameters.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adalink_jax.models import layers
from adalink_jax.models import t5 as t5_lib
from adalink_jax.models import vit as vit_lib


@dataclasses.dataclass(frozen=True)
class PaLIConfig:
  """A ViT (its ``pool_type`` must be ``'none'``) and a T5 encoder-decoder."""
  vit: vit_lib.ViTConfig
  t5: t5_lib.T5Config

  def __post_init__(self):
    if self.vit.pool_type != 'none':
      raise ValueError(f'PaLIConfig.vit.pool_type must be "none" (PaLI feeds every image token '
                       f'to the encoder), got {self.vit.pool_type!r}')

  @property
  def num_image_tokens(self) -> int:
    return self.vit.num_patches

  def replace(self, **kw) -> 'PaLIConfig':
    return dataclasses.replace(self, **kw)


def pali_config(name: str, **t5_overrides) -> PaLIConfig:
  """Named shapes: ``'tiny'`` (tests), ``'pali3'``, ``'palix'`` (shape-only).

  pali3: SigLIP So400m/14 at 224px (256 image tokens) + the 3B UL2-style encoder-decoder.
  palix: ViT-22B/14 at 224px + a 32B-class encoder-decoder (exact PaLI-X LM shape is not public).
  ``t5_overrides`` go to the T5 config (e.g. ``dtype``, ``scan_layers``).
  """
  if name == 'tiny':
    vit = vit_lib.vit_config('tiny')
    lm = t5_lib.t5_config('t5_1_1_tiny', **t5_overrides)
  elif name == 'pali3':
    vit = vit_lib.vit_config('So400m/14', image_size=224)
    lm = t5_lib.t5_config('pali3_3b', **t5_overrides)
  elif name == 'palix':
    vit = vit_lib.vit_config('22B/14', image_size=224)
    lm = t5_lib.t5_config('palix_32b', **t5_overrides)
  else:
    raise ValueError(f'unknown PaLI config {name!r}; known: tiny, pali3, palix')
  shared = {k: v for k, v in t5_overrides.items()
            if k in ('dtype', 'param_dtype', 'scan_layers', 'remat_policy')}
  return PaLIConfig(vit.replace(pool_type='none', **shared), lm)


class PaLI(nn.Module):
  """ViT + projection + T5. The adapters are handed to T5 unchanged (same seam, same calls)."""
  config: PaLIConfig
  encoder_input_adapter: Optional[nn.Module] = None
  decoder_input_adapter: Optional[nn.Module] = None

  def setup(self):
    cfg = self.config
    self.img = vit_lib.ViT(cfg.vit)
    # Input side named 'mlp' (not 'embed') so the kernel's two dims never share a mesh axis.
    self.img_proj = layers.Dense(cfg.t5.d_model, ('mlp', 'embed'), use_bias=True,
                                 dtype=cfg.t5.dtype, param_dtype=cfg.t5.param_dtype)
    self.t5 = t5_lib.T5(cfg.t5, self.encoder_input_adapter, self.decoder_input_adapter)

  def embed_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """``images[b, H, W, 3]`` in [-1, 1] -> image tokens ``[b, n_patches, d_model]``."""
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f'images must be floating point in [-1, 1], got dtype {images.dtype}')
    return self.img_proj(self.img(images, deterministic))

  def encode(self, text_tokens: jax.Array, images: Optional[jax.Array] = None,
             task_id: Optional[jax.Array] = None, deterministic: bool = True
             ) -> tuple[jax.Array, jax.Array]:
    """-> (encoded ``[b, n + l, d]``, mask ``[b, n + l]``), n = image tokens (0 without images)."""
    image_embeddings = None if images is None else self.embed_image(images, deterministic)
    return self.t5.encode(text_tokens, image_embeddings, task_id, deterministic)

  def decode(self, encoded: jax.Array, encoder_mask: jax.Array, decoder_input_tokens: jax.Array,
             task_id: Optional[jax.Array] = None, deterministic: bool = True,
             decode: bool = False) -> jax.Array:
    """As :meth:`T5.decode`: ``decoder_input_tokens[b, t]`` -> logits ``[b, t, vocab]`` fp32."""
    return self.t5.decode(encoded, encoder_mask, decoder_input_tokens, task_id, deterministic,
                          decode)

  def __call__(self, images: Optional[jax.Array], text_tokens: jax.Array,
               decoder_input_tokens: jax.Array, task_id: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """Teacher-forced logits ``[b, t, vocab]`` (``images`` may be None for text-only)."""
    encoded, mask = self.encode(text_tokens, images, task_id, deterministic)
    return self.decode(encoded, mask, decoder_input_tokens, task_id, deterministic)


# ------------------------------------------------------------------ parameter counting


def count_params(tree: Any) -> int:
  """Total number of elements over a parameter tree of arrays, boxes or ``ShapeDtypeStruct``s."""
  leaves = jax.tree_util.tree_leaves(nn.unbox(tree))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))


def param_shapes(config: PaLIConfig, encoder_input_adapter: Optional[nn.Module] = None,
                 decoder_input_adapter: Optional[nn.Module] = None) -> Any:
  """The (unboxed) parameter tree of ``PaLI(config, ...)`` as ``ShapeDtypeStruct``s.

  Uses ``jax.eval_shape``: nothing is allocated, so 50B-parameter shapes are fine on a laptop.
  """
  model = PaLI(config, encoder_input_adapter, decoder_input_adapter)
  h, w = config.vit.image_size
  images = jax.ShapeDtypeStruct((1, h, w, config.vit.num_channels), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  variables = jax.eval_shape(lambda im, tx: model.init(jax.random.key(0), im, tx, tx),
                             images, tokens)
  return nn.unbox(variables['params'])


def config_param_count(config: PaLIConfig) -> int:
  """Parameter count of a PaLI config without allocating (scan on both stacks for fast tracing)."""
  fast = config.replace(vit=config.vit.replace(scan_layers=True),
                        t5=config.t5.replace(scan_layers=True))
  return count_params(param_shapes(fast))
