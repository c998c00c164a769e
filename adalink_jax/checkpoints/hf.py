"""Hugging Face T5 / FLAN-T5 / mT5 ``save_pretrained`` directories -> adalink_jax T5 parameters.

Reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``, which must lie inside the directory) straight from the
safetensors layout: no torch, no pickle. Tensors are lazy sources read slice by slice, so
:func:`load_hf_t5_params` streams each device's shard into place (scanned stacks included)
without the checkpoint ever being on the host whole. HF names map to the t5x names of
:mod:`adalink_jax.models.t5`:

  ``shared.weight [vocab, d]``                     -> ``token_embedder/embedding``
  ``{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, heads]``
                                   -> ``{stack}/relpos_bias/rel_embedding [heads, buckets]``
  torch Linear ``*.{q,k,v,o}.weight``, ``DenseReluDense.*.weight`` ``[out, in]``
                                                   -> ``.../kernel [in, out]``
  ``*.layer_norm.weight``, ``*.final_layer_norm.weight`` -> ``.../scale``
  ``lm_head.weight [vocab, d]``                    -> ``decoder/logits_dense/kernel [d, vocab]``

Tying and scaling. The head is ``lm_head.weight`` when the file has one that differs from
``shared.weight``, else the embedding (transformers 5 ties symmetrically and unties a head the
file stores separately). Whether the decoder output is multiplied by ``d_model**-0.5`` before
the head is what HF's own class for the ``model_type`` does (:func:`scales_decoder_output`),
not ``tie_word_embeddings`` alone: transformers 5 writes ``tie_word_embeddings: true`` for
every T5-family model. The model gets ``tie_embeddings=True`` only when the output is scaled
*and* the head is the embedding; any other combination loads as an explicit ``logits_dense``
kernel (with the scale folded in).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import struct
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from adalink_jax.checkpoints import common
from adalink_jax.checkpoints.streaming import (ON_HOST, ArraySource, Stacked, Transposed,
                                               normalize_index, place)
from adalink_jax.models import t5

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)

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
# feed_forward_proj when config.json omits it: each HF config class's own default.
_DEFAULT_PROJ = {'t5': 'relu', 'mt5': 'gated-gelu'}
_SUPPORTED_MODEL_TYPES = tuple(_DEFAULT_PROJ)
_UNSUPPORTED_WHY = {  # same family, other blocks: refused with the reason
    'umt5': 'UMT5 gives every layer its own relative position bias',
    'longt5': 'LongT5 uses local / transient-global attention',
}


def scales_decoder_output(cfg: Mapping[str, Any]) -> bool:
  """Whether HF's class for this ``config.json`` multiplies the decoder output by ``d_model**-0.5``.

  transformers 5 (what ``from_pretrained`` does, checked by tests/test_hf_t5_parity.py):
    ``t5`` (T5, T5 1.1, FLAN-T5): ``scale_decoder_outputs`` when the file has it (HF 5 writes
      it next to ``tie_word_embeddings: true``), else ``tie_word_embeddings`` (HF 4's encoding:
      absent or true for T5 1.0, false for T5 1.1 / FLAN-T5).
    ``mt5``: never; ``MT5ForConditionalGeneration`` has no scaling and ``MT5Config`` forces
      ``tie_word_embeddings`` to true on load and save, so that key says nothing here.
  """
  if cfg.get('model_type', 't5') == 'mt5':
    if cfg.get('tie_word_embeddings') is True and _written_by_hf4(cfg):
      # HF 4's MT5 scaled when tie_word_embeddings was true (official mT5 files say false).
      log.warning('config.json: model_type mt5 with tie_word_embeddings=true written by '
                  'transformers %s, which scaled the decoder output by d_model**-0.5; loading '
                  'unscaled, as transformers >= 5 does', cfg.get('transformers_version'))
    return False
  if 'scale_decoder_outputs' in cfg:
    return bool(cfg['scale_decoder_outputs'])
  return cfg.get('tie_word_embeddings', True) is not False


def _written_by_hf4(cfg: Mapping[str, Any]) -> bool:
  version = str(cfg.get('transformers_version', ''))
  return bool(re.match(r'[0-4]\.', version))


def t5_config_from_hf(config_json: dict, **overrides) -> t5.T5Config:
  """An HF T5 ``config.json`` dict -> :class:`T5Config` (``overrides`` replace fields afterwards).

  ``tie_embeddings`` is True when HF's class scales the decoder output
  (:func:`scales_decoder_output`: T5 1.0-style configs); the loader turns it off when the
  file carries a separate ``lm_head.weight`` (and folds the scale into that head).
  """
  cfg = dict(config_json)
  model_type = cfg.get('model_type', 't5')
  if model_type not in _SUPPORTED_MODEL_TYPES:
    why = _UNSUPPORTED_WHY.get(model_type, 'its blocks are not those of T5')
    raise ValueError(f'config.json model_type={model_type!r} is not supported: {why}, which '
                     f't5.T5 does not implement; only {_SUPPORTED_MODEL_TYPES} checkpoints '
                     '(T5, T5 1.1, FLAN-T5, mT5) load')
  proj = cfg.get('feed_forward_proj', _DEFAULT_PROJ[model_type])
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
      mlp_activations=mlp_activations, tie_embeddings=scales_decoder_output(cfg),
      relative_attention_num_buckets=cfg.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=cfg.get('relative_attention_max_distance', 128),
      dropout_rate=float(cfg.get('dropout_rate', 0.1)),
      layer_norm_epsilon=float(cfg.get('layer_norm_epsilon', 1e-6)),
      pad_id=int(pad), eos_id=int(1 if eos is None else eos),
      decoder_start_id=int(pad if start is None else start))
  return t5.T5Config(**{**fields, **overrides})


# ------------------------------------------------------------------ reading files


def locate(path: PathLike, *, what: str = 'HF T5 checkpoint directory',
           how_to_get: str = _HOW_TO_GET) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """A ``save_pretrained`` directory (or its weights / index file) -> (config.json, safetensors).

  what / how_to_get: the caller's words for a missing directory, config.json or weights
  (an image tower or a Gemma directory says so and how to get one).
  """
  p = pathlib.Path(path).expanduser()
  if p.is_file():
    if p.name == INDEX_FILE or p.suffix == '.safetensors':
      p = p.parent
    else:
      raise ValueError(f'{str(p)!r}: pass the save_pretrained directory, {WEIGHTS_FILE} or '
                       f'{INDEX_FILE}')
  if not p.is_dir():
    raise common.missing_checkpoint_error(p, f'{what} ({CONFIG_FILE} + {WEIGHTS_FILE})',
                                          how_to_get)
  config = p / CONFIG_FILE
  if not config.is_file():
    raise common.missing_checkpoint_error(config, CONFIG_FILE, how_to_get)
  if (p / INDEX_FILE).is_file():
    weight_map = json.loads((p / INDEX_FILE).read_text()).get('weight_map')
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) for f in weight_map.values()):
      raise ValueError(f'{p / INDEX_FILE}: "weight_map" must map tensor names to shard file '
                       'names; re-save the checkpoint with save_pretrained()')
    # The index is data: a shard named '../x' or '/x' would read files outside the checkpoint.
    files = [pathlib.Path(common.resolve_inside(p, f, str(p / INDEX_FILE)))
             for f in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
      raise common.missing_checkpoint_error(p, f'shards {absent} listed in {INDEX_FILE}',
                                            how_to_get)
    return config, files
  if (p / WEIGHTS_FILE).is_file():
    return config, [p / WEIGHTS_FILE]
  others = sorted(f.name for f in p.iterdir() if f.suffix in ('.bin', '.pt', '.h5', '.msgpack'))
  hint = (f' Found {others}: only safetensors is read (no pickle); re-save with '
          'save_pretrained(dir, safe_serialization=True).' if others else '')
  raise common.missing_checkpoint_error(p, f'{WEIGHTS_FILE} or {INDEX_FILE}', how_to_get + hint)


_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
              'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
              'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
_BLOCK_BYTES = 4 << 20  # rows read per step of a slice read: bounds the transient buffer


class SafetensorsSource(ArraySource):
  """One tensor of a safetensors file; ``read(index)`` reads only the rows of the slice.

  The data is raw little-endian C-order at a known offset, so a slice is read in blocks of
  whole rows (at most ``_BLOCK_BYTES`` at a time) and cut to the requested columns: host
  memory is the slice plus one block, whatever the tensor's size.
  """

  def __init__(self, file: pathlib.Path, name: str, shape, dtype, offset: int):
    self.file, self.name, self.offset = file, name, offset
    self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)

  def read(self, index=()) -> np.ndarray:
    idx = normalize_index(index, self.shape)
    if not self.shape:
      return np.fromfile(self.file, self.dtype, count=1, offset=self.offset).reshape(())
    rest = self.shape[1:]
    row = int(np.prod(rest, dtype=np.int64)) * self.dtype.itemsize
    out = np.empty(tuple(s.stop - s.start for s in idx), self.dtype)
    step = max(1, _BLOCK_BYTES // max(row, 1))
    first, stop = idx[0].start, idx[0].stop
    for r0 in range(first, stop, step):
      r1 = min(stop, r0 + step)
      block = np.fromfile(self.file, self.dtype, count=(r1 - r0) * (row // self.dtype.itemsize),
                          offset=self.offset + r0 * row).reshape((r1 - r0,) + rest)
      out[r0 - first:r1 - first] = block[(slice(None),) + idx[1:]]
    return out


def safetensors_sources(files: list[pathlib.Path]) -> dict[str, SafetensorsSource]:
  """Every tensor of the given files as a lazy source, from the headers alone (no data read).

  Format: u64-LE header length, JSON header ``{name: {dtype, shape, data_offsets}}``, data.
  """
  out: dict[str, SafetensorsSource] = {}
  for file in files:
    size = file.stat().st_size
    with open(file, 'rb') as f:
      (n,) = struct.unpack('<Q', f.read(8))
      if n > size - 8:
        raise ValueError(f'{file}: not a safetensors file (header length {n} > file size)')
      header = json.loads(f.read(n))
    for name, entry in header.items():
      if name == '__metadata__':
        continue
      if name in out:
        raise ValueError(f'tensor {name!r} appears in more than one shard ({file.name})')
      if entry.get('dtype') not in _ST_DTYPES:
        raise ValueError(f'{file}: tensor {name!r} has dtype {entry.get("dtype")}, which is not '
                         f'supported ({sorted(_ST_DTYPES)} are)')
      dtype = np.dtype(_ST_DTYPES[entry['dtype']])
      begin, end = entry['data_offsets']
      nbytes = int(np.prod(entry['shape'], dtype=np.int64)) * dtype.itemsize
      if end - begin != nbytes or begin < 0 or 8 + n + end > size:
        raise ValueError(f'{file}: tensor {name!r} (shape {entry["shape"]}, {entry["dtype"]}) '
                         f'has data offsets {[begin, end]} that do not fit the file; it is '
                         'truncated or corrupt, download it again')
      out[name] = SafetensorsSource(file, name, entry['shape'], dtype, 8 + n + begin)
  return out


def same_values(a: ArraySource, b: ArraySource) -> bool:
  """Elementwise equality of two sources, compared a block of rows at a time."""
  if a.shape != b.shape:
    return False
  if not a.shape:
    return bool(np.array_equal(a.read(), b.read()))
  row = max(1, int(np.prod(a.shape[1:], dtype=np.int64)) * max(a.dtype.itemsize, 1))
  step = max(1, _BLOCK_BYTES // row)
  return all(np.array_equal(a.read((slice(r, r + step),)), b.read((slice(r, r + step),)))
             for r in range(0, a.shape[0], step))


class _ScaledHead(ArraySource):
  """A scaled LM head as an explicit kernel: ``x * d_model**-0.5`` in fp32, in x's dtype."""

  def __init__(self, base: ArraySource, factor: float):
    self.base, self.factor = base, factor
    self.name, self.shape, self.dtype = f'{base.name} * {factor:.6g}', base.shape, base.dtype

  def children(self):
    return (self.base,)

  def read(self, index=()) -> np.ndarray:
    x = self.base.read(index)
    return (x.astype(np.float32) * np.float32(self.factor)).astype(x.dtype)


