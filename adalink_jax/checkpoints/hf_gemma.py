"""Hugging Face Gemma / Gemma 2 / Gemma 3 text weights -> :mod:`adalink_jax.models.gemma` params.

Layers, so other readers reuse the middle ones:
  :func:`config_from_hf`: an HF ``config.json`` dict (``gemma``, ``gemma2``, ``gemma3_text``, or
    the ``text_config`` of ``gemma3`` / ``paligemma``) -> :class:`GemmaConfig`.
  :func:`llm_sources`: ``{HF tensor name: ArraySource}`` -> ``{our name: ArraySource}`` (PaliGemma's
    HF reader uses it for its decoder); :func:`params_from_sources` places them
    (:func:`streaming.place`: numpy on the host, or streamed into shardings). The GGUF reader
    produces HF-named sources and calls it too; :func:`params_from_hf` takes numpy arrays.
  :func:`load_hf_gemma`: a ``save_pretrained`` directory (safetensors) -> (config, params).

Names (``P`` is ``model.``, ``model.language_model.`` or ``language_model.model.``; torch Linear
weights are ``[out, in]``)::

  P embed_tokens.weight [vocab, d]              -> embedder/input_embedding
  P layers.i.self_attn.q_proj.weight [H*hd, d]  -> layers_i/attn/q_proj/kernel [d, H, hd]
  P layers.i.self_attn.{k,v}_proj.weight        -> layers_i/attn/{k,v}_proj/kernel [d, K, hd]
  P layers.i.self_attn.o_proj.weight [d, H*hd]  -> layers_i/attn/o_proj/kernel [H, hd, d]
  P layers.i.self_attn.{q,k}_norm.weight        -> layers_i/attn/{query,key}_norm/scale
  P layers.i.input_layernorm.weight             -> layers_i/pre_attention_norm/scale
  P layers.i.post_attention_layernorm.weight    -> layers_i/post_attention_norm/scale (Gemma 2/3)
                                                   layers_i/pre_ffw_norm/scale (Gemma 1: it *is*
                                                   the pre-FFN norm there)
  P layers.i.{pre,post}_feedforward_layernorm   -> layers_i/{pre,post}_ffw_norm/scale
  P layers.i.mlp.{gate,up,down}_proj.weight     -> layers_i/mlp/{gate,up,down}_proj/kernel (.T)
  P norm.weight                                 -> final_norm/scale

The LM head is tied; an ``lm_head.weight`` equal to the embedding is skipped, a different one
is an error. Vision-tower / projector tensors of multimodal checkpoints are skipped.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np

from adalink_jax.checkpoints import common
from adalink_jax.checkpoints.hf import locate, safetensors_sources, same_values
from adalink_jax.checkpoints.streaming import (ON_HOST, ArraySource, Converted, NumpySource,
                                               Stacked, place)
from adalink_jax.models import gemma

PathLike = Union[str, os.PathLike]

# HF class defaults for the keys we read, used when config.json leaves one out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    'gemma': dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, rms_norm_eps=1e-6, rope_theta=10_000.0),
    'gemma2': dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, rms_norm_eps=1e-6, rope_theta=10_000.0,
                   query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    'gemma3_text': dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=None,
                        attn_logit_softcapping=None),
}
# Multimodal wrappers: the text model type their text_config defaults to.
_WRAPPERS = {'gemma3': 'gemma3_text', 'paligemma': 'gemma'}
# Text-config keys a wrapper sets for its own use, harmless to the decoder's math. PaliGemma's
# use_bidirectional_attention (transformers' BC default True) means "the image + prompt prefix
# attends both ways", which PaliGemma -- and any caller of gemma.Gemma -- gets from the
# explicit prefix-LM mask it passes; on a plain Gemma config the flag is refused.
_WRAPPER_FLAGS = {'paligemma': ('use_bidirectional_attention',)}
_TANH_GELU = ('gelu_pytorch_tanh', 'gelu_new')
_HF_LAYER_TYPES = {'sliding_attention': gemma.LOCAL, 'full_attention': gemma.GLOBAL}


# ------------------------------------------------------------------ config


def text_config_json(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """The text-decoder part of a config.json dict (itself, or its ``text_config``)."""
  cfg = dict(config_json)
  outer = cfg.get('model_type')
  if outer in _WRAPPERS or 'text_config' in cfg:
    text = dict(cfg.get('text_config') or {})
    text.setdefault('model_type', _WRAPPERS.get(outer, 'gemma'))
    for key in _WRAPPER_FLAGS.get(outer, ()):
      text.pop(key, None)
    return text
  return cfg


def _rope(spec: Optional[Mapping[str, Any]], base: float, where: str) -> tuple[float, float]:
  """One HF rope dict (``rope_type``, ``rope_theta``, ``factor``) -> (base, linear factor)."""
  spec = dict(spec or {})
  kind = spec.get('rope_type', spec.get('type', 'default'))
  if kind not in ('default', 'linear'):
    raise ValueError(f'config.json {where}: rope_type {kind!r} is not supported; '
                     "gemma.Gemma implements 'default' and 'linear' RoPE only")
  factor = float(spec.get('factor', 1.0)) if kind == 'linear' else 1.0
  return float(spec.get('rope_theta', base)), factor


def _rope_fields(c: Mapping[str, Any], model_type: str) -> dict[str, float]:
  params = c.get('rope_parameters')
  if model_type == 'gemma3_text':
    if isinstance(params, Mapping) and 'full_attention' in params:  # transformers 5
      g = _rope(params['full_attention'], c['rope_theta'], 'rope_parameters.full_attention')
      lo = _rope(params.get('sliding_attention'), c['rope_local_base_freq'],
                 'rope_parameters.sliding_attention')
    else:  # transformers 4: rope_theta, rope_local_base_freq, rope_scaling on global layers
      g = _rope({'rope_theta': c['rope_theta'], **(c.get('rope_scaling') or {})}, 0,
                'rope_scaling')
      lo = (float(c['rope_local_base_freq']), 1.0)
  else:
    spec = params if isinstance(params, Mapping) else {
        'rope_theta': c['rope_theta'], **(c.get('rope_scaling') or {})}
    g = lo = _rope(spec, c['rope_theta'], 'rope_parameters')
  return dict(rope_base_global=g[0], rope_scale_global=g[1], rope_base_local=lo[0],
              rope_scale_local=lo[1])


def _layer_types(c: Mapping[str, Any], model_type: str, n: int) -> tuple[str, ...]:
  if model_type == 'gemma':
    return (gemma.GLOBAL,) * n
  if c.get('layer_types'):
    unknown = sorted(set(c['layer_types']) - set(_HF_LAYER_TYPES))
    if unknown:
      raise ValueError(f'config.json layer_types has {unknown}; expected only '
                       f'{sorted(_HF_LAYER_TYPES)}')
    return tuple(_HF_LAYER_TYPES[t] for t in c['layer_types'])
  period = 2 if model_type == 'gemma2' else int(
      c.get('sliding_window_pattern', c.get('_sliding_window_pattern', 6)))
  return gemma.layer_pattern(n, period)


def _refuse_unsupported(c: Mapping[str, Any], model_type: str) -> None:
  act = c.get('hidden_activation') or c.get('hidden_act') or 'gelu_pytorch_tanh'
  # Gemma 1 configs say 'gelu' but mean the tanh form (HF rewrites it on load).
  if act not in _TANH_GELU and not (model_type == 'gemma' and act == 'gelu'):
    raise ValueError(f'config.json hidden_activation={act!r}: gemma.Gemma uses the tanh GELU '
                     f'({_TANH_GELU}); this checkpoint needs another activation')
  for key, why in (('attention_bias', 'biases on the attention projections'),
                   ('use_bidirectional_attention', 'bidirectional (encoder-style) attention')):
    if c.get(key):
      raise ValueError(f'config.json {key}=true: {why} is not implemented by gemma.Gemma')
  if c.get('tie_word_embeddings') is False:
    raise ValueError('config.json tie_word_embeddings=false: gemma.Gemma ties the LM head to '
                     'the embedding, as every released Gemma does')


def config_from_hf(config_json: Mapping[str, Any], **overrides) -> gemma.GemmaConfig:
  """An HF config.json dict -> :class:`GemmaConfig` (``overrides`` replace fields afterwards)."""
  text = text_config_json(config_json)
  model_type = text.get('model_type', 'gemma')
  if model_type not in _DEFAULTS:
    raise ValueError(f'config.json model_type={model_type!r} is not a Gemma text decoder; '
                     f'supported: {sorted(_DEFAULTS)} (or {sorted(_WRAPPERS)} with a '
                     'text_config)')
  c = {**_DEFAULTS[model_type], **{k: v for k, v in text.items() if v is not None}}
  if model_type != 'gemma':  # None is meaningful here: no soft-capping
    for key in ('final_logit_softcapping', 'attn_logit_softcapping'):
      if key in text:
        c[key] = text[key]
  _refuse_unsupported(c, model_type)
  n = int(c['num_hidden_layers'])
  eos = c.get('eos_token_id', 1)
  fields = dict(
      vocab_size=int(c['vocab_size']), d_model=int(c['hidden_size']), num_layers=n,
      num_heads=int(c['num_attention_heads']), num_kv_heads=int(c['num_key_value_heads']),
      head_dim=int(c['head_dim']), d_ff=int(c['intermediate_size']),
      layer_types=_layer_types(c, model_type, n), norm_eps=float(c['rms_norm_eps']),
      use_post_norms=model_type != 'gemma', use_qk_norm=model_type == 'gemma3_text',
      pad_id=int(c.get('pad_token_id', 0)), bos_id=int(c.get('bos_token_id', 2)),
      eos_id=int(eos[0] if isinstance(eos, (list, tuple)) else eos),
      **_rope_fields(c, model_type))
  if model_type != 'gemma':
    fields.update(
        sliding_window=int(c['sliding_window']),
        query_pre_attn_scalar=float(c['query_pre_attn_scalar']),
        attn_logit_softcap=_maybe_float(c.get('attn_logit_softcapping')),
        final_logit_softcap=_maybe_float(c.get('final_logit_softcapping')))
  return gemma.GemmaConfig(**{**fields, **overrides})


def _maybe_float(x: Any) -> Optional[float]:
  return None if x is None else float(x)


# ------------------------------------------------------------------ tensors


_PREFIXES = ('model.', 'model.language_model.', 'language_model.model.', '')
_SKIPPED = re.compile(r'^(model\.)?(vision_tower|vision_model|multi_modal_projector)\.')
_LAYER = re.compile(r'^layers\.(\d+)\.(.+)\.weight$')


def _text_prefix(names: set[str]) -> str:
  for prefix in _PREFIXES:
    if f'{prefix}embed_tokens.weight' in names:
      return prefix
  raise common.CheckpointMismatchError(
      missing=[f'{p}embed_tokens.weight' for p in _PREFIXES[:3]],
      source='HF Gemma tensors (no embedding table under any known prefix)')


def _layer_targets(cfg: gemma.GemmaConfig) -> dict[str, tuple[str, Any]]:
  """HF per-layer suffix -> (our path under layers_i, array transform)."""
  h, k, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
  table = {
      'self_attn.q_proj': ('attn/q_proj/kernel', lambda w: w.T.reshape(d, h, hd)),
      'self_attn.k_proj': ('attn/k_proj/kernel', lambda w: w.T.reshape(d, k, hd)),
      'self_attn.v_proj': ('attn/v_proj/kernel', lambda w: w.T.reshape(d, k, hd)),
      'self_attn.o_proj': ('attn/o_proj/kernel', lambda w: w.T.reshape(h, hd, d)),
      'input_layernorm': ('pre_attention_norm/scale', None),
      'mlp.gate_proj': ('mlp/gate_proj/kernel', np.transpose),
      'mlp.up_proj': ('mlp/up_proj/kernel', np.transpose),
      'mlp.down_proj': ('mlp/down_proj/kernel', np.transpose),
  }
  if cfg.use_post_norms:
    table.update({'post_attention_layernorm': ('post_attention_norm/scale', None),
                  'pre_feedforward_layernorm': ('pre_ffw_norm/scale', None),
                  'post_feedforward_layernorm': ('post_ffw_norm/scale', None)})
  else:
    table['post_attention_layernorm'] = ('pre_ffw_norm/scale', None)
  if cfg.use_qk_norm:
    table.update({'self_attn.q_norm': ('attn/query_norm/scale', None),
                  'self_attn.k_norm': ('attn/key_norm/scale', None)})
  return table


def llm_sources(tensors: Mapping[str, ArraySource], cfg: gemma.GemmaConfig
                ) -> tuple[dict[str, ArraySource], dict[str, str], list[str]]:
  """HF Gemma tensors (vision / projector ones ignored) -> our sources, in ``cfg``'s layout.

  Returns (``{our name: source}``, ``{our name: HF name}`` notes, unexpected HF names). A
  scanned ``cfg`` gets ``layers/...`` stacks of the per-layer sources. An ``lm_head.weight``
  is compared with the embedding block by block (read only then) and refused if it differs.
  """
  names = {n for n in tensors if not _SKIPPED.match(n)}
  prefix = _text_prefix(names)
  targets = _layer_targets(cfg)
  mapped, notes, unexpected = {}, {}, []
  for name in sorted(names):
    rest = name[len(prefix):] if name.startswith(prefix) else None
    m = _LAYER.match(rest) if rest else None
    if name.endswith('lm_head.weight'):
      if not same_values(tensors[name], tensors[f'{prefix}embed_tokens.weight']):
        raise ValueError(f'{name} differs from {prefix}embed_tokens.weight: gemma.Gemma ties the '
                         'LM head to the embedding; an untied head is not supported')
    elif rest == 'embed_tokens.weight':
      mapped['embedder/input_embedding'], notes['embedder/input_embedding'] = tensors[name], name
    elif rest == 'norm.weight':
      mapped['final_norm/scale'], notes['final_norm/scale'] = tensors[name], name
    elif m and m.group(2) in targets and int(m.group(1)) < cfg.num_layers:
      path, fn = targets[m.group(2)]
      ours = f'layers_{int(m.group(1))}/{path}'
      notes[ours] = name
      src = _converted(tensors[name], fn, f'{name} -> {ours}')
      if src is None:  # reshape to our layout failed: the config and the tensor disagree
        unexpected.append(f'{name} {tensors[name].shape} (does not fit {path} of the config)')
      else:
        mapped[ours] = src
    else:
      unexpected.append(name)
  return stack_layers(mapped, cfg.num_layers, cfg.scan_layers), notes, unexpected


def _converted(src: ArraySource, fn, name: str) -> Optional[ArraySource]:
  """``fn(src)`` as a lazy source, or None when ``src``'s shape does not take ``fn``."""
  if fn is None:
    return src
  try:  # wrapped: jit of numpy's C dispatcher objects (np.transpose) crashes jax 0.10
    out = jax.eval_shape(lambda a: fn(a), jax.ShapeDtypeStruct(src.shape, src.dtype))
  except (TypeError, ValueError):
    return None
  return Converted([src], fn, out.shape, out.dtype, name)


