"""Hugging Face T5 / FLAN-T5 / mT5 ``save_pretrained`` directories -> adalink_jax T5 parameters.

Reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) with the ``safetensors`` library in numpy mode:
no torch, no pickle. HF names map to the t5x names of :mod:`adalink_jax.models.t5`:

  ``shared.weight [vocab, d]``                     -> ``token_embedder/embedding``
  ``{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, heads]``
                                   -> ``{stack}/relpos_bias/rel_embedding [heads, buckets]``
  torch Linear ``*.{q,k,v,o}.weight``, ``DenseReluDense.*.weight`` ``[out, in]``
                                                   -> ``.../kernel [in, out]``
  ``*.layer_norm.weight``, ``*.final_layer_norm.weight`` -> ``.../scale``
  ``lm_head.weight [vocab, d]``                    -> ``decoder/logits_dense/kernel [d, vocab]``

Tying. T5 1.0 multiplies the decoder output by ``d_model**-0.5`` and uses the embedding as
the LM head; T5 1.1 / FLAN-T5 has its own unscaled head. HF <= 4 encodes "1.0" as
``tie_word_embeddings`` (default true); HF >= 5 always writes ``tie_word_embeddings: true``
and says ``scale_decoder_outputs`` instead, and takes ``lm_head.weight`` from the file when it
is present and differs from ``shared.weight``. We follow the same rules: the model gets
``tie_embeddings=True`` only when the output is scaled *and* the head is the embedding; any
other combination loads as an explicit ``logits_dense`` kernel (with the scale folded in).
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from adalink_jax.checkpoints import common
from adalink_jax.models import t5

PathLike = Union[str, os.PathLike]

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
_HOW_TO_GET = (
    'Expected a Hugging Face save_pretrained() directory holding config.json and model.safetensors '
    '(or model.safetensors.index.json plus its shards). On a machine with internet, run e.g.\n'
    '  huggingface-cli download google/flan-t5-base config.json model.safetensors '
    '--local-dir /path/to/flan-t5-base\n'
    'or in Python: T5ForConditionalGeneration.from_pretrained(name).save_pretrained(dir), '
    'then copy the directory here.')

# HF activation names (T5Config.dense_act_fn) -> adalink_jax.models.layers.ACTIVATIONS.
# HF 'gelu' is the exact erf GELU; 'gelu_new' (what 'gated-gelu' selects) is the tanh form.
_HF_ACTIVATIONS = {
    'relu': 'relu', 'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu',
    'silu': 'silu', 'swish': 'silu', 'tanh': 'tanh', 'linear': 'linear',
}
_SUPPORTED_MODEL_TYPES = ('t5', 'mt5')  # same block structure; umt5/longt5 differ


def _scales_decoder_output(cfg: dict) -> bool:
  """HF >= 5 writes ``scale_decoder_outputs``; older configs say ``tie_word_embeddings``."""
  if 'scale_decoder_outputs' in cfg:
    return bool(cfg['scale_decoder_outputs'])
  return cfg.get('tie_word_embeddings', True) is not False


def t5_config_from_hf(config_json: dict, **overrides) -> t5.T5Config:
  """An HF T5 ``config.json`` dict -> :class:`T5Config` (``overrides`` replace fields afterwards).

  ``tie_embeddings`` is True for T5 1.0-style configs (scaled, embedding-tied head); the
  loader turns it off when the file carries a separate ``lm_head.weight``.
  """
  cfg = dict(config_json)
  model_type = cfg.get('model_type', 't5')
  if model_type not in _SUPPORTED_MODEL_TYPES:
    raise ValueError(f'config.json model_type={model_type!r}: only {_SUPPORTED_MODEL_TYPES} '
                     'share the T5 block structure this loader maps')
  proj = cfg.get('feed_forward_proj', 'relu')
  parts = proj.split('-')
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'gated'):
    raise ValueError(f"config.json feed_forward_proj={proj!r}: expected 'ACT' or 'gated-ACT'")
  hf_act = 'gelu_new' if proj == 'gated-gelu' else parts[-1]  # HF's backwards-compat rule
  if hf_act not in _HF_ACTIVATIONS:
    raise ValueError(f'config.json feed_forward_proj={proj!r}: activation {hf_act!r} is not '
                     f'supported; known: {sorted(_HF_ACTIVATIONS)}')
  act = _HF_ACTIVATIONS[hf_act]
  mlp_activations = (act, 'linear') if len(parts) == 2 else (act,)

  def get(key, default=None):
    if key not in cfg and default is None:
      raise ValueError(f'config.json has no {key!r}; is this a T5 config?')
    return cfg.get(key, default)

  eos = cfg.get('eos_token_id', 1)
  eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  pad = cfg.get('pad_token_id', 0)
  pad = 0 if pad is None else pad
  start = cfg.get('decoder_start_token_id')
  num_layers = get('num_layers')
  fields = dict(
      vocab_size=get('vocab_size'), d_model=get('d_model'), num_heads=get('num_heads'),
      d_kv=get('d_kv'), d_ff=get('d_ff'), num_encoder_layers=num_layers,
      num_decoder_layers=cfg.get('num_decoder_layers') or num_layers,
      mlp_activations=mlp_activations, tie_embeddings=_scales_decoder_output(cfg),
      relative_attention_num_buckets=cfg.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=cfg.get('relative_attention_max_distance', 128),
      dropout_rate=float(cfg.get('dropout_rate', 0.1)),
      layer_norm_epsilon=float(cfg.get('layer_norm_epsilon', 1e-6)),
      pad_id=int(pad), eos_id=int(1 if eos is None else eos),
      decoder_start_id=int(pad if start is None else start))
  return t5.T5Config(**{**fields, **overrides})


# ------------------------------------------------------------------ reading files


def _locate(path: PathLike) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """Directory or file path -> (config.json path, safetensors files), with clear errors."""
  p = pathlib.Path(path).expanduser()
  if p.is_file():
    if p.name == INDEX_FILE or p.suffix == '.safetensors':
      p = p.parent
    else:
      raise ValueError(f'{str(p)!r}: pass the save_pretrained directory, {WEIGHTS_FILE} or '
                       f'{INDEX_FILE}')
  if not p.is_dir():
    raise common.missing_checkpoint_error(p, f'HF T5 checkpoint directory ({CONFIG_FILE} + '
                                          f'{WEIGHTS_FILE})', _HOW_TO_GET)
  config = p / CONFIG_FILE
  if not config.is_file():
    raise common.missing_checkpoint_error(config, CONFIG_FILE, _HOW_TO_GET)
  if (p / INDEX_FILE).is_file():
    weight_map = json.loads((p / INDEX_FILE).read_text())['weight_map']
    files = [p / f for f in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
      raise common.missing_checkpoint_error(p, f'shards {absent} listed in {INDEX_FILE}',
                                            _HOW_TO_GET)
    return config, files
  if (p / WEIGHTS_FILE).is_file():
    return config, [p / WEIGHTS_FILE]
  others = sorted(f.name for f in p.iterdir() if f.suffix in ('.bin', '.pt', '.h5', '.msgpack'))
  hint = (f' Found {others}: only safetensors is read (no pickle); re-save with '
          'save_pretrained(dir, safe_serialization=True).' if others else '')
  raise common.missing_checkpoint_error(p, f'{WEIGHTS_FILE} or {INDEX_FILE}', _HOW_TO_GET + hint)


def _read_bf16(file: pathlib.Path, name: str) -> np.ndarray:
  # safetensors' numpy mode cannot build bfloat16 arrays; read the bytes at the offsets
  # the header gives (format: u64-LE header length, JSON header, raw little-endian data).
  with open(file, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    entry = json.loads(f.read(n))[name]
  begin, end = entry['data_offsets']
  count = (end - begin) // 2
  data = np.fromfile(file, dtype=ml_dtypes.bfloat16, count=count, offset=8 + n + begin)
  return data.reshape(entry['shape'])


def read_safetensors(files: list[pathlib.Path]) -> dict[str, np.ndarray]:
  """All tensors of the given safetensors files as numpy arrays (bfloat16 via ml_dtypes)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  tensors = {}
  for file in files:
    with safe_open(str(file), framework='numpy') as f:
      for name in f.keys():
        if name in tensors:
          raise ValueError(f'tensor {name!r} appears in more than one shard ({file.name})')
        if f.get_slice(name).get_dtype() == 'BF16':
          tensors[name] = _read_bf16(file, name)
        else:
          tensors[name] = f.get_tensor(name)
  return tensors


