"""PaliGemma (1 and 2) weights -> :mod:`adalink_jax.models.paligemma` params, streamed.

Two formats, each read one array at a time into its sharding (:func:`streaming.place_all`):

HF ``PaliGemmaForConditionalGeneration.save_pretrained`` (safetensors):
  ``[model.]vision_tower.[vision_model.]*`` -> ``img/...``  (:mod:`hf_vision`'s SigLIP table)
  ``[model.]multi_modal_projector.linear.{weight [d, w], bias}`` -> ``img_proj/{kernel, bias}``
  ``model.language_model.*`` / ``language_model.model.*`` -> ``llm/...`` (:mod:`hf_gemma`'s table)

big_vision PaliGemma ``.npz`` (root ``''``, ``params/`` or ``opt/target/``), the names
transformers' ``convert_paligemma{,2}_weights_to_hf.py`` reads; layers stacked on axis 0:
  ``img/...`` -> ``img/...`` (:mod:`big_vision`); ``img/head/{kernel, bias}`` -> ``img_proj``
  ``llm/embedder/input_embedding [V, d]``, ``llm/final_norm/scale``
  ``llm/layers/attn/q_einsum/w [L, N, d, h]``      -> ``attn/q_proj/kernel [d, N, h]``
  ``llm/layers/attn/kv_einsum/w [L, 2, K, d, h]``  -> ``attn/{k,v}_proj/kernel [d, K, h]``
  ``llm/layers/attn/qkv_einsum/w [L, 3, N, d, h]`` (N == K, e.g. Gemma 7B) -> q, k, v
  ``llm/layers/attn/attn_vec_einsum/w [L, N, h, d]`` -> ``attn/o_proj/kernel``
  ``llm/layers/mlp/gating_einsum [L, 2, d, F]``    -> ``mlp/{gate,up}_proj/kernel [d, F]``
  ``llm/layers/mlp/linear [L, F, d]``              -> ``mlp/down_proj/kernel``
  ``llm/layers/{pre_attention,pre_ffw,post_attention,post_ffw}_norm/scale [L, d]``
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Mapping, Union

import jax

from adalink_jax.checkpoints import big_vision, common, hf, hf_gemma, hf_vision
from adalink_jax.checkpoints.streaming import (ArraySource, LayerSlice, Stacked, Transposed,
                                               place_all)
from adalink_jax.models import paligemma as pg_lib

PathLike = Union[str, os.PathLike]
_SHARED = ('dtype', 'param_dtype', 'scan_layers', 'remat_policy')
_PROJ = re.compile(r'^(model\.)?multi_modal_projector\.linear\.(weight|bias)$')
_LAYER = re.compile(r'^layers\.(\d+)\.(.+)\.weight$')

_HOW_TO_GET_HF = ('Expected a PaliGemmaForConditionalGeneration.save_pretrained() directory '
                  '(config.json + model.safetensors or its index and shards), e.g. '
                  'huggingface-cli download google/paligemma2-3b-pt-224 --local-dir <dir>.')


# ------------------------------------------------------------------ the text decoder


def _stack_or_keep(flat: dict[str, ArraySource], num_layers: int, scanned: bool
                   ) -> dict[str, ArraySource]:
  """Unscanned ``layers_i/...`` sources -> ``layers/...`` stacks when the model scans."""
  if not scanned:
    return flat
  out = {n: s for n, s in flat.items() if not n.startswith('layers_')}
  for name in [n for n in flat if n.startswith('layers_0/')]:
    rest = name[len('layers_0/'):]
    parts = [flat.get(f'layers_{i}/{rest}') for i in range(num_layers)]
    if all(p is not None for p in parts):
      out[f'layers/{rest}'] = Stacked(parts, f'layers_*/{rest}')
  return out


def _place(mapped, expected_flat, source, notes, unexpected, shardings, dtype):
  common.check_tree(expected_flat, mapped, source=source, extra_unexpected=unexpected,
                    notes=notes)
  return place_all(mapped, expected_flat, shardings, dtype)


def hf_llm_sources(tensors: Mapping[str, ArraySource], cfg) -> tuple[dict, dict, list]:
  """HF Gemma tensors (vision ones ignored) -> (unscanned sources, notes, unexpected names)."""
  names = {n for n in tensors if not hf_gemma._SKIPPED.match(n)}  # pylint: disable=protected-access
  prefix = hf_gemma._text_prefix(names)  # pylint: disable=protected-access
  targets = hf_gemma._layer_targets(cfg)  # pylint: disable=protected-access
  mapped, notes, unexpected = {}, {}, []
  for name in sorted(names):
    rest = name[len(prefix):] if name.startswith(prefix) else None
    m = _LAYER.match(rest) if rest else None
    if name.endswith('lm_head.weight'):
      embed = tensors[f'{prefix}embed_tokens.weight']
      if not hf._same_values(tensors[name], embed):  # pylint: disable=protected-access
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
      src = tensors[name]
      try:  # wrapped: jit of numpy's C dispatcher objects (np.transpose) crashes jax 0.10
        out = jax.eval_shape(lambda a, fn=fn: a if fn is None else fn(a),
                             jax.ShapeDtypeStruct(src.shape, src.dtype))
      except (TypeError, ValueError):
        unexpected.append(f'{name} {src.shape} (does not fit {path} of the config)')
        continue
      convert = hf_vision._Converted  # pylint: disable=protected-access
      mapped[ours] = src if fn is None else convert([src], fn, out.shape, out.dtype,
                                                    f'{name} -> {ours}')
    else:
      unexpected.append(name)
  return mapped, notes, unexpected


def big_vision_llm_sources(ck: Mapping[str, ArraySource], cfg) -> tuple[dict, list]:
  """big_vision ``llm/`` tree (root stripped) -> (unscanned sources, unused names)."""
  layer = lambda src, i, axes: Transposed(LayerSlice(src, 0, i), axes) if axes else LayerSlice(
      src, 0, i)
  per_layer: dict[str, tuple[ArraySource, tuple]] = {}  # our name under layers_i -> (stack, axes)
  used = set()

  def take(name):
    used.add(name)
    return ck[name]

  attn = 'layers/attn/'
  if f'{attn}qkv_einsum/w' in ck:
    qkv = take(f'{attn}qkv_einsum/w')
    for j, p in enumerate('qkv'):
      per_layer[f'attn/{p}_proj/kernel'] = (LayerSlice(qkv, 1, j), (1, 0, 2))
  elif f'{attn}q_einsum/w' in ck and f'{attn}kv_einsum/w' in ck:
    per_layer['attn/q_proj/kernel'] = (take(f'{attn}q_einsum/w'), (1, 0, 2))
    kv = take(f'{attn}kv_einsum/w')
    per_layer['attn/k_proj/kernel'] = (LayerSlice(kv, 1, 0), (1, 0, 2))
    per_layer['attn/v_proj/kernel'] = (LayerSlice(kv, 1, 1), (1, 0, 2))
  if f'{attn}attn_vec_einsum/w' in ck:
    per_layer['attn/o_proj/kernel'] = (take(f'{attn}attn_vec_einsum/w'), ())
  if 'layers/mlp/gating_einsum' in ck:
    gating = take('layers/mlp/gating_einsum')
    per_layer['mlp/gate_proj/kernel'] = (LayerSlice(gating, 1, 0), ())
    per_layer['mlp/up_proj/kernel'] = (LayerSlice(gating, 1, 1), ())
  if 'layers/mlp/linear' in ck:
    per_layer['mlp/down_proj/kernel'] = (take('layers/mlp/linear'), ())
  for norm in ('pre_attention_norm', 'pre_ffw_norm', 'post_attention_norm', 'post_ffw_norm'):
    if f'layers/{norm}/scale' in ck:
      per_layer[f'{norm}/scale'] = (take(f'layers/{norm}/scale'), ())
  mapped = {n: take(n) for n in ('embedder/input_embedding', 'final_norm/scale') if n in ck}
  for ours, (stack, axes) in per_layer.items():
    for i in range(min(cfg.num_layers, stack.shape[0] if stack.shape else 0)):
      mapped[f'layers_{i}/{ours}'] = layer(stack, i, axes)
  return mapped, sorted(set(ck) - used)


# ------------------------------------------------------------------ HF


def config_from_hf(config_json: Mapping[str, Any], **overrides) -> pg_lib.PaliGemmaConfig:
  """A PaliGemma config.json dict -> :class:`PaliGemmaConfig` (dtype/scan go to both towers)."""
  if config_json.get('model_type') != 'paligemma':
    raise ValueError(f'config.json model_type={config_json.get("model_type")!r}: expected '
                     "'paligemma' (PaliGemmaForConditionalGeneration)")
  shared = {k: v for k, v in overrides.items() if k in _SHARED}
  vit = hf_vision.vit_config_from_hf(config_json, pool_type='none', **shared)
  # PaliGemmaConfig sets use_bidirectional_attention on its text_config (BC flag): the wrapper
  # always hands the decoder an explicit prefix-LM mask, which PaliGemma builds itself.
  text = {k: v for k, v in (config_json.get('text_config') or {}).items()
          if k != 'use_bidirectional_attention'}
  llm = hf_gemma.config_from_hf({**config_json, 'text_config': text}, **overrides)
  proj = (config_json.get('vision_config') or {}).get('projection_dim', llm.d_model)
  if int(proj) != llm.d_model:
    raise ValueError(f'config.json vision_config.projection_dim={proj} differs from the text '
                     f'hidden_size={llm.d_model}; PaliGemma projects image tokens to the width '
                     'of the decoder')
  return pg_lib.PaliGemmaConfig(vit, llm)


def load_hf_paligemma(path: PathLike, *, shardings: Any = None, dtype: Any = None,
                      **overrides) -> tuple[pg_lib.PaliGemmaConfig, dict[str, Any]]:
  """A save_pretrained directory -> (config, params ``{img, img_proj, llm}``).

  overrides: config fields (``dtype``, ``param_dtype``, ``scan_layers`` ...); shardings: None,
  one Sharding, or a tree like the params; dtype: one cast for every array.
  """
  directory = pathlib.Path(path).expanduser()
  if not (directory / hf.CONFIG_FILE).is_file():
    raise common.missing_checkpoint_error(directory / hf.CONFIG_FILE, hf.CONFIG_FILE,
                                          _HOW_TO_GET_HF)
  cfg = config_from_hf(json.loads((directory / hf.CONFIG_FILE).read_text()), **overrides)
  expected = pg_lib.param_shapes(cfg)
  sh = shardings if isinstance(shardings, Mapping) else {k: shardings for k in expected}
  img = hf_vision.load_hf_vision(directory, expected['img'], shardings=sh['img'], dtype=dtype,
                                 config=cfg.vit)
  _, files = hf._locate(directory)  # pylint: disable=protected-access
  tensors = hf.safetensors_sources(files)
  where = f'HF PaliGemma checkpoint {str(directory)!r}'
  proj = {m.group(2): s for n, s in tensors.items() if (m := _PROJ.match(n))}
  proj_mapped = {}
  if 'weight' in proj:
    proj_mapped['kernel'] = Transposed(proj['weight'])
  if 'bias' in proj:
    proj_mapped['bias'] = proj['bias']
  img_proj = _place(proj_mapped, common.flatten(expected['img_proj']), where,
                    {'kernel': 'multi_modal_projector.linear.weight'}, [], sh['img_proj'], dtype)
  mapped, notes, unexpected = hf_llm_sources(tensors, cfg.llm)
  mapped = _stack_or_keep(mapped, cfg.llm.num_layers, cfg.llm.scan_layers)
  llm = _place(mapped, common.flatten(expected['llm']), f'{where} (text decoder)', notes,
               unexpected, sh['llm'], dtype)
  return cfg, {'img': img, 'img_proj': common.unflatten(img_proj),
               'llm': common.unflatten(llm)}


# ------------------------------------------------------------------ big_vision


def _npz_root(names, file: str) -> str:
  for root in big_vision.ROOTS:
    if f'{root}llm/embedder/input_embedding' in names:
      return root
  raise ValueError(f'{file}: no PaliGemma decoder found (looked for "<root>llm/embedder/'
                   f'input_embedding" with root in {list(big_vision.ROOTS)}); the archive starts '
                   f'with {sorted(names)[:8]}')


def load_big_vision_paligemma(path: PathLike, config: pg_lib.PaliGemmaConfig, *,
                              shardings: Any = None, dtype: Any = None) -> dict[str, Any]:
  """A big_vision PaliGemma ``.npz`` -> params ``{img, img_proj, llm}`` for ``config``.

  The npz holds no config: build it with :func:`paligemma_config` (vocab 257152, the image
  size of the file or another one: the position grid is resampled as big_vision does).
  """
  file = os.fspath(path)
  sources = big_vision.npz_sources(file)
  root = _npz_root(sources, file)
  expected = pg_lib.param_shapes(config)
  sh = shardings if isinstance(shardings, Mapping) else {k: shardings for k in expected}
  img = big_vision.load_big_vision_params(f'{file}:{root}img', expected['img'],
                                          shardings=sh['img'], dtype=dtype)
  where = f'big_vision PaliGemma checkpoint {file}'
  head = {k: sources[f'{root}img/head/{k}'] for k in ('kernel', 'bias')
          if f'{root}img/head/{k}' in sources}
  img_proj = _place(head, common.flatten(expected['img_proj']), where,
                    {k: f'{root}img/head/{k}' for k in ('kernel', 'bias')}, [], sh['img_proj'],
                    dtype)
  llm_root = f'{root}llm/'
  ck = {n[len(llm_root):]: s for n, s in sources.items() if n.startswith(llm_root)}
  mapped, unused = big_vision_llm_sources(ck, config.llm)
  mapped = _stack_or_keep(mapped, config.llm.num_layers, config.llm.scan_layers)
  llm = _place(mapped, common.flatten(expected['llm']), f'{where} (tree "{llm_root}")', {},
               [llm_root + n for n in unused], sh['llm'], dtype)
  return {'img': img, 'img_proj': common.unflatten(img_proj), 'llm': common.unflatten(llm)}