def stack_layers(flat: dict[str, ArraySource], num_layers: int, scanned: bool
                 ) -> dict[str, ArraySource]:
  """Unscanned ``layers_i/...`` sources -> ``layers/...`` stacks (leading layer axis) if scanned.

  A name some layer lacks stays unstacked, so the shape check reports it by name.
  """
  if not scanned:
    return flat
  out = {n: s for n, s in flat.items() if not n.startswith('layers_')}
  for name in [n for n in flat if n.startswith('layers_0/')]:
    rest = name[len('layers_0/'):]
    parts = [flat.get(f'layers_{i}/{rest}') for i in range(num_layers)]
    if all(p is not None for p in parts):
      out[f'layers/{rest}'] = Stacked(parts, f'layers_*/{rest}')
  return out


def params_from_sources(tensors: Mapping[str, ArraySource], cfg: gemma.GemmaConfig, *,
                        shardings: Any = ON_HOST, where: str = 'HF Gemma tensors'
                        ) -> dict[str, Any]:
  """HF-named lazy tensors -> the parameter tree of ``Gemma(cfg)`` in ``cfg.param_dtype``.

  shardings: :data:`~streaming.ON_HOST` (numpy), ``None`` (first device), one ``Sharding``
  or a tree like the params; each array is streamed into place on its own. Every missing,
  unexpected or mis-shaped tensor is listed in one
  :class:`~adalink_jax.checkpoints.common.CheckpointMismatchError`.
  """
  mapped, notes, unexpected = llm_sources(tensors, cfg)
  return place(mapped, gemma.param_shapes(cfg), shardings=shardings,
               dtype=np.dtype(cfg.param_dtype), where=where, notes=notes, unexpected=unexpected)