# ------------------------------------------------------------------ name mapping

_Transform = Callable[[np.ndarray], np.ndarray]
_T = lambda x: x.T  # torch Linear [out, in] and Embedding [buckets, heads] -> ours
_I = lambda x: x


def _name_table(cfg: t5.T5Config) -> dict[str, tuple[str, _Transform]]:
  """``{our unscanned name: (HF name, transform)}`` for every tensor except the LM head."""
  table = {'token_embedder/embedding': ('shared.weight', _I)}
  mlp_names = (['wi'] if len(cfg.mlp_activations) == 1 else
               [f'wi_{i}' for i in range(len(cfg.mlp_activations))]) + ['wo']
  attn = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}

  def block(ours: str, hf: str, sublayers: list[tuple[str, str, Optional[str]]]):
    # sublayers: (our norm name, our module name, HF module name or None for the MLP)
    for j, (norm, module, hf_module) in enumerate(sublayers):
      table[f'{ours}/{norm}/scale'] = (f'{hf}.layer.{j}.layer_norm.weight', _I)
      if hf_module is None:
        for m in mlp_names:
          table[f'{ours}/mlp/{m}/kernel'] = (f'{hf}.layer.{j}.DenseReluDense.{m}.weight', _T)
      else:
        for a, h in attn.items():
          table[f'{ours}/{module}/{a}/kernel'] = (f'{hf}.layer.{j}.{hf_module}.{h}.weight', _T)

  for stack, n, norm in (('encoder', cfg.num_encoder_layers, 'encoder_norm'),
                         ('decoder', cfg.num_decoder_layers, 'decoder_norm')):
    table[f'{stack}/relpos_bias/rel_embedding'] = (
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', _T)
    table[f'{stack}/{norm}/scale'] = (f'{stack}.final_layer_norm.weight', _I)
    for i in range(n):
      if stack == 'encoder':
        sub = [('pre_attention_layer_norm', 'attention', 'SelfAttention'),
               ('pre_mlp_layer_norm', 'mlp', None)]
      else:
        sub = [('pre_self_attention_layer_norm', 'self_attention', 'SelfAttention'),
               ('pre_cross_attention_layer_norm', 'encoder_decoder_attention', 'EncDecAttention'),
               ('pre_mlp_layer_norm', 'mlp', None)]
      block(f'{stack}/layers_{i}', f'{stack}.block.{i}', sub)
  return table


# Present in some files, never used by HF's T5 either: copies of the shared embedding and
# a cross-attention position bias that T5 does not apply.
_IGNORED = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight',
            'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight')


