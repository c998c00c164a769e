"""Peer benchmark: our train step against HF transformers + PEFT (PyTorch CPU), same shapes.

  python -m bench.peer --out=bench/results/<name> [--size=tiny|full] [--models=t5_small]
                       [--methods=ft,adalink,lora,prompt,adapter] [--steps=5] [--warmup=2]
                       [--rounds=2] [--threads=2] [--peak_n=2048]

Every measurement is one child process (:func:`bench.common.run_child`, this module with
``--spec``). Per model and method the children alternate ``ours, peer, ours, peer`` (``--rounds``
pairs), so a change of machine load hits both sides; the 1-minute load average is recorded
before and after each child. The fp32 matmul peak is measured first (:mod:`bench.peak`), and
our steps' MFU is given against it. Each side's figure is the median over rounds of the per-child
median step time (``--steps`` timed steps after ``--warmup`` untimed ones).

Ours: :func:`adalink_jax.peft.make_train_step` with AdamW, jitted with donation and compiled
before timing (what ``bench.train_step`` times). Peer: ``T5ForConditionalGeneration`` built from
a ``transformers.T5Config`` of the same shape (random weights, no dropout), wrapped by PEFT,
``torch.optim.AdamW`` on the trainable parameters, one step = zero_grad, forward with labels,
backward, optimizer step; ``torch.set_num_threads(--threads)``.

Methods (:data:`OURS`, :data:`PEER`): LoRA is PEFT's default for T5 (r=8, alpha=8, q and v of
every attention, no dropout) and ours with the same rank, alpha and targets; prompt tuning uses
100 virtual tokens on both sides; IA3 is PEFT's T5 default (keys, values, the input of the
MLP's ``wo``) and ours on the same three places; AdaLink (rank 64, text) and bottleneck
adapters have no PEFT counterpart, so they are compared with PEFT's LoRA step. Writes
``peer.json`` and ``peer.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from adalink_jax.peft import registry
from bench import common

_ONE_LAYER = dict(num_encoder_layers=1, num_decoder_layers=1)

# name -> our T5 shape name (+ overrides) and batch shape (the shapes at full size).
MODELS = {
    'tiny': {'t5_tiny': dict(name='t5_1_1_tiny', t5=_ONE_LAYER, batch=2, text_len=16,
                             target_len=8)},
    'full': {'t5_small': dict(name='t5_1_1_small', batch=8, text_len=128, target_len=32),
             't5_base': dict(name='t5_1_1_base', batch=8, text_len=512, target_len=64)},
}

PROMPT_TOKENS = 100
# Our peft blocks, matched to the peer's settings where the peer has the method.
OURS = {
    'ft': dict(method='ft'),
    'adalink': dict(method='adalink', rank=64, modalities=('text',)),
    'lora': dict(method='lora', rank=8, lora_alpha=8.0, lora_targets=('query', 'value')),
    'prompt': dict(method='prompt', prompt_length=PROMPT_TOKENS),
    'adapter': dict(method='adapter', adapter_dim=64, adapter_where=('attention', 'mlp')),
    # PEFT's T5 default: keys, values and the input of the MLP's output projection (wo).
    'ia3': dict(method='ia3', ia3_targets=('key', 'value', 'mlp_hidden')),
}
# The methods compared: those of OURS, each a registered method (adalink_jax.peft.registry).
METHODS = registry.check(tuple(OURS), 'bench.peer.OURS')
# The peer's methods: None = plain model (full FT); otherwise a PEFT config (defaults + these).
PEER = {'ft': None, 'lora': dict(kind='lora'), 'ia3': dict(kind='ia3'),
        'prompt': dict(kind='prompt', num_virtual_tokens=PROMPT_TOKENS)}
SKIPPED: dict[str, str] = {}  # peer methods with no counterpart here, and why


def _log(msg: str) -> None:
  print(f'[peer {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def hf_config(name: str, overrides: dict | None = None) -> dict:
  """``transformers.T5Config`` kwargs of our T5 shape ``name`` (no dropout, like our step)."""
  from adalink_jax.models import t5 as t5_lib  # pylint: disable=import-outside-toplevel
  c = t5_lib.t5_config(name, **(overrides or {}))
  gated = tuple(c.mlp_activations) == ('gelu', 'linear')
  if not gated and tuple(c.mlp_activations) != ('relu',):
    raise ValueError(f'{name}: mlp_activations={c.mlp_activations} has no HF T5 equivalent')
  return dict(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
              num_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers,
              num_heads=c.num_heads,
              relative_attention_num_buckets=c.relative_attention_num_buckets,
              relative_attention_max_distance=c.relative_attention_max_distance,
              dropout_rate=0.0, layer_norm_epsilon=c.layer_norm_epsilon,
              feed_forward_proj='gated-gelu' if gated else 'relu',
              tie_word_embeddings=c.tie_embeddings, pad_token_id=c.pad_id, eos_token_id=c.eos_id,
              decoder_start_token_id=c.decoder_start_id)


# ------------------------------------------------------------------ children


def compiled_step(model: dict, peft_block: dict):
  """Our T5 train step for ``model`` (a :data:`MODELS` entry) and ``peft_block``, compiled.

  Returns ``(one_step, compiled, compile_s, counts, state)``: ``one_step()`` runs a step and
  blocks until it is done; ``state[2]`` holds the last step's metrics.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from adalink_jax import model_builder, optim, peft  # pylint: disable=import-outside-toplevel
  from bench import train_step  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(dict(
      model=dict(family='t5', name=model['name'], t5=model.get('t5') or {}, dtype='float32'),
      peft=peft_block))
  setup = model_builder.build(cfg)
  shapes = nn.unbox(jax.eval_shape(setup.init, jax.random.key(0), setup.init_batch(1, 4, 4)))
  counts = peft.param_counts(shapes, setup.trainable)
  trainable, frozen = peft.split(common.random_params(shapes), setup.trainable)
  optimizer, _ = optim.make_optimizer(dict(name='adamw', learning_rate=1e-4))
  opt_state = optimizer.init(trainable)
  batch = train_step._batch(setup, model)  # pylint: disable=protected-access
  step = jax.jit(peft.make_train_step(setup.model, optimizer, forward=setup.forward),
                 donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = step.lower(trainable, opt_state, frozen, batch, None).compile()
  compile_s = time.perf_counter() - t0
  state = [trainable, opt_state, None]

  def one_step():
    state[0], state[1], state[2] = compiled(state[0], state[1], frozen, batch, None)
    jax.block_until_ready(state)
  return one_step, compiled, compile_s, counts, state


def _ours(spec: dict) -> dict:
  """Compiles and times our step; ``spec``: model, peft, steps, warmup."""
  import jax  # pylint: disable=import-outside-toplevel
  one_step, compiled, compile_s, counts, state = compiled_step(spec['model'], spec['peft'])

  warm = common.timed(one_step, spec['warmup'])
  times = common.timed(one_step, spec['steps'])
  return dict(side='ours', backend=jax.default_backend(), compile_s=compile_s, warmup_s=warm,
              step_times_s=times, step_s=common.median(times), loss=float(state[2]['loss']),
              flops=common.flops_of(compiled),
              params_total=counts['total'], params_trainable=counts['trainable'])


def _peer_model(spec: dict):
  """The HF model, wrapped by PEFT for LoRA / prompt tuning (PEFT's defaults otherwise)."""
  import peft  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  kw = dict(spec['hf_config'])
  untied = not kw['tie_word_embeddings']
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw))
  if untied:
    # transformers 5 always ties T5's head to the embedding (tie_word_embeddings=False only
    # drops the d_model**-0.5 scale); T5 1.1 has its own head: give it one, as ours has.
    model.lm_head.weight = torch.nn.Parameter(
        0.02 * torch.randn(kw['vocab_size'], kw['d_model']))
  p = spec['peer']
  if p is None:
    return model, {}
  task = peft.TaskType.SEQ_2_SEQ_LM
  if p['kind'] == 'lora':
    pcfg = peft.LoraConfig(task_type=task)
  elif p['kind'] == 'prompt':
    pcfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=p['num_virtual_tokens'])
  elif p['kind'] == 'ia3':
    pcfg = peft.IA3Config(task_type=task)
  else:
    raise ValueError(f'peer method kind {p["kind"]!r}: expected lora, prompt or ia3')
  model = peft.get_peft_model(model, pcfg)
  c = model.peft_config['default']
  shown = {k: getattr(c, k) for k in ('r', 'lora_alpha', 'lora_dropout', 'target_modules',
                                      'feedforward_modules', 'num_virtual_tokens')
           if hasattr(c, k)}
  return model, json.loads(json.dumps(shown, default=sorted))


