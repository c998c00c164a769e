"""PaliGemma (1 and 2) weights -> :mod:`adalink_jax.models.paligemma` params, streamed.

Two formats, each read one array at a time into its sharding (:func:`streaming.place`):

HF ``PaliGemmaForConditionalGeneration.save_pretrained`` (safetensors):
  ``[model.]vision_tower.[vision_model.]*`` -> ``img/...``  (:mod:`hf_vision`'s SigLIP table)
  ``[model.]multi_modal_projector.linear.{weight [d, w], bias}`` -> ``img_proj/{kernel, bias}``
  ``model.language_model.*`` / ``language_model.model.*`` -> ``llm/...`` (:func:`hf_gemma.llm_sources`)

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

from adalink_jax.checkpoints import big_vision, common, hf, hf_gemma, hf_vision
from adalink_jax.checkpoints.streaming import ArraySource, LayerSlice, Transposed, place
from adalink_jax.models import paligemma as pg_lib

PathLike = Union[str, os.PathLike]
_SHARED = ('dtype', 'param_dtype', 'scan_layers', 'remat_policy')
_PROJ = re.compile(r'^(model\.)?multi_modal_projector\.linear\.(weight|bias)$')

_HOW_TO_GET_HF = ('Expected a PaliGemmaForConditionalGeneration.save_pretrained() directory '
                  '(config.json + model.safetensors or its index and shards), e.g. '
                  'huggingface-cli download google/paligemma2-3b-pt-224 --local-dir <dir>.')


# ------------------------------------------------------------------ the text decoder


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
  # hf_gemma drops the wrapper's use_bidirectional_attention (PaliGemma builds its prefix-LM mask).
  llm = hf_gemma.config_from_hf(config_json, **overrides)
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
  _, files = hf.locate(directory, what='HF PaliGemma directory', how_to_get=_HOW_TO_GET_HF)
  tensors = hf.safetensors_sources(files)
  where = f'HF PaliGemma checkpoint {str(directory)!r}'
  proj = {m.group(2): s for n, s in tensors.items() if (m := _PROJ.match(n))}
  proj_mapped = {}
  if 'weight' in proj:
    proj_mapped['kernel'] = Transposed(proj['weight'])
  if 'bias' in proj:
    proj_mapped['bias'] = proj['bias']
  img_proj = place(proj_mapped, expected['img_proj'], shardings=sh['img_proj'], dtype=dtype,
                   where=where, notes={'kernel': 'multi_modal_projector.linear.weight'})
  mapped, notes, unexpected = hf_gemma.llm_sources(tensors, cfg.llm)
  llm = place(mapped, expected['llm'], shardings=sh['llm'], dtype=dtype,
              where=f'{where} (text decoder)', notes=notes, unexpected=unexpected)
  return cfg, {'img': img, 'img_proj': img_proj, 'llm': llm}


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
  img_proj = place(head, expected['img_proj'], shardings=sh['img_proj'], dtype=dtype,
                   where=where, notes={k: f'{root}img/head/{k}' for k in ('kernel', 'bias')})
  llm_root = f'{root}llm/'
  ck = {n[len(llm_root):]: s for n, s in sources.items() if n.startswith(llm_root)}
  mapped, unused = big_vision_llm_sources(ck, config.llm)
  mapped = hf_gemma.stack_layers(mapped, config.llm.num_layers, config.llm.scan_layers)
  llm = place(mapped, expected['llm'], shardings=sh['llm'], dtype=dtype,
              where=f'{where} (tree "{llm_root}")', unexpected=[llm_root + n for n in unused])
  return {'img': img, 'img_proj': img_proj, 'llm': llm}
