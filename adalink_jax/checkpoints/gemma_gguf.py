"""A llama.cpp GGUF Gemma 3 file -> (:class:`GemmaConfig`, params) and its SentencePiece tokenizer.

Glue between the GGUF reader and the HF Gemma mapping, so a GGUF loads through exactly the code
an HF checkpoint does::

  gguf.config_from_gguf  -> hf_gemma.config_from_hf       (HF Gemma3TextConfig dict -> GemmaConfig)
  gguf.read_gguf_tensors -> hf_gemma.params_from_sources  (lazy HF-named fp32 tensors -> our tree,
                                                           streaming.place: host or shardings)
  gguf.tokenizer_from_gguf                             (SentencePiece; adds no BOS: prepend
                                                        ``cfg.bos_id`` as HF's tokenizer does)

Memory: a tensor is dequantised only when it is placed (in 16 MiB row blocks, and only the rows
of each device's shard), and cast to ``param_dtype`` at once, so the host peak is the tree in
``param_dtype`` (none of it with ``shardings``) plus fp32 transients of about one embedding (the
largest tensor: 262144 x 640 fp32 = 640 MiB for Gemma 3 270M), never a second fp32 copy of the
model. An ``lm_head.weight`` is compared with the embedding block by block.

Open the file once (:class:`~adalink_jax.checkpoints.gguf.GGUFFile`, ~8 s of header parsing for
Gemma 3's 262k-token vocabulary) and pass it to both functions.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import jax.numpy as jnp

from adalink_jax.checkpoints import gguf
from adalink_jax.checkpoints import hf_gemma
from adalink_jax.checkpoints.streaming import ON_HOST
from adalink_jax.models import gemma

PathOrFile = Union[str, os.PathLike, gguf.GGUFFile]
_EMBED = 'model.embed_tokens.weight'


def _open(path: PathOrFile) -> gguf.GGUFFile:
  return path if isinstance(path, gguf.GGUFFile) else gguf.GGUFFile(path)


def _token_count(f: gguf.GGUFFile) -> int:
  tokens = f.reader.fields.get('tokenizer.ggml.tokens')
  if tokens is None:
    raise gguf.GGUFError(f'{f.path!r} has no tokenizer.ggml.tokens: the file carries no '
                         'vocabulary, so token ids cannot be checked against the embedding; '
                         'convert the model with llama.cpp (convert_hf_to_gguf.py)')
  return len(tokens.data)


def check_vocab(f: gguf.GGUFFile, cfg: gemma.GemmaConfig, embed_rows: Optional[int]) -> None:
  """Raises one clear line unless tokenizer size == ``cfg.vocab_size`` == embedding rows.

  A mismatch means token ids index the wrong rows (or past the table), which would run silently
  and generate garbage, so it is refused before any tensor is dequantised.
  """
  tokens = _token_count(f)
  if embed_rows is not None and embed_rows != cfg.vocab_size:
    raise gguf.GGUFError(
        f'{f.path!r}: token_embd.weight has {embed_rows} rows but the config says vocab_size='
        f'{cfg.vocab_size} (GGUF vocabulary: {tokens} tokens); the embedding and the vocabulary '
        'do not belong together: re-convert the model with llama.cpp, or drop a vocab_size '
        'override')
  if tokens != cfg.vocab_size:
    raise gguf.GGUFError(
        f'{f.path!r}: the GGUF vocabulary (tokenizer.ggml.tokens) has {tokens} tokens but the '
        f'model has vocab_size={cfg.vocab_size} embedding rows; token ids would index the wrong '
        'rows: re-convert the model with llama.cpp so both come from the same checkpoint')


def load_gguf_gemma(path: PathOrFile, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, shardings: Any = None,
                    **overrides) -> tuple[gemma.GemmaConfig, dict[str, Any]]:
  """A Gemma 3 ``.gguf`` (path or opened :class:`GGUFFile`) -> (config, params).

  dtype / param_dtype: activations / stored weights (``overrides`` set other config fields,
  e.g. ``scan_layers=True``). shardings: None -> numpy arrays on the host (as
  ``hf_gemma.load_hf_gemma``); one ``jax.sharding.Sharding`` for every leaf, or a tree of them
  shaped like the params -> ``jax.Array`` leaves. Weights are dequantised to fp32 exactly as
  transformers' GGUF loader does, then cast to ``param_dtype``.
  """
  f = _open(path)
  cfg = hf_gemma.config_from_hf(gguf.config_from_gguf(f), dtype=dtype, param_dtype=param_dtype,
                                **overrides)
  tensors = gguf.read_gguf_tensors(f)
  embed = tensors.sources.get(_EMBED)
  check_vocab(f, cfg, None if embed is None else embed.shape[0])
  params = hf_gemma.params_from_sources(
      tensors.sources, cfg, shardings=ON_HOST if shardings is None else shardings,
      where=f'GGUF file {f.path!r}')
  return cfg, params


def load_gguf_tokenizer(path: PathOrFile, cfg: Optional[gemma.GemmaConfig] = None,
                        model_file: Optional[Union[str, os.PathLike]] = None) -> Any:
  """The file's ``SentencePieceProcessor`` (also written to ``model_file`` when given).

  With ``cfg`` (from :func:`load_gguf_gemma`), refuses a vocabulary whose size is not
  ``cfg.vocab_size``. Encoding adds no BOS: prepend ``cfg.bos_id`` as HF's tokenizer does.
  """
  f = _open(path)
  if cfg is not None:
    check_vocab(f, cfg, None)
  return gguf.tokenizer_from_gguf(f, model_file=model_file)