def _peer(spec: dict) -> dict:
  """Times the HF + PEFT step; ``spec``: model, hf_config, peer, steps, warmup, threads."""
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(spec['threads'])
  torch.manual_seed(0)
  model, settings = _peer_model(spec)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)  # ours: optax.adamw, no decay
  m, v = spec['model'], spec['hf_config']['vocab_size']
  gen = torch.Generator().manual_seed(0)
  tok = lambda n: torch.randint(2, v, (m['batch'], n), generator=gen)  # never pad, like ours
  enc, dec, tgt = tok(m['text_len']), tok(m['target_len']), tok(m['target_len'])
  loss = [None]

  def one_step():
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=dec,
                labels=tgt)
    out.loss.backward()
    opt.step()
    loss[0] = float(out.loss.detach())

  warm = common.timed(one_step, spec['warmup'])
  times = common.timed(one_step, spec['steps'])
  return dict(side='peer', threads=torch.get_num_threads(), torch=torch.__version__,
              transformers=transformers.__version__, peft=peft.__version__,
              peer_settings=settings, warmup_s=warm, step_times_s=times,
              step_s=common.median(times), loss=loss[0],
              params_total=sum(p.numel() for p in model.parameters()),
              params_trainable=sum(p.numel() for p in params))


def _child(spec: dict) -> dict:
  return _ours(spec) if spec['side'] == 'ours' else _peer(spec)


