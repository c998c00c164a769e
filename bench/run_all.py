"""Runs the benchmarks and writes ``results.json``, ``results.md`` and ``train.png``.

  python -m bench.run_all --out=bench/results/<name> [--size=tiny|full] [--only=train,decode,scale]

Stages (each configuration in its own child process, see :mod:`bench.common`):

* ``peak``: a large fp32 matmul, at the start and at the end of the train stage; the larger
  median is the MFU denominator.
* ``train``: every model x method of :data:`bench.setups.TRAIN_MODELS` (:mod:`bench.train_step`).
* ``decode``: greedy / beam search with and without the KV cache (:mod:`bench.decoding`).
* ``scale``: the AdaLink steps of :data:`bench.setups.SCALE` (PaLI-X and PaliGemma 2 10B)
  compiled on a fake 256-device mesh (:mod:`bench.scale_sim`), one model after the other
  (``--scale_models`` picks some); with activation batch constraints (primary) and, at full
  size, without them (the model as it is). If the full depth does not compile within the time
  limit, two reduced depths are compiled and every memory component is extrapolated linearly
  in depth (marked as such).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from bench import common
from bench import report
from bench import scale_sim
from bench import setups

STAGES = ('train', 'decode', 'scale')


def _log(msg: str) -> None:
  print(f'[bench {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def _peak(size: str, dtype: str) -> dict:
  n, reps = (2048, 5) if size == 'full' else (256, 3)
  return common.run_child('bench.peak', dict(n=n, dtype=dtype, reps=reps), timeout_s=300)


def run_train(size: str, models: dict[str, list[str]], steps: int, warmup: int,
              dtype: str) -> list[dict]:
  """``models``: model name -> its methods."""
  rows = []
  timeout = 1200 if size == 'full' else 300
  for name, methods in models.items():
    mspec = dict(setups.TRAIN_MODELS[size][name], name=name)
    for method in methods:
      _log(f'train {name} {method}')
      r = common.run_child('bench.train_step', dict(model=mspec, method=method, steps=steps,
                                                    warmup=warmup, dtype=dtype),
                           timeout_s=timeout)
      if 'error' in r:
        _log(f'  ERROR {r["error"][:500]}')
      else:
        _log(f'  step {1e3 * r["step_s"]:.1f} ms, compile {r["compile_s"]:.1f} s, '
             f'{(r["flops"] or 0) / 1e9:.2f} GFLOP, XLA mem '
             f'{r["xla_memory"].get("total", 0) / 2**20:.0f} MiB, RSS '
             f'{r["rss_peak_bytes"] / 2**20:.0f} MiB')
      rows.append(r)
  return rows


def run_decode(size: str) -> dict:
  _log('decode')
  r = common.run_child('bench.decoding', setups.DECODE[size],
                       timeout_s=1200 if size == 'full' else 300)
  if 'error' in r:
    _log(f'  ERROR {r["error"][:500]}')
  return r


def _scale_child(spec: dict, timeout: float) -> dict:
  mesh = spec['mesh']
  n = mesh['data'] * mesh['fsdp'] * mesh['model']
  return common.run_child('bench.scale_sim', spec, timeout_s=timeout, num_devices=n,
                          cpu_only=True)


def _extrapolate(a: dict, b: dict) -> dict:
  """Linear fit of every memory component in the layer fraction, evaluated at 1 (full depth)."""
  fa, fb = a['layer_fraction'], b['layer_fraction']
  mem = {}
  for k in a['xla_memory']:
    slope = (b['xla_memory'][k] - a['xla_memory'][k]) / (fb - fa)
    mem[k] = int(round(a['xla_memory'][k] + slope * (1.0 - fa)))
  return mem


def _full_depth_fields(model: dict, trainable: int) -> dict:
  """Layer counts and parameter count of the full-depth model (for the extrapolated row)."""
  setup = scale_sim.build(model)
  return dict(scale_sim.layer_counts(setup),
              params_total=scale_sim.backbone_params(setup) + trainable)


def run_scale_model(base: dict, variants: bool) -> list[dict]:
  """Rows of one model of :data:`bench.setups.SCALE`: full depth (or two reduced depths and the
  extrapolation), plus the run without activation constraints when ``variants``."""
  base = dict(base)
  timeout = base.pop('timeout_s')
  name = base['model']['name']
  _log(f'scale {name} (full depth, activation constraints, limit {timeout} s)')
  full = _scale_child(dict(base, activation_constraints=True), timeout)
  rows = []
  if 'error' not in full:
    rows.append(dict(full, label='full depth', primary=True))
  else:
    _log(f'  full depth failed ({full["error"][:200]}); reduced depths + extrapolation')
    parts = [_scale_child(dict(base, activation_constraints=True, layer_fraction=f), timeout)
             for f in (0.125, 0.25)]
    rows.append(dict(full, model=name, label='full depth (failed)'))
    for p in parts:
      rows.append(dict(p, model=name, label=f'depth x{p.get("layer_fraction", "?")}'))
    if all('error' not in p for p in parts):
      ext = dict(parts[1], label='extrapolated to full depth', primary=True,
                 xla_memory=_extrapolate(*parts), layer_fraction=1.0, compile_s=0.0,
                 note='NOT compiled: each memory component fitted linearly in depth through '
                      'the two reduced-depth compiles and evaluated at full depth.')
      ext.update(_full_depth_fields(base['model'], parts[1]['params_trainable']),
                 extrapolated=True)
      rows.append(ext)
  if variants:
    _log(f'scale {name}, full depth, without activation constraints (the model as it is)')
    r = _scale_child(dict(base, activation_constraints=False), timeout)
    rows.append(dict(r, model=name, label='full depth, no constraints', primary=False,
                     note='Without activation sharding constraints XLA propagation keeps the '
                          'global batch on every device (weights FSDP-sharded on embed '
                          'conflict with the batch sharding).'))
  for r in rows:
    if 'xla_memory' in r:
      _log(f'  {name} {r["label"]}: {r["xla_memory"]["total"] / 2**30:.2f} GiB per device')
  return rows


def run_scale(size: str, variants: bool, names: list[str]) -> list[dict]:
  """Every named model of ``setups.SCALE[size]``, one after the other."""
  return [r for n in names for r in run_scale_model(setups.SCALE[size][n], variants)]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output folder (bench/results/<name>)')
  parser.add_argument('--size', default='full', choices=('tiny', 'full'))
  parser.add_argument('--only', default=','.join(STAGES),
                      help=f'comma-separated subset of {STAGES}')
  parser.add_argument('--models', default='',
                      help='train models (default: all of the size); name:m1+m2 restricts that '
                           'model to those methods, e.g. t5_base:ft+adalink')
  parser.add_argument('--methods', default=','.join(setups.METHODS))
  parser.add_argument('--steps', type=int, default=0, help='timed steps (default 10 / tiny 2)')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--dtype', default='float32', help='activation dtype of the train step')
  parser.add_argument('--scale_variants', default=None, choices=('yes', 'no'),
                      help='also compile without activation constraints (default: full only)')
  parser.add_argument('--scale_models', default='',
                      help='scale-stage models (default: all of the size), e.g. paligemma2_10b')
  args = parser.parse_args(argv)

  stages = [s for s in args.only.split(',') if s]
  bad = set(stages) - set(STAGES)
  if bad:
    parser.error(f'--only: unknown stage(s) {sorted(bad)}; choose from {STAGES}')
  methods = [m for m in args.methods.split(',') if m]
  entries = [m for m in args.models.split(',') if m] or list(setups.TRAIN_MODELS[args.size])
  models = {}
  for entry in entries:
    name, _, only = entry.partition(':')
    models[name] = only.split('+') if only else methods
  unknown = set(models) - set(setups.TRAIN_MODELS[args.size])
  if unknown:
    parser.error(f'--models: {sorted(unknown)} not in {sorted(setups.TRAIN_MODELS[args.size])}')
  if {m for ms in models.values() for m in ms} - set(setups.METHODS):
    parser.error(f'--methods / --models: choose methods from {setups.METHODS}')
  scale_models = [m for m in args.scale_models.split(',') if m] or list(setups.SCALE[args.size])
  if set(scale_models) - set(setups.SCALE[args.size]):
    parser.error(f'--scale_models: {sorted(set(scale_models) - set(setups.SCALE[args.size]))} '
                 f'not in {sorted(setups.SCALE[args.size])}')
  steps = args.steps or (10 if args.size == 'full' else 2)
  variants = (args.scale_variants == 'yes') if args.scale_variants else args.size == 'full'

  os.makedirs(args.out, exist_ok=True)
  t_start = time.perf_counter()
  results: dict = dict(
      size=args.size, started=datetime.datetime.now().isoformat(timespec='seconds'),
      command=' '.join([os.path.basename(sys.executable), '-m', 'bench.run_all'] +
                       (argv if argv is not None else sys.argv[1:])),
      machine=common.machine_info(), load_before=common.load_average(),
      uptime_before=common.uptime_line(),
      settings=dict(steps=steps, warmup=args.warmup, dtype=args.dtype, methods=models,
                    mfu_model=setups.MFU_MODEL[args.size], peft=setups.PEFT,
                    models={m: {k: v for k, v in setups.TRAIN_MODELS[args.size][m].items()
                                if k != 'model'} for m in models}))
  json_path = os.path.join(args.out, 'results.json')

  def save():
    results['targets'] = report.targets(results)
    with open(json_path, 'w') as f:
      json.dump(results, f, indent=1, default=str)

  if 'train' in stages:
    _log('matmul peak (start)')
    start = _peak(args.size, args.dtype)
    results['train'] = run_train(args.size, models, steps, args.warmup, args.dtype)
    _log('matmul peak (end)')
    end = _peak(args.size, args.dtype)
    good = [p for p in (start, end) if 'error' not in p]
    results['peak'] = dict(start=start, end=end, n=good[0]['n'] if good else None,
                           dtype=args.dtype,
                           flops_per_s=max(p['flops_per_s'] for p in good) if good else None)
    save()
  if 'decode' in stages:
    results['decode'] = run_decode(args.size)
    save()
  if 'scale' in stages:
    results['scale'] = run_scale(args.size, variants, scale_models)
    save()

  results['load_after'] = common.load_average()
  results['uptime_after'] = common.uptime_line()
  results['finished'] = datetime.datetime.now().isoformat(timespec='seconds')
  results['total_s'] = time.perf_counter() - t_start
  save()
  paths = report.write_all(results, args.out)
  _log(f'wrote {json_path}, {paths["markdown"]}, {paths["plot"]}')
  for line in report.summary_lines(results):
    print(line)
  return results


if __name__ == '__main__':
  main()