# ------------------------------------------------------------------ name mapping

_Transform = Callable[[ArraySource], ArraySource]
_T = Transposed  # torch Linear [out, in] and Embedding [buckets, heads] -> ours
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


class _Opened:
  """A checkpoint's config and lazily read tensors, with the LM-head facts settled (nothing read
  but the headers, and the head / embedding copies compared block by block)."""

  def __init__(self, path: PathLike, config: Optional[t5.T5Config]):
    self.path = path
    self.config_path, files = locate(path)
    hf_cfg = json.loads(self.config_path.read_text())
    self.tensors: dict[str, ArraySource] = safetensors_sources(files)
    derived = t5_config_from_hf(hf_cfg)
    self.scale = derived.tie_embeddings  # scales_decoder_output(hf_cfg), decided (and logged) once
    tensors = self.tensors
    # The head: lm_head.weight when the file has one distinct from the embedding, else shared.
    self.shared = tensors.get('shared.weight')
    if self.shared is None:  # HF ties symmetrically: any embedding copy can stand in for it
      for alias in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight',
                    'lm_head.weight'):
        if alias in tensors:
          self.shared = tensors['shared.weight'] = tensors[alias]
          break
    self.head = tensors.get('lm_head.weight')
    self.head_is_embedding = self.head is None or (
        self.shared is not None and same_values(self.head, self.shared))
    self.derived = derived.replace(tie_embeddings=self.scale and self.head_is_embedding)
    self.cfg = self.derived if config is None else config
    for name in _IGNORED[:2]:
      if name in tensors and self.shared is not None and not same_values(tensors[name],
                                                                           self.shared):
        raise ValueError(f'{name} differs from shared.weight; separate encoder/decoder '
                         'embeddings are not supported by t5.T5')

  def check_settings(self, config: Optional[t5.T5Config]):
    """Settings that shape checks cannot see but that change the function computed."""
    if config is None:
      return
    diffs = [f'{field}: config has {getattr(config, field)!r}, {CONFIG_FILE} implies '
             f'{getattr(self.derived, field)!r}'
             for field in ('mlp_activations', 'relative_attention_max_distance',
                           'layer_norm_epsilon')
             if getattr(config, field) != getattr(self.derived, field)]
    if diffs:
      raise ValueError(f'config does not match {self.config_path}:\n  ' + '\n  '.join(diffs))