# ------------------------------------------------------------------ driver


def _measure(side: str, name: str, mspec: dict, method: str, args, rnd: int) -> dict:
  spec = dict(side=side, model=mspec, method=method, steps=args.steps, warmup=args.warmup)
  if side == 'ours':
    spec['peft'] = OURS[method]
  else:
    spec.update(peer=PEER[method], threads=args.threads, host_allocator=args.peer_allocator,
                hf_config=hf_config(mspec['name'], mspec.get('t5')))
  before = common.load_average()
  r = common.run_child('bench.peer', spec, timeout_s=args.timeout, cpu_only=True)
  r.update(model=name, method=method, side=side, round=rnd, load_before=before,
           load_after=common.load_average())
  if 'error' in r:
    _log(f'  {side:4s} ERROR {r["error"][:500]}')
  else:
    _log(f'  {side:4s} {r["step_s"]:.3f} s/step (load {before[:1]} -> {r["load_after"][:1]})')
  return r


def measure_peak(n: int, timeout_s: float = 600) -> dict:
  """The machine's fp32 ``n^3`` matmul rate now (:mod:`bench.peak`, its own child): the
  denominator of the MFU of a run's steps."""
  r = common.run_child('bench.peak', dict(n=n, reps=5), timeout_s=timeout_s, cpu_only=True)
  _log(f'matmul peak: {r.get("flops_per_s", 0) / 1e9:.0f} GFLOP/s' if 'error' not in r
       else f'matmul peak: ERROR {r["error"][:300]}')
  return r