def _expected_shapes(cfg: t5.T5Config) -> dict[str, Any]:
  """Flat ``{name: ShapeDtypeStruct}`` of ``T5(cfg).init`` without allocating anything."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  model = t5.T5(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens))
  return common.flatten(nn.unbox(variables['params']))


def _stack_layers(flat: dict[str, np.ndarray], cfg: t5.T5Config) -> dict[str, np.ndarray]:
  """``{stack}/layers_{i}/rest`` -> ``{stack}/layers/rest`` stacked on a leading layers axis."""
  out = {}
  for name, value in flat.items():
    stack, first, *rest = name.split('/')
    if first.startswith('layers_'):
      if first == 'layers_0':
        n = cfg.num_encoder_layers if stack == 'encoder' else cfg.num_decoder_layers
        out['/'.join([stack, 'layers', *rest])] = np.stack(
            [flat['/'.join([stack, f'layers_{i}', *rest])] for i in range(n)])
    else:
      out[name] = value
  return out


def load_hf_t5(path: PathLike, config: Optional[t5.T5Config] = None, dtype: Any = None
               ) -> tuple[t5.T5Config, dict[str, Any]]:
  """Loads an HF T5 / FLAN-T5 / mT5 ``save_pretrained`` directory -> ``(config, params)``.

  path: the directory (or its ``model.safetensors`` / index file).
  config: the model config to load into (e.g. with ``scan_layers``, ``dtype``, ``lora``);
    default: derived from ``config.json`` by :func:`t5_config_from_hf`. Shapes must match
    the checkpoint, and so must the activation, position-bucket distance and norm epsilon.
  dtype: cast every floating tensor to this dtype (e.g. ``jnp.bfloat16`` for frozen
    weights); default keeps the file's dtype. The config's dtypes are left as they are.
  Returns nested plain dicts of numpy arrays, the t5x layout of :class:`t5.T5` for this
  config (stacked under ``{stack}/layers`` when ``scan_layers``). LoRA / bottleneck
  parameters are not in HF files: initialise them and merge them in.
  Raises FileNotFoundError (what is missing, how to get it) and
  :class:`common.CheckpointMismatchError` (every missing / unexpected / mis-shaped name).
  """
  config_path, files = _locate(path)
  hf_cfg = json.loads(config_path.read_text())
  derived = t5_config_from_hf(hf_cfg)
  tensors = read_safetensors(files)
  scale = _scales_decoder_output(hf_cfg)

  # The head: lm_head.weight when the file has one distinct from the embedding, else shared.
  shared = tensors.get('shared.weight')
  if shared is None:  # HF ties symmetrically: any embedding copy can stand in for it
    for alias in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight', 'lm_head.weight'):
      if alias in tensors:
        shared = tensors['shared.weight'] = tensors[alias]
        break
  head = tensors.get('lm_head.weight')
  head_is_embedding = head is None or (
      shared is not None and head.shape == shared.shape and np.array_equal(head, shared))
  derived = derived.replace(tie_embeddings=scale and head_is_embedding)
  cfg = derived if config is None else config
  # Shapes come from the plain model: intrusive baselines add parameters HF files lack.
  shape_cfg = cfg.replace(scan_layers=False, lora=None, bottleneck=None, remat_policy='none')

  table = _name_table(shape_cfg)
  flat, notes, used = {}, {}, set(_IGNORED) | {'lm_head.weight'}
  for ours, (hf, transform) in table.items():
    notes[ours] = f'HF {hf}'
    if hf in tensors:
      flat[ours] = transform(tensors[hf])
      used.add(hf)
  if not shape_cfg.tie_embeddings:
    notes['decoder/logits_dense/kernel'] = 'HF lm_head.weight'
    source = shared if head is None else head
    if source is not None:
      kernel = source.T
      if scale:  # a scaled head loaded as an explicit kernel: fold d_model**-0.5 into it
        kernel = (kernel.astype(np.float32) * np.float32(cfg.d_model ** -0.5)).astype(kernel.dtype)
      flat['decoder/logits_dense/kernel'] = kernel
  elif not head_is_embedding or not scale:
    raise ValueError(
        'config.tie_embeddings=True (scaled, embedding-tied LM head, T5 1.0) but the checkpoint '
        + ('has a separate lm_head.weight' if not head_is_embedding else
           'does not scale decoder outputs (T5 1.1 / FLAN-T5)')
        + '; pass tie_embeddings=False')
  for name in _IGNORED[:2]:
    if name in tensors and shared is not None and not np.array_equal(tensors[name], shared):
      raise ValueError(f'{name} differs from shared.weight; separate encoder/decoder '
                       'embeddings are not supported by t5.T5')
  unmapped = [f'{n}  (HF tensor with no place in the model)' for n in tensors if n not in used]
  common.check_tree(_expected_shapes(shape_cfg), flat, source=f'HF checkpoint {str(path)!r}',
                    extra_unexpected=unmapped, notes=notes)

  # Settings that shape checks cannot see but that change the function computed.
  if config is not None:
    diffs = [f'{field}: config has {getattr(config, field)!r}, {CONFIG_FILE} implies '
             f'{getattr(derived, field)!r}'
             for field in ('mlp_activations', 'relative_attention_max_distance',
                           'layer_norm_epsilon')
             if getattr(config, field) != getattr(derived, field)]
    if diffs:
      raise ValueError(f'config does not match {config_path}:\n  ' + '\n  '.join(diffs))

  if dtype is not None:
    dtype = jnp.dtype(dtype)
    flat = {n: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
            for n, v in flat.items()}
  if cfg.scan_layers:
    flat = _stack_layers(flat, cfg)
  return cfg, common.unflatten(flat)