def _map_to_model(ck: _Opened, wanted: Mapping[str, Any]
                  ) -> tuple[dict[str, ArraySource], dict[str, str], list[str]]:
  """One lazy source per wanted name (unscanned ``layers_<i>`` or scanned ``layers``).

  Returns (sources, notes naming the HF tensor behind each name, unmapped HF tensors).
  A scanned stack is a :class:`Stacked` of per-layer sources: each device's shard reads
  its slice of every layer, so no stack is ever built whole on the host.
  """
  cfg = ck.cfg
  table = _name_table(cfg.replace(scan_layers=False, hooks=()))
  used = set(_IGNORED) | {'lm_head.weight'}
  notes = {ours: f'HF {hf}' for ours, (hf, _) in table.items()}

  def source(ours: str) -> Optional[ArraySource]:
    hf, transform = table[ours]
    if hf not in ck.tensors:
      return None
    used.add(hf)
    return transform(ck.tensors[hf])

  mapped: dict[str, ArraySource] = {}
  for ours, leaf in wanted.items():
    m_scan = re.fullmatch(r'(encoder|decoder)/layers/(.+)', ours)
    if ours == 'decoder/logits_dense/kernel':
      notes[ours] = 'HF lm_head.weight'
      head = ck.shared if ck.head is None else ck.head
      if head is not None:
        kernel = Transposed(head)
        # A scaled head loaded as an explicit kernel: fold d_model**-0.5 into it.
        mapped[ours] = _ScaledHead(kernel, cfg.d_model ** -0.5) if ck.scale else kernel
    elif m_scan:
      stack, rest = m_scan.groups()
      names = [f'{stack}/layers_{i}/{rest}' for i in range(int(leaf.shape[0]))]
      if not all(n in table for n in names):
        continue
      notes[ours] = notes[names[0]] + ' (one per layer, stacked)'
      layers = [source(n) for n in names]
      if any(p is None for p in layers):
        notes[ours] += f': layers {[i for i, p in enumerate(layers) if p is None]} are missing'
      elif len({p.shape for p in layers}) > 1:
        notes[ours] += f': layers differ in shape {[p.shape for p in layers]}'
      else:
        mapped[ours] = Stacked(layers, f'{stack}.block.*: {rest}')
    elif ours in table:
      src = source(ours)
      if src is not None:
        mapped[ours] = src
  if 'decoder/logits_dense/kernel' not in wanted and (not ck.head_is_embedding or not ck.scale):
    raise ValueError(
        'config.tie_embeddings=True (scaled, embedding-tied LM head, T5 1.0) but the checkpoint '
        + ('has a separate lm_head.weight' if not ck.head_is_embedding else
           'does not scale decoder outputs (T5 1.1 / FLAN-T5 / mT5)')
        + '; pass tie_embeddings=False')
  unmapped = [f'{n}  (HF tensor with no place in the model)' for n in ck.tensors
              if n not in used]
  return mapped, notes, unmapped