def summarize(rows: list[dict], peak: float | None = None) -> list[dict]:
  """One entry per (model, method): median over rounds per side, the ratios ours / peer, and
  our step's share of ``peak`` (the matmul FLOP/s measured in the same run): its compiled
  FLOPs over its median time."""
  out = []
  for key in dict.fromkeys((r['model'], r['method']) for r in rows):
    med, best = {}, {}
    for side in ('ours', 'peer'):
      ok = [r for r in rows if (r['model'], r['method'], r['side']) == (*key, side)
            and 'error' not in r]
      med[side] = common.median([r['step_s'] for r in ok]) if ok else None
      # The fastest single step: under CPU contention the peer's OpenMP threads stall for
      # whole scheduler slices, so its median is noisy while its best step stays near quiet.
      best[side] = min(t for r in ok for t in r['step_times_s']) if ok else None
    lora = [r['step_s'] for r in rows if (r['model'], r['method'], r['side']) ==
            (key[0], 'lora', 'peer') and 'error' not in r]
    peer_lora = common.median(lora) if lora else None
    ratio = lambda a, b: a / b if a and b else None
    trainable = {r['side']: r.get('params_trainable') for r in rows
                 if (r['model'], r['method']) == key and 'error' not in r}
    loads = [r['load_before'][0] for r in rows if (r['model'], r['method']) == key
             and r['load_before']] + [r['load_after'][0] for r in rows
                                      if (r['model'], r['method']) == key and r['load_after']]
    flops = next((r.get('flops') for r in rows if (r['model'], r['method'], r['side']) ==
                  (*key, 'ours') and r.get('flops')), None)
    out.append(dict(model=key[0], method=key[1], ours_s=med['ours'], peer_s=med['peer'],
                    ours_gflop=flops / 1e9 if flops else None,
                    ours_mfu=flops / med['ours'] / peak if flops and med['ours'] and peak
                    else None,
                    ours_over_peer=ratio(med['ours'], med['peer']),
                    ours_over_peer_lora=ratio(med['ours'], peer_lora),
                    ours_best_s=best['ours'], peer_best_s=best['peer'],
                    best_ours_over_peer=ratio(best['ours'], best['peer']),
                    trainable_ours=trainable.get('ours'), trainable_peer=trainable.get('peer'),
                    load_min=min(loads) if loads else None,
                    load_max=max(loads) if loads else None))
  return out


def _allocator(rows: list[dict], side: str) -> str:
  """How ``side``'s children ran malloc, as they reported it (``host_memory_reused``)."""
  seen = {r.get('host_memory_reused') for r in rows if r.get('side') == side and 'error' not in r}
  if not seen:
    return '--'
  return {frozenset({True}): 'reuse', frozenset({False}): 'system'}.get(frozenset(seen), 'mixed')


