"""Hugging Face image towers (SigLIP, plain ViT) from safetensors -> our big_vision-style ViT.

Reads a ``save_pretrained`` directory (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``) without torch. Every tensor is read lazily, one at a
time, and streamed into its sharding (:func:`streaming.place`), so the text tower of a
two-tower ``SiglipModel`` is never read.

SigLIP (``SiglipVisionModel``; ``SiglipModel`` and other wrappers keep it under a prefix
such as ``vision_model.``, found from the tensor names). torch ``Linear`` weights are
``[out, in]``; ``h`` heads of ``k`` channels, width ``d``:

  ``embeddings.patch_embedding.{weight [d, c, p, p], bias}`` -> ``embedding/{kernel [p, p, c, d], bias}``
  ``embeddings.position_embedding.weight [n, d]``          -> ``pos_embedding [1, n, d]``
  ``encoder.layers.{i}.layer_norm1 / layer_norm2``          -> ``.../LayerNorm_0 / LayerNorm_1``
  ``encoder.layers.{i}.self_attn.{q,k,v}_proj.weight [h*k, d]`` -> ``.../{query,key,value}/kernel [d, h, k]``
  ``encoder.layers.{i}.self_attn.out_proj.weight [d, h*k]`` -> ``.../out/kernel [h, k, d]``
  ``encoder.layers.{i}.mlp.fc1 / fc2``                      -> ``.../MlpBlock_0/Dense_0 / Dense_1``
  ``post_layernorm``                                        -> ``Transformer/encoder_norm``
  ``head.{probe, attention.in_proj_* (q;k;v rows), attention.out_proj, layernorm, mlp}``
                                                            -> ``MAPHead_0/...`` (pool_type 'map')

Plain ViT (``ViTModel``, ``ViTForImageClassification``'s ``vit.``): the same blocks under
``encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value},
attention.output.dense, layernorm_after, intermediate.dense, output.dense}`` and the final
``layernorm``. HF prepends ``cls_token`` and then adds ``position_embeddings [1, 1+n, d]``
to every token; our ViT adds the position embedding to the patches and then prepends
``cls``, so ``cls = cls_token + position_embeddings[:, 0]`` and ``pos_embedding =
position_embeddings[:, 1:]``: exact, but only for ``pool_type='tok'`` (the [CLS] token takes
part in every attention). The ``pooler`` (dense + tanh) and classifiers are ignored.
SigLIP 2 (NaFlex, linear patch embedding) is not supported.

Another resolution: when the model's image size gives another square patch grid than the
file's ``position_embedding`` (``[cls]`` slot excluded for ViT), the grid is resampled
bilinearly like big_vision's ``vit.resample_posemb`` (``scipy.ndimage.zoom(order=1)``,
:class:`big_vision.ResampledPosemb`), and logged. This is *not* HF's own
``interpolate_pos_encoding=True``, which interpolates bicubically at every forward pass:
we follow big_vision, whose PaLI-style high-resolution transfers the checkpoints come from.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, Optional, Union

import jax
import numpy as np

from adalink_jax.checkpoints import big_vision, hf
from adalink_jax.checkpoints.common import flatten
from adalink_jax.checkpoints.streaming import ArraySource, Converted, Stacked, place
from adalink_jax.models import vit as vit_lib

PathLike = Union[str, os.PathLike]

_HOW_TO_GET = (
    'Expected a Hugging Face save_pretrained() directory of an image tower holding config.json '
    'and model.safetensors (or model.safetensors.index.json plus its shards). On a machine with '
    'internet, run e.g.\n'
    '  huggingface-cli download google/siglip-so400m-patch14-224 config.json model.safetensors '
    '--local-dir /path/to/siglip\n'
    'or in Python: SiglipVisionModel.from_pretrained(name).save_pretrained(dir) (SiglipModel and '
    'ViTModel directories work too), then copy the directory here.')

# HF hidden_act -> adalink_jax.models.layers.ACTIVATIONS. 'gelu_fast' is the tanh form too.
_HF_ACTIVATIONS = {**hf._HF_ACTIVATIONS, 'gelu_fast': 'gelu'}  # pylint: disable=protected-access

# Public defaults of transformers' SiglipVisionConfig / ViTConfig for keys a config.json omits.
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6,
                        vision_use_head=True)
_VIT_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                     hidden_act='gelu', layer_norm_eps=1e-12, qkv_bias=True)

# One tensor every tower of a family has; what precedes it in a name is the tower's prefix.
_ANCHORS = {'siglip': 'embeddings.patch_embedding.weight',
            'vit': 'embeddings.patch_embeddings.projection.weight'}


# ------------------------------------------------------------------ config


def _vision_section(config_json: Mapping[str, Any]) -> tuple[str, dict]:
  """config.json -> ('siglip' | 'vit', the vision tower's settings with defaults filled in)."""
  cfg = dict(config_json)
  model_type = cfg.get('model_type', '')
  if isinstance(cfg.get('vision_config'), Mapping):  # SiglipModel, PaliGemma, ...
    cfg = dict(cfg['vision_config'])
    model_type = cfg.get('model_type', 'siglip_vision_model')
  if model_type == 'siglip_vision_model':
    return 'siglip', {**_SIGLIP_DEFAULTS, **cfg}
  if model_type == 'vit':
    return 'vit', {**_VIT_DEFAULTS, **cfg}
  raise ValueError(f'config.json model_type={model_type!r}: load_hf_vision reads SigLIP '
                   "('siglip', 'siglip_vision_model', or a vision_config of that type) and plain "
                   "ViT ('vit') towers; SigLIP 2 and other towers are not supported")


def vit_config_from_hf(config_json: Mapping[str, Any], **overrides) -> vit_lib.ViTConfig:
  """An HF SigLIP / ViT ``config.json`` dict -> :class:`ViTConfig` (``overrides`` win).

  pool_type: SigLIP ``'map'`` when ``vision_use_head`` (HF's ``pooler_output``) else
  ``'none'``; ViT ``'tok'``. Pass ``pool_type='none'`` for a PaLI-style token encoder.
  """
  family, v = _vision_section(config_json)
  act = v['hidden_act']
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f'config.json hidden_act={act!r} is not supported; known: '
                     f'{sorted(_HF_ACTIVATIONS)}')
  width, heads = int(v['hidden_size']), int(v['num_attention_heads'])
  if v.get('head_dim') not in (None, width // heads) or width % heads:
    raise ValueError(f'config.json hidden_size={width}, num_attention_heads={heads}, '
                     f"head_dim={v.get('head_dim')}: our ViT needs head_dim = hidden_size / heads")
  if family == 'siglip':
    pool = 'map' if v['vision_use_head'] else 'none'
  else:
    pool = 'tok'
  fields = dict(width=width, depth=int(v['num_hidden_layers']), mlp_dim=int(v['intermediate_size']),
                num_heads=heads, patch_size=v['patch_size'], image_size=v['image_size'],
                num_channels=int(v['num_channels']), posemb='learn', pool_type=pool,
                mlp_activation=_HF_ACTIVATIONS[act], layer_norm_epsilon=float(v['layer_norm_eps']))
  return vit_lib.ViTConfig(**{**fields, **overrides})


# ------------------------------------------------------------------ lazy tensors
# Tensors are hf.safetensors_sources (header-indexed, sliced reads); conversions a slice
# cannot express are streaming.Converted sources.


class _Unconvertible(ArraySource):
  """Stands in for a tensor whose shape cannot take our layout; only its shape is ever used."""

  def __init__(self, shape, name):
    self.shape, self.dtype, self.name = tuple(shape), np.dtype(np.float32), name


# ------------------------------------------------------------------ name tables
# Each entry: our unscanned name -> (HF names relative to the tower prefix, fn of those
# arrays giving our layout). fns use only .T / .reshape / slicing / .astype / +, so the same
# function runs on numpy arrays and, under jax.eval_shape, gives the result's shape unread.

_I = lambda x: x
_T = lambda w: w.T                                   # torch Linear [out, in] -> [in, out]
_CONV = lambda w: w.transpose(2, 3, 1, 0)            # [out, in, kh, kw] -> [kh, kw, in, out]


def _heads_in(h: int):
  """Linear weight ``[h*k, d]`` -> our ``[d, h, k]``."""
  return lambda w: w.T.reshape(w.shape[1], h, w.shape[0] // h)


def _heads_bias(h: int):
  return lambda b: b.reshape(h, b.shape[0] // h)


def _heads_out(h: int):
  """out-projection weight ``[d, h*k]`` -> our ``[h, k, d]``."""
  return lambda w: w.T.reshape(h, w.shape[1] // h, w.shape[0])


def _third(j: int, fn: Callable = _I):
  """Row block ``j`` of torch MultiheadAttention's stacked ``in_proj_{weight,bias}`` (q; k; v)."""
  return lambda w: fn(w[j * (w.shape[0] // 3):(j + 1) * (w.shape[0] // 3)])


_Table = dict[str, tuple[tuple[str, ...], Callable]]


def _attention(table: _Table, ours: str, names: Mapping[str, str], heads: int):
  """query/key/value/out of one attention; ``names`` maps ours -> HF module (without .weight)."""
  for a in ('query', 'key', 'value'):
    table[f'{ours}/{a}/kernel'] = ((f'{names[a]}.weight',), _heads_in(heads))
    table[f'{ours}/{a}/bias'] = ((f'{names[a]}.bias',), _heads_bias(heads))
  table[f'{ours}/out/kernel'] = ((f'{names["out"]}.weight',), _heads_out(heads))
  table[f'{ours}/out/bias'] = ((f'{names["out"]}.bias',), _I)


def _norm(table: _Table, ours: str, theirs: str):
  table[f'{ours}/scale'] = ((f'{theirs}.weight',), _I)
  table[f'{ours}/bias'] = ((f'{theirs}.bias',), _I)


def _dense(table: _Table, ours: str, theirs: str):
  table[f'{ours}/kernel'] = ((f'{theirs}.weight',), _T)
  table[f'{ours}/bias'] = ((f'{theirs}.bias',), _I)


def siglip_name_table(depth: int, num_heads: int) -> _Table:
  """``{our unscanned ViT name: (HF SigLIP names, fn)}``, names relative to the tower prefix."""
  t: _Table = {
      'embedding/kernel': (('embeddings.patch_embedding.weight',), _CONV),
      'embedding/bias': (('embeddings.patch_embedding.bias',), _I),
      'pos_embedding': (('embeddings.position_embedding.weight',), lambda p: p[None]),
  }
  _norm(t, 'Transformer/encoder_norm', 'post_layernorm')
  for i in range(depth):
    ours, theirs = f'Transformer/encoderblock_{i}', f'encoder.layers.{i}'
    _norm(t, f'{ours}/LayerNorm_0', f'{theirs}.layer_norm1')
    _norm(t, f'{ours}/LayerNorm_1', f'{theirs}.layer_norm2')
    att = f'{theirs}.self_attn'
    _attention(t, f'{ours}/MultiHeadDotProductAttention_0',
               dict(query=f'{att}.q_proj', key=f'{att}.k_proj', value=f'{att}.v_proj',
                    out=f'{att}.out_proj'), num_heads)
    _dense(t, f'{ours}/MlpBlock_0/Dense_0', f'{theirs}.mlp.fc1')
    _dense(t, f'{ours}/MlpBlock_0/Dense_1', f'{theirs}.mlp.fc2')
  t['MAPHead_0/probe'] = (('head.probe',), _I)
  for j, a in enumerate(('query', 'key', 'value')):
    t[f'MAPHead_0/MultiHeadDotProductAttention_0/{a}/kernel'] = (
        ('head.attention.in_proj_weight',), _third(j, _heads_in(num_heads)))
    t[f'MAPHead_0/MultiHeadDotProductAttention_0/{a}/bias'] = (
        ('head.attention.in_proj_bias',), _third(j, _heads_bias(num_heads)))
  t['MAPHead_0/MultiHeadDotProductAttention_0/out/kernel'] = (
      ('head.attention.out_proj.weight',), _heads_out(num_heads))
  t['MAPHead_0/MultiHeadDotProductAttention_0/out/bias'] = (('head.attention.out_proj.bias',), _I)
  _norm(t, 'MAPHead_0/LayerNorm_0', 'head.layernorm')
  _dense(t, 'MAPHead_0/MlpBlock_0/Dense_0', 'head.mlp.fc1')
  _dense(t, 'MAPHead_0/MlpBlock_0/Dense_1', 'head.mlp.fc2')
  return t


def vit_name_table(depth: int, num_heads: int, qkv_bias: bool = True) -> _Table:
  """``{our unscanned ViT name: (HF ViTModel names, fn)}`` for ``pool_type='tok'``.

  qkv_bias=False (no q/k/v biases in the file): our biases are zeros shaped from the weights.
  """
  pos = 'embeddings.position_embeddings'
  t: _Table = {
      'embedding/kernel': (('embeddings.patch_embeddings.projection.weight',), _CONV),
      'embedding/bias': (('embeddings.patch_embeddings.projection.bias',), _I),
      'pos_embedding': ((pos,), lambda p: p[:, 1:]),
      # HF adds position 0 to its [CLS]; ours gets no position embedding, so fold it in.
      'cls': (('embeddings.cls_token', pos),
              lambda c, p: c.astype(np.float32) + p[:, :1].astype(np.float32)),
  }
  _norm(t, 'Transformer/encoder_norm', 'layernorm')
  for i in range(depth):
    ours, theirs = f'Transformer/encoderblock_{i}', f'encoder.layer.{i}'
    _norm(t, f'{ours}/LayerNorm_0', f'{theirs}.layernorm_before')
    _norm(t, f'{ours}/LayerNorm_1', f'{theirs}.layernorm_after')
    att = f'{theirs}.attention'
    _attention(t, f'{ours}/MultiHeadDotProductAttention_0',
               dict(query=f'{att}.attention.query', key=f'{att}.attention.key',
                    value=f'{att}.attention.value', out=f'{att}.output.dense'), num_heads)
    if not qkv_bias:
      for a in ('query', 'key', 'value'):
        t[f'{ours}/MultiHeadDotProductAttention_0/{a}/bias'] = (
            (f'{att}.attention.{a}.weight',),
            lambda w: np.zeros((num_heads, w.shape[0] // num_heads), np.float32))
    _dense(t, f'{ours}/MlpBlock_0/Dense_0', f'{theirs}.intermediate.dense')
    _dense(t, f'{ours}/MlpBlock_0/Dense_1', f'{theirs}.output.dense')
  return t


# ------------------------------------------------------------------ mapping


def _find_prefix(tensors: Mapping[str, Any], family: str, where: str) -> str:
  anchor = _ANCHORS[family]
  prefixes = sorted(n[:-len(anchor)] for n in tensors if n.endswith(anchor))
  if len(prefixes) != 1:
    raise ValueError(f'{where}: expected exactly one tensor named "<prefix>{anchor}" '
                     f'(the {family} image tower), found prefixes {prefixes}')
  return prefixes[0]


def _count_layers(names, pattern: str) -> int:
  ids = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
  return max(ids) + 1 if ids else 0


def _converted(table: _Table, name: str, ck: Mapping[str, ArraySource], prefix: str,
               notes: dict, used: set) -> Optional[ArraySource]:
  """Our parameter ``name`` as a lazy source, or None (noting why) when the file lacks it."""
  if name not in table:
    return None
  hf_names, fn = table[name]
  parts = [ck.get(n) for n in hf_names]
  notes[name] = 'HF ' + ', '.join(f'{prefix}{n}' for n in hf_names)
  if any(p is None for p in parts):
    return None
  used.update(hf_names)
  try:
    out = jax.eval_shape(fn, *[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in parts])
  except (TypeError, ValueError) as e:  # e.g. [h*k, d] with h*k not divisible by h
    notes[name] += f' {parts[0].shape}: cannot be put in our layout ({e})'
    return _Unconvertible(parts[0].shape, name)
  return Converted(parts, fn, out.shape, out.dtype, f'{prefix}{hf_names[0]} -> {name}')


def map_hf_to_model(ck: Mapping[str, ArraySource], table: _Table, wanted: Mapping[str, Any],
                    prefix: str = '') -> tuple[dict[str, ArraySource], dict[str, str], set]:
  """One source per wanted (unscanned or scanned) parameter -> (sources, notes, used HF names)."""
  mapped, notes, used = {}, {}, set()
  for ours, leaf in wanted.items():
    m_scan = re.fullmatch(r'Transformer/encoderblock/(.+)', ours)
    if m_scan is None:
      src = _converted(table, ours, ck, prefix, notes, used)
      if src is not None:
        mapped[ours] = src
      continue
    rest = m_scan.group(1)
    layers = [_converted(table, f'Transformer/encoderblock_{i}/{rest}', ck, prefix, notes, used)
              for i in range(int(leaf.shape[0]))]
    first = notes.get(f'Transformer/encoderblock_0/{rest}', '?')
    if all(s is not None for s in layers):
      if len({s.shape for s in layers}) == 1:
        mapped[ours] = Stacked(layers, f'{first} (stacked)')
      else:
        mapped[ours] = _Unconvertible((len(layers), *layers[0].shape), ours)
        notes[ours] = f'{first}: layers differ in shape {[s.shape for s in layers]}'
    else:
      notes[ours] = (f'{first} ...: layers {[i for i, s in enumerate(layers) if s is None]} '
                     f'of {len(layers)} are not in the checkpoint')
  return mapped, notes, used


def _ignorable(name: str, family: str, wanted: Mapping[str, Any]) -> bool:
  """HF tensors an image tower does not need."""
  if name.endswith('position_ids'):  # a buffer some older files persisted
    return True
  if family == 'vit':
    return name.startswith('pooler.')
  return name.startswith('head.') and not any(n.startswith('MAPHead_0/') for n in wanted)


def _check_settings(config: vit_lib.ViTConfig, derived: vit_lib.ViTConfig, where: str):
  """Settings shapes cannot show but that change the function computed."""
  diffs = [f'{f}: config has {getattr(config, f)!r}, config.json implies {getattr(derived, f)!r}'
           for f in ('mlp_activation', 'layer_norm_epsilon', 'posemb')
           if getattr(config, f) != getattr(derived, f)]
  if derived.pool_type == 'tok' and config.pool_type != 'tok':
    diffs.append(f"pool_type: config has {config.pool_type!r}, but an HF ViTModel's [CLS] token "
                 "takes part in every attention, so only pool_type='tok' computes the same "
                 'function')
  if diffs:
    raise ValueError(f'ViT config does not match {where}:\n  ' + '\n  '.join(diffs))


def load_hf_vision(path: PathLike, expected: Mapping[str, Any], *, shardings: Any = None,
                   dtype: Any = None, skip: Optional[Callable[[str], bool]] = None,
                   config: Optional[vit_lib.ViTConfig] = None) -> dict[str, Any]:
  """Loads an HF SigLIP / ViT image tower into the layout of ``expected``.

  path: a ``save_pretrained`` directory (or its ``model.safetensors`` / index file) of a
    ``SiglipVisionModel``, ``SiglipModel`` (its ``vision_model``), ``ViTModel`` or
    ``ViTForImageClassification``.
  expected: our ViT's parameter tree (``jax.eval_shape`` of ``init``; e.g. a PaLI model's
    ``params['img']``), scanned or not; build the model with :func:`vit_config_from_hf`.
    A SigLIP ``head`` loads into ``MAPHead_0`` when the tree has one and is skipped otherwise.
    A model of another image size (same patch size) gets the file's position-embedding grid
    resampled to its own (bilinear, as big_vision; logged).
  shardings / dtype / skip: as in :func:`adalink_jax.checkpoints.big_vision.load_big_vision_params`
    (default dtype: each ``expected`` leaf's; ``skip(name)`` leaves are returned as given).
  config: optional; the model's ViTConfig, checked against config.json for the settings a
    shape check cannot see (activation, LayerNorm epsilon, position embedding, ViT pooling).
  Raises FileNotFoundError (what is missing, how to get it) and
  :class:`CheckpointMismatchError` listing every missing, unexpected and mis-shaped name.
  """
  config_path, files = hf.locate(path, what='HF image tower directory',
                                 how_to_get=_HOW_TO_GET)
  where = str(config_path.parent)
  hf_cfg = json.loads(config_path.read_text())
  family, v = _vision_section(hf_cfg)
  derived = vit_config_from_hf(hf_cfg)
  if config is not None:
    _check_settings(config, derived, where)

  wanted = {n: l for n, l in flatten(expected).items() if skip is None or not skip(n)}
  if family == 'vit' and 'cls' not in wanted:
    raise ValueError(f"{where} is an HF ViTModel: its [CLS] token takes part in every attention, "
                     "so it loads only into pool_type='tok' (our ViT has no 'cls' parameter "
                     'here)')
  tensors = hf.safetensors_sources(files)
  prefix = _find_prefix(tensors, family, where)
  ck = {n[len(prefix):]: s for n, s in tensors.items() if n.startswith(prefix)}
  heads = int(v['num_attention_heads'])
  if family == 'siglip':
    table = siglip_name_table(_count_layers(ck, r'encoder\.layers\.(\d+)\.'), heads)
  else:
    table = vit_name_table(_count_layers(ck, r'encoder\.layer\.(\d+)\.'), heads,
                           qkv_bias=bool(v.get('qkv_bias', True)))
  mapped, notes, used = map_hf_to_model(ck, table, wanted, prefix)
  if not isinstance(mapped.get('pos_embedding'), _Unconvertible):  # another image size
    big_vision.resample_pos_embedding(mapped, wanted, notes,
                                      f'{where} ({notes.get("pos_embedding")})')
  unexpected = [f'{prefix}{n}  (HF tensor with no place in the model)' for n in sorted(ck)
                if n not in used and not _ignorable(n, family, wanted)]
  return place(mapped, expected, shardings=shardings, dtype=dtype, skip=skip,
               where=f'HF checkpoint {where!r} (tower prefix "{prefix}")', notes=notes,
               unexpected=unexpected)