def load_hf_t5_params(path: PathLike, expected: Mapping[str, Any], *,
                      config: Optional[t5.T5Config] = None, shardings: Any = None,
                      dtype: Any = None, skip: Optional[Callable[[str], bool]] = None
                      ) -> dict[str, Any]:
  """Streams an HF T5 checkpoint into the layout of ``expected``, one array at a time.

  path: the ``save_pretrained`` directory (or its ``model.safetensors`` / index file).
  expected: the model's parameter tree (``jax.eval_shape`` of ``init`` or the initialised
    params; unboxed or with flax boxes), scanned or not, for ``config`` (default: derived
    from ``config.json``; checked against it as in :func:`load_hf_t5`).
  shardings / dtype / skip: as in :func:`adalink_jax.checkpoints.t5x.load_t5x_params`
    (default dtype: each ``expected`` leaf's; ``skip(name)`` leaves are returned as given).
  Each device's shard is read from the file (only the rows it needs) and cast on its own,
  so host memory stays bounded by about one array, never the whole checkpoint.
  Returns a nested dict of ``jax.Array`` shaped like ``expected``.
  """
  ck = _Opened(path, config)
  wanted = {n: v for n, v in common.flatten(expected).items() if skip is None or not skip(n)}
  mapped, notes, unmapped = _map_to_model(ck, wanted)
  return _place(ck, config, mapped, expected, shardings=shardings, dtype=dtype, skip=skip,
                notes=notes, unexpected=unmapped)


