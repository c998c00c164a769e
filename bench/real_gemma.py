"""Step time of the real-weights experiment (issue #15): Gemma 3 270M, batch 16 x 48 tokens.

  python -m bench.real_gemma [--size=270m|tiny] [--methods=adalink,lora,ia3,prompt,adapter,ft]
                             [--batch=16] [--prompt=44] [--answer=4] [--steps=5] [--out=DIR]
                             [--candidates=6]

For each method, one jitted train step (AdamW, fp32, the family's forward and loss exactly as
``configs/mr_gemma3_270m.py`` trains them) on a batch of ``--prompt`` prompt tokens and an
``--answer``-token answer, timed as the median of ``--steps`` steps after one warm-up (compile)
step; AdaLink is also timed with the LM head over every slot (``full_head``: what a plain
decoder-only forward computes) to show what the answer-only head saves. Then the evaluation's
rank classification of one batch over ``--candidates`` labels of ``--answer`` tokens (TREC: 6):
the family's ``score_candidates`` (the prompt prefilled once, every label extends a copy of its
cache) against one full teacher-forced forward per label (the base family's way, what
evaluation did before). Weights are random
(the time does not depend on their values), so no checkpoint is needed; ``--size=tiny`` is the
smoke test's. The target of issue #15: the AdaLink step <= 2.5 s on a quiet 2-core machine.
Writes ``real_gemma.json`` and ``real_gemma.md`` under ``--out`` with the load average.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from adalink_jax import env
from adalink_jax import model_builder
from adalink_jax.families import base
from adalink_jax.models import prefix_lm
from adalink_jax.peft import methods as peft
from adalink_jax.peft import train as peft_train
from bench import common

SIZES = {'270m': 'gemma3_270m', 'tiny': 'gemma3_tiny'}
PEFT = {'adalink': dict(method='adalink', rank=16, modalities=('text',)),
        'lora': dict(method='lora', rank=8, lora_alpha=16.0),
        'ia3': dict(method='ia3'), 'prompt': dict(method='prompt', prompt_length=20),
        'adapter': dict(method='adapter', adapter_dim=64),
        'ft': dict(method='ft', also_freeze=('embedder',))}
TARGET_S = 2.5


def _random_setup(peft_block: dict, args) -> tuple[Any, Any, dict, np.random.Generator]:
  """(family, parameter shapes, a batch of random non-padding tokens, the numpy generator
  that drew them) for ``--size`` with ``peft_block``."""
  config = ml_collections.ConfigDict(dict(
      model=dict(family='gemma', name=SIZES[args.size], dtype='float32', frozen_dtype='float32'),
      peft=peft_block))
  setup = model_builder.build(config)
  b, p, t = args.batch, args.prompt, args.answer
  batch = setup.init_batch(b, p, t)
  shapes = nn.unbox(jax.eval_shape(setup.init, jax.random.key(0), batch))
  rng = np.random.default_rng(0)
  vocab = setup.vocab_size
  batch = dict(batch, encoder_input_tokens=jnp.asarray(rng.integers(3, vocab, (b, p)), jnp.int32),
               decoder_target_tokens=jnp.asarray(rng.integers(3, vocab, (b, t)), jnp.int32),
               decoder_loss_weights=jnp.ones((b, t), jnp.float32))
  return setup, shapes, batch, rng


def _step_time(name: str, peft_block: dict, args, full_head: bool = False) -> dict:
  setup, shapes, batch, _ = _random_setup(peft_block, args)
  model = setup.model
  if full_head:
    model = prefix_lm.PrefixLM(setup.model_config.replace(full_head=True),
                               model.encoder_input_adapter, model.decoder_input_adapter)
  trainable, frozen = peft.split(common.random_params(shapes), setup.trainable)

  def forward(params, batch, rng):
    del rng
    return model.apply({'params': params}, batch['encoder_input_tokens'],
                       batch['decoder_target_tokens'])

  optimizer = optax.adamw(1e-3)
  step = jax.jit(peft_train.make_train_step(model, optimizer, forward=forward))
  state = [trainable, optimizer.init(trainable)]

  def one_step():
    state[0], state[1], metrics = step(state[0], state[1], frozen, batch, None)
    return jax.block_until_ready(metrics['loss'])  # async dispatch: time the step, not its launch

  one_step()  # compile
  times = common.timed(one_step, args.steps)
  counts = peft.param_counts(shapes, setup.trainable)
  return dict(method=name, full_head=full_head, step_s=common.median(times), times=times,
              trainable=counts['trainable'], total=counts['total'])


# How evaluation can score one batch (what each way jits): rank classification alone, one
# teacher-forced forward per label (the base family's way, what evaluation did first) or the
# prompt prefilled once; then greedy decoding beside it, the prompt run twice (decode, then rank)
# or once (``generate_and_score``: what evaluation runs now).
EVAL_WAYS = {
    'rank, a forward per label': lambda setup, cands, n: functools.partial(
        base.BaseModel.score_candidates, setup, candidates=cands),
    'rank, prompt shared': lambda setup, cands, n: functools.partial(
        setup.score_candidates, candidates=cands),
    'decode + rank, prompt run twice': lambda setup, cands, n: lambda params, batch: (
        setup.generate(params, batch, n), setup.score_candidates(params, batch, cands)),
    'decode + rank, prompt run once': lambda setup, cands, n: functools.partial(
        setup.generate_and_score, max_decode_len=n, candidates=cands),
}


def _eval_time(args, way: str) -> dict:
  """Seconds to evaluate one batch ``way`` (:data:`EVAL_WAYS`) over ``--candidates`` labels of
  ``--answer`` tokens, decoding ``--answer`` tokens."""
  setup, shapes, batch, rng = _random_setup(PEFT['adalink'], args)
  params = common.random_params(shapes)
  c = args.candidates
  candidates = rng.integers(3, setup.vocab_size, (c, args.answer)).astype(np.int32)
  candidates[:, -1] = setup.eos_id
  evaluate = jax.jit(EVAL_WAYS[way](setup, candidates, args.answer))
  run = lambda: jax.block_until_ready(evaluate(params, batch))
  run()  # compile
  times = common.timed(run, args.steps)
  return dict(way=way, candidates=c, eval_s=common.median(times), times=times)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', default='270m', choices=sorted(SIZES))
  p.add_argument('--methods', default=','.join(PEFT))
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--prompt', type=int, default=44)
  p.add_argument('--answer', type=int, default=4)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--candidates', type=int, default=6, help='labels ranked (TREC: 6; 0: skip)')
  p.add_argument('--out', default='bench/results')
  p.add_argument('--host_allocator', default='auto', choices=env.HOST_ALLOCATOR_CHOICES,
                 help='adalink_jax.env.reuse_freed_host_memory (auto: what the train command does)')
  args = p.parse_args(argv)
  reused = env.reuse_freed_host_memory(args.host_allocator)
  methods = [m for m in args.methods.split(',') if m]
  unknown = sorted(set(methods) - set(PEFT))
  if unknown:
    p.error(f'--methods: unknown {unknown}; choose from {list(PEFT)}')
  load_before = common.load_average()
  rows = []
  for name in methods:
    rows.append(_step_time(name, PEFT[name], args))
    print(f'[real_gemma {time.strftime("%H:%M:%S")}] {name}: {rows[-1]["step_s"]:.3f} s/step',
          flush=True)
  if 'adalink' in methods:
    rows.append(_step_time('adalink', PEFT['adalink'], args, full_head=True))
  evals = [_eval_time(args, way) for way in EVAL_WAYS] if args.candidates else []
  res = dict(size=args.size, batch=args.batch, tokens=args.prompt + args.answer, rows=rows,
             evaluation=evals,
             host_memory_reused=reused,
             target_s=TARGET_S, load_before=load_before, load_after=common.load_average(),
             machine=common.machine_info())
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'real_gemma.json'), 'w') as f:
    json.dump(res, f, indent=1)
  lines = [f'Gemma 3 {args.size}, batch {args.batch} x {args.prompt}+{args.answer} tokens, fp32, '
           f'AdamW; load {load_before} -> {res["load_after"]}', '',
           '| method | LM head | trainable params | step (s) |', '|---|---|---|---|']
  lines += [f'| {r["method"]} | {"every slot" if r["full_head"] else "answer only"} | '
            f'{r["trainable"]:,} | {r["step_s"]:.3f} |' for r in rows]
  if evals:
    lines += ['', f'Evaluation of one batch: rank classification over {args.candidates} labels '
              f'of {args.answer} tokens, greedy decoding of {args.answer}:', '',
              '| evaluation | seconds |', '|---|---|']
    lines += [f'| {r["way"]} | {r["eval_s"]:.3f} |' for r in evals]
  with open(os.path.join(args.out, 'real_gemma.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return res


if __name__ == '__main__':
  main()