def markdown(res: dict) -> str:
  f = lambda x, fmt: '--' if x is None else format(x, fmt)
  lines = [f'# Peer benchmark ({res["size"]})', '',
           f'`{res["command"]}`, {res["started"]}, {res["machine"].get("cpu_model")} '
           f'({res["machine"].get("cpu_count")} cores); {res["versions"]}.', '',
           f'Load average (1/5/15 min) before {res["load_before"]}, after {res["load_after"]}. '
           f'{res["settings"]["rounds"]} interleaved round(s) of {res["settings"]["steps"]} '
           f'timed steps after {res["settings"]["warmup"]} warm-up; peer torch threads '
           f'{res["settings"]["threads"]}; malloc: ours {_allocator(res["rows"], "ours")}, '
           f'peer {_allocator(res["rows"], "peer")} (adalink_jax.env). Ratios < 1: ours is '
           'faster.', '',
           f'Matmul peak measured in the same run (fp32 {res["peak"].get("n")}^3 `jnp.dot`): '
           f'{f(res["peak"].get("flops_per_s", 0) / 1e9, ".0f")} GFLOP/s; MFU = our step\'s '
           'compiled FLOPs / its median time / that peak.', '',
           '| model | method | ours s/step | peer s/step | ours / peer | ours / peer LoRA '
           '| best step ours / peer | ours GFLOP | ours MFU | trainable ours | trainable peer '
           '| load 1 min (min-max) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for s in res['summary']:
    lines.append(f'| {s["model"]} | {s["method"]} | {f(s["ours_s"], ".4g")} | '
                 f'{f(s["peer_s"], ".4g")} | {f(s["ours_over_peer"], ".3g")} | '
                 f'{f(s["ours_over_peer_lora"], ".3g")} | {f(s["ours_best_s"], ".4g")} / '
                 f'{f(s["peer_best_s"], ".4g")} | {f(s["ours_gflop"], ".1f")} | '
                 f'{f(s["ours_mfu"] and 100 * s["ours_mfu"], ".0f")}% | '
                 f'{f(s["trainable_ours"], ",")} | '
                 f'{f(s["trainable_peer"], ",")} | {f(s["load_min"], ".2f")}-'
                 f'{f(s["load_max"], ".2f")} |')
  lines += [''] + [f'Skipped: {k} -- {v}.' for k, v in res['skipped'].items()]
  errors = [f'- {r["model"]} {r["method"]} {r["side"]}: {r["error"][:300]}'
            for r in res['rows'] if 'error' in r]
  return '\n'.join(lines + (['', 'Errors:'] + errors if errors else []) + [''])


def _versions() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  get = lambda p: metadata.version(p) if _installed(p) else 'not installed'
  return ', '.join(f'{p} {get(p)}' for p in ('jax', 'torch', 'transformers', 'peft'))


def _installed(pkg: str) -> bool:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    metadata.version(pkg)
    return True
  except metadata.PackageNotFoundError:
    return False


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='output folder; writes peer.json and peer.md')
  p.add_argument('--size', default='full', choices=tuple(MODELS))
  p.add_argument('--models', default='', help='comma-separated (default: t5_small at full, '
                                              'all at tiny); t5_base takes far longer')
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--steps', type=int, default=5, help='timed steps per child')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps per child')
  p.add_argument('--rounds', type=int, default=2, help='ours/peer pairs per method')
  p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads of the peer')
  p.add_argument('--peer_allocator', default='system', choices=('system', 'reuse'),
                 help="the peer's malloc: glibc's defaults (what a PEFT user runs), or the "
                      'reuse setting our side runs with (adalink_jax.env)')
  p.add_argument('--timeout', type=float, default=1800, help='seconds per child')
  p.add_argument('--peak_n', type=int, default=2048, help='square size of the peak matmul')
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(',') if m] or (
      ['t5_small'] if args.size == 'full' else list(MODELS[args.size]))
  args.methods = [m for m in args.methods.split(',') if m]
  if set(args.models) - set(MODELS[args.size]):
    p.error(f'--models: choose from {sorted(MODELS[args.size])} at --size={args.size}')
  if set(args.methods) - set(METHODS):
    skipped = f' ({", ".join(SKIPPED)} skipped: {"; ".join(SKIPPED.values())})' if SKIPPED else ''
    p.error(f'--methods: choose from {METHODS}{skipped}')
  if min(args.steps, args.rounds, args.threads) < 1 or args.warmup < 0:
    p.error('--steps, --rounds and --threads must be >= 1 and --warmup >= 0')
  if not _installed('peft'):
    p.error('the peer side needs PEFT: pip install "peft>=0.21,<0.22"')
  return args


def main(argv=None) -> dict:
  args = _parse(argv)
  os.makedirs(args.out, exist_ok=True)
  res = dict(size=args.size, started=datetime.datetime.now().isoformat(timespec='seconds'),
             command=' '.join(['python', '-m', 'bench.peer'] +
                              (argv if argv is not None else sys.argv[1:])),
             machine=common.machine_info(), versions=_versions(),
             load_before=common.load_average(), skipped=SKIPPED,
             peak=measure_peak(args.peak_n, args.timeout),
             settings=dict(steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                           threads=args.threads, peer_allocator=args.peer_allocator,
                           ours=OURS, peer=PEER,
                           models={m: MODELS[args.size][m] for m in args.models}),
             rows=[])
  for name in args.models:
    mspec = MODELS[args.size][name]
    for method in args.methods:
      _log(f'{name} {method}')
      for rnd in range(args.rounds):
        for side in ('ours', 'peer') if method in PEER else ('ours',):
          res['rows'].append(_measure(side, name, mspec, method, args, rnd))
  res.update(load_after=common.load_average(),
             summary=summarize(res['rows'], res['peak'].get('flops_per_s')),
             finished=datetime.datetime.now().isoformat(timespec='seconds'))
  with open(os.path.join(args.out, 'peer.json'), 'w') as f:
    json.dump(res, f, indent=1, default=str)
  md = markdown(res)
  with open(os.path.join(args.out, 'peer.md'), 'w') as f:
    f.write(md)
  print(md)
  return res


if __name__ == '__main__':
  if any(a.startswith('--spec') for a in sys.argv[1:]):
    common.child_main(_child)  # one measurement (a child of main)
  else:
    main()