def _place(ck: _Opened, config: Optional[t5.T5Config], mapped, expected, **kwargs):
  """Names and shapes first (every mismatch at once), then the settings, then the arrays."""
  return place(mapped, expected, where=f'HF checkpoint {str(ck.path)!r}',
               on_checked=lambda: ck.check_settings(config), **kwargs)


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
  config (stacked under ``{stack}/layers`` when ``scan_layers``), read one array at a time
  (the result is the only copy on the host). LoRA / bottleneck parameters are not in HF
  files: initialise them and merge them in. To load straight into device shardings, use
  :func:`load_hf_t5_params`.
  Raises FileNotFoundError (what is missing, how to get it) and
  :class:`common.CheckpointMismatchError` (every missing / unexpected / mis-shaped name).
  """
  ck = _Opened(path, config)
  # Shapes come from the plain model: intrusive baselines add parameters HF files lack.
  wanted = _expected_shapes(ck.cfg.replace(hooks=(), remat_policy='none'))
  mapped, notes, unmapped = _map_to_model(ck, wanted)
  # The file's dtypes unless dtype is given: the expected leaves carry no dtype to cast to.
  as_stored = {n: jax.ShapeDtypeStruct(v.shape, mapped[n].dtype if n in mapped else v.dtype)
               for n, v in wanted.items()}
  return ck.cfg, _place(ck, config, mapped, as_stored, shardings=ON_HOST, dtype=dtype,
                        notes=notes, unexpected=unmapped)
