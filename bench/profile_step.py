"""Where our T5 train step spends its time, op by op (XLA:CPU), from a ``jax.profiler`` trace.

  python -m bench.profile_step --out=DIR [--size=full|tiny] [--model=t5_base] [--method=adalink]
                               [--batch=N] [--steps=2]

Compiles the step :mod:`bench.peer` times (same model shapes, method settings and AdamW), runs
it once, then traces ``--steps`` steps with XLA's per-thunk trace events on
(``--xla_cpu_enable_xprof_traceme``, set by this module before JAX starts). Each traced op is
matched to its instruction in the compiled (optimised) HLO: a fusion's dots give its FLOPs, so
every op group gets time per step, share of the op time, and GFLOP/s. Groups: a dot by its
operand shapes and contracted size (forward and backward dots of one layer type land in
different groups, since their layouts differ), every other op by its fusion kind
(``transpose_copy_fusion`` ...). The trace is read with ``jax.profiler.ProfileData`` (no
TensorBoard needed).

Writes ``profile.json`` (every group) and ``profile.md`` (the top ``--top`` groups) under
``--out``, with the step's wall time, the matmul peak of :mod:`bench.peak` measured in the same
run, and the load average. Op times are per op and ops can run side by side on the thread
pool, so the op time can exceed the wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile
import time

from bench import common
from bench import peer

TRACE_FLAG = '--xla_cpu_enable_xprof_traceme=true'


def _dims(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x]


def fusion_dots(hlo: str) -> dict[str, tuple[float, str]]:
  """Instruction name -> (dot FLOPs, a description of its first dot) for every fusion and dot of
  an optimised HLO module's text (``compiled.as_text()``)."""
  comps = {}
  for m in re.finditer(r'^(?:ENTRY )?%?([\w.\-]+) \((.*?)\) -> .*?\{\n(.*?)\n\}', hlo,
                       re.M | re.S):
    comps[m.group(1)] = (m.group(2), m.group(3))

  def dots(sig: str, body: str, only: str | None = None) -> tuple[float, str]:
    shapes = {n: _dims(s) for n, s in re.findall(r'([\w.\-]+): \w+\[([\d,]*)\]', sig)}
    shapes.update({n: _dims(s) for n, s in re.findall(r'%?([\w.\-]+) = \w+\[([\d,]*)\]', body)})
    flops, desc = 0.0, ''
    for m in re.finditer(r'= \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\)(.*)',
                         body if only is None else only):
      out, lhs, rhs = _dims(m.group(1)), shapes.get(m.group(2)), shapes.get(m.group(3))
      if lhs is None or rhs is None:
        continue
      contract = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', m.group(4))
      k = 1
      for i in _dims(contract.group(1)) if contract else []:
        k *= lhs[i]
      n = 1
      for d in out:
        n *= d
      flops += 2.0 * n * k
      desc = desc or f'dot {lhs} x {rhs} -> {out}, k={k}'
    return flops, desc

  out, fused = {}, set()
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*? fusion\(.*?calls=%?([\w.\-]+)', hlo,
                       re.M):
    sig, body = comps.get(m.group(2), ('', ''))
    out[m.group(1)] = dots(sig, body)
    fused.add(m.group(2))
  # Dots XLA left unfused: the instruction itself, in a computation that is no fusion's body.
  for comp, (sig, body) in comps.items():
    if comp in fused:
      continue
    for line in body.splitlines():
      m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = \w+\[[\d,]*\]\S* dot\(', line)
      if m and m.group(1) not in out:
        out[m.group(1)] = dots(sig, body, only=line)
  return out


def instructions(hlo: str) -> set[str]:
  """Every instruction name of an HLO module's text: the names the CPU runtime's ops carry."""
  return set(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = ', hlo, re.M))


def op_times(trace_dir: str, ops: set[str]) -> dict[str, float]:
  """Op name -> total seconds in the trace (every thread), for the trace events named after an
  HLO instruction in ``ops`` (the executor's and Python's own events are left out)."""
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not files:
    raise FileNotFoundError(f'no .xplane.pb trace under {trace_dir}')
  total: dict[str, float] = collections.defaultdict(float)
  for plane in ProfileData.from_file(files[0]).planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in ops:
          total[ev.name] += ev.duration_ns * 1e-9
  return dict(total)


def group(times: dict[str, float], dots: dict[str, tuple[float, str]], steps: int) -> list[dict]:
  """Per-op times -> groups (a dot shape, or a non-dot op kind) with s/step, share, GFLOP/s."""
  acc: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for name, seconds in times.items():
    flops, desc = dots.get(name, (0.0, ''))
    key = desc if desc else re.sub(r'\.\d+$', '', name)
    acc[key][0] += seconds / steps
    acc[key][1] += flops
    acc[key][2] += 1
  total = sum(a[0] for a in acc.values()) or 1.0
  rows = [dict(op=k, s_per_step=s, share=s / total, count=n, gflop=f / 1e9,
               gflop_per_s=f / 1e9 / s if s and f else None)
          for k, (s, f, n) in acc.items()]
  return sorted(rows, key=lambda r: -r['s_per_step'])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True)
  p.add_argument('--size', default='full', choices=tuple(peer.MODELS))
  p.add_argument('--model', default='', help='a bench.peer model (default: the size\'s first)')
  p.add_argument('--method', default='adalink', choices=peer.METHODS)
  p.add_argument('--batch', type=int, default=0, help='batch size (default: the model\'s)')
  p.add_argument('--steps', type=int, default=2, help='traced steps')
  p.add_argument('--top', type=int, default=20, help='groups in profile.md')
  args = p.parse_args(argv)
  # Before JAX starts: the CPU runtime emits a trace event per op only with this flag.
  flags = os.environ.get('XLA_FLAGS', '')
  if TRACE_FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {TRACE_FLAG}'.strip()
  import jax  # pylint: disable=import-outside-toplevel
  from adalink_jax import env  # pylint: disable=import-outside-toplevel
  # The allocator the train command and the peer benchmark's children run with.
  env.reuse_freed_host_memory('auto')
  models = peer.MODELS[args.size]
  name = args.model or next(iter(models))
  if name not in models:
    p.error(f'--model: choose from {sorted(models)} at --size={args.size}')
  model = dict(models[name], **({'batch': args.batch} if args.batch else {}))
  peak = peer.measure_peak(2048 if args.size == 'full' else 256)
  load_before = common.load_average()
  one_step, compiled, _, counts, _ = peer.compiled_step(model, peer.OURS[args.method])
  one_step()  # warm-up
  wall = common.timed(one_step, args.steps)
  with tempfile.TemporaryDirectory(prefix='adalink_profile_') as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        one_step()
    hlo = compiled.as_text()
    times = op_times(trace_dir, instructions(hlo))
  rows = group(times, fusion_dots(hlo), args.steps)
  flops = common.flops_of(compiled)
  res = dict(model=name, shapes=model, method=args.method, steps=args.steps,
             step_s=common.median(wall), op_s_per_step=sum(r['s_per_step'] for r in rows),
             compiled_gflop=flops / 1e9 if flops else None,
             dot_gflop=sum(r['gflop'] for r in rows), peak=peak,
             trainable=counts['trainable'], load_before=load_before,
             load_after=common.load_average(), machine=common.machine_info(), groups=rows)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'profile.json'), 'w') as f:
    json.dump(res, f, indent=1, default=str)
  peak_gf = peak.get('flops_per_s', 0) / 1e9
  f = lambda x, fmt: '--' if x is None else format(x, fmt)
  lines = [f'# Step profile: {name} {args.method}, batch {model["batch"]} x '
           f'{model["text_len"]}/{model["target_len"]}', '',
           f'Step {res["step_s"]:.3f} s wall; op time {res["op_s_per_step"]:.3f} s/step; '
           f'{f(res["compiled_gflop"], ".1f")} GFLOP compiled ({res["dot_gflop"]:.1f} in dots); '
           f'matmul peak {peak_gf:.0f} GFLOP/s; load {load_before} -> {res["load_after"]}.', '',
           '| op (dot shapes, or fusion kind) | ms/step | share | count | GFLOP | GFLOP/s |',
           '|---|---|---|---|---|---|']
  lines += [f'| {r["op"]} | {1e3 * r["s_per_step"]:.1f} | {100 * r["share"]:.1f}% | '
            f'{r["count"]} | {r["gflop"]:.2f} | {f(r["gflop_per_s"], ".0f")} |'
            for r in rows[:args.top]]
  with open(os.path.join(args.out, 'profile.md'), 'w') as fh:
    fh.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  print(f'[profile_step {time.strftime("%H:%M:%S")}] wrote {args.out}/profile.{{json,md}}')
  return res


if __name__ == '__main__':
  main()