def params_from_hf(named_arrays: Mapping[str, np.ndarray], cfg: gemma.GemmaConfig
                   ) -> dict[str, Any]:
  """``{HF tensor name: array}`` -> nested numpy parameter tree for ``Gemma(cfg)``.

  The in-memory form of :func:`params_from_sources` (e.g. a torch ``state_dict``).
  """
  return params_from_sources({n: NumpySource(a, n) for n, a in named_arrays.items()}, cfg)


# ------------------------------------------------------------------ files


_HOW_TO_GET = ('Expected a Hugging Face save_pretrained() directory with config.json and '
               'model.safetensors (or model.safetensors.index.json and its shards), e.g. '
               'Gemma3ForCausalLM.from_pretrained(name).save_pretrained(dir).')


def load_hf_gemma(directory: PathLike, *, shardings: Any = ON_HOST, **overrides
                  ) -> tuple[gemma.GemmaConfig, dict[str, Any]]:
  """A save_pretrained directory -> (config, params); ``overrides`` go to the config
  (``dtype``, ``param_dtype``, ``scan_layers`` ...). shardings: as in
  :func:`params_from_sources` (default: numpy arrays on the host)."""
  config_file, files = locate(directory, what='HF Gemma directory', how_to_get=_HOW_TO_GET)
  cfg = config_from_hf(json.loads(config_file.read_text()), **overrides)
  where = f'HF Gemma checkpoint {str(config_file.parent)!r}'
  return cfg, params_from_sources(safetensors_sources(files), cfg, shardings=shardings,
                                  where=where)
