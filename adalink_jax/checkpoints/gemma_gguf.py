"""A llama.cpp GGUF Gemma 3 file -> (:class:`GemmaConfig`, params) and its SentencePiece tokenizer.

Glue between the GGUF reader and the HF Gemma mapping, so a GGUF loads through exactly the code
an HF checkpoint does::

  gguf.config_from_gguf  -> hf_gemma.config_from_hf   (HF Gemma3TextConfig dict -> GemmaConfig)
  gguf.read_gguf_tensors -> hf_gemma.params_from_hf   (lazy HF-named fp32 arrays -> our tree)
  gguf.tokenizer_from_gguf                             (SentencePiece; adds no BOS: prepend
                                                        ``cfg.bos_id`` as HF's tokenizer does)

Memory: ``read_gguf_tensors`` dequantises a tensor only when ``params_from_hf`` looks it up, and
each one is cast to ``param_dtype`` at once, so the host peak is the tree in ``param_dtype`` plus
fp32 transients of about one embedding (the largest tensor: 262144 x 640 fp32 = 640 MiB for Gemma 3
270M), not a second fp32 copy of the model. With ``shardings`` the leaves are then placed one at a
time and each host copy is dropped as soon as its device copy exists.

Open the file once (:class:`~adalink_jax.checkpoints.gguf.GGUFFile`, ~8 s of header parsing for
Gemma 3's 262k-token vocabulary) and pass it to both functions.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax.checkpoints import common
from adalink_jax.checkpoints import gguf
from adalink_jax.checkpoints import hf_gemma
from adalink_jax.models import gemma

PathOrFile = Union[str, os.PathLike, gguf.GGUFFile]
_EMBED = 'model.embed_tokens.weight'
_BLOCK_BYTES = 16 << 20  # fp32 rows dequantised per read: bounds gguf's dequantize temporaries


class _StreamedTensors(Mapping[str, np.ndarray]):
  """HF name -> fp32 array, dequantised in row blocks into one preallocated array.

  gguf's ``dequantize`` needs ~2x its output in temporaries (measured: 1.45 GiB peak for the
  640 MiB embedding at once, 0.84 GiB in 16 MiB blocks), so rows are read a block at a time.
  The last array read is kept and returned again for the same name: ``params_from_hf`` looks
  the embedding up twice (to compare with an ``lm_head``), and a second dequantisation would
  hold two 640 MiB copies at once.
  """

  def __init__(self, sources: Mapping[str, Any]):
    self.sources = sources
    self._last: tuple[Optional[str], Any] = (None, None)

  def __getitem__(self, name: str) -> np.ndarray:
    if self._last[0] == name:
      return self._last[1]
    self._last = (None, None)  # free the previous tensor before dequantising the next
    src = self.sources[name]
    if len(src.shape) < 2:
      out = src.read()
    else:
      out = np.empty(src.shape, np.float32)
      rows = max(1, _BLOCK_BYTES // (4 * int(np.prod(src.shape[1:]))))
      for start in range(0, src.shape[0], rows):
        out[start:start + rows] = src.read((slice(start, start + rows),))
    self._last = (name, out)
    return out

  def __iter__(self) -> Iterator[str]:
    return iter(self.sources)

  def __len__(self) -> int:
    return len(self.sources)


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
  _check_shardings(shardings, cfg)
  params = hf_gemma.params_from_hf(_StreamedTensors(tensors.sources), cfg)
  if shardings is not None:
    params = _place(params, shardings)
  return cfg, params


def _check_shardings(shardings: Any, cfg: gemma.GemmaConfig) -> None:
  """Refuses a shardings tree without exactly the params' paths (before anything is read)."""
  if not isinstance(shardings, Mapping):
    return
  want = set(common.flatten(gemma.param_shapes(cfg)))
  got = set(common.flatten(shardings))
  if got != want:
    missing, extra = sorted(want - got), sorted(got - want)
    raise ValueError(f'load_gguf_gemma: the shardings tree does not match the params: no '
                     f'sharding for {missing[:3]}, shardings for unknown {extra[:3]}; pass one '
                     'Sharding, or a tree with exactly the paths of gemma.param_shapes(cfg)')


def _place(params: dict[str, Any], shardings: Any) -> dict[str, Any]:
  """Host tree -> ``jax.Array`` tree, one leaf at a time (each host copy freed once placed).

  shardings: one ``Sharding`` for all leaves, or a tree with the params' structure.
  """
  flat = common.flatten(params)
  params.clear()  # the flat dict now holds the only references, so popping frees each leaf
  flat_sh = common.flatten(shardings) if isinstance(shardings, Mapping) else None
  out = {}
  for name in sorted(flat):
    out[name] = jax.device_put(flat.pop(name), shardings if flat_sh is None else flat_sh[name])
  return common.unflatten(out)


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
