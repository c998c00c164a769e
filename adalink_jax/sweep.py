"""Sweeps from a config file's ``sweep(add)``: print, run, and collect into CSV / markdown / PNG.

  python -m adalink_jax.sweep --config=configs/demo.py --out=sweeps/demo --mode=print
  python -m adalink_jax.sweep --config=configs/demo.py --out=sweeps/demo --mode=run
  python -m adalink_jax.sweep --config=configs/coco_mmit.py --out=S --mode=print --eval_tasks=a,b

``print`` writes one command per line for a batch system; ``run`` runs them one after another
(a point that finished is skipped -- a preempted one is resumed -- so an interrupted
sweep resumes); both end by
``collect``: ``results.csv``, ``results.md`` and ``results.png`` (metric against trainable
parameters, one line per method) from every point's ``result.json``. With ``--eval_tasks`` the
grid is points x tasks and the commands are ``adalink_jax.evaluate`` runs over the trained points.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from typing import Any

from adalink_jax import cli


def _load_config_module(path: str):
  module = cli.load_config_module(path)
  if not hasattr(module, 'sweep'):
    raise SystemExit(f'{path} has no sweep(add) function')
  return module


def points(config_path: str) -> list[dict[str, Any]]:
  """The override dicts the config file's ``sweep(add)`` asks for, in order."""
  out: list[dict[str, Any]] = []
  _load_config_module(config_path).sweep(lambda **kw: out.append(dict(kw)))
  return out


def point_name(over: dict[str, Any]) -> str:
  """A stable, readable directory name for one point: ``peft.method=lora,peft.rank=8``."""
  return ','.join(f'{k}={v}' for k, v in over.items()).replace('/', '_') or 'default'


def commands(config_path: str, out: str, extra: list[str], eval_tasks: list[str]) -> list[list[str]]:
  """One argv per grid point (train runs, or evaluate runs when eval tasks are given)."""
  cmds = []
  for over in points(config_path):
    flags = [f'--config.{k}={v}' for k, v in over.items()] + extra
    workdir = os.path.join(out, point_name(over))
    if not eval_tasks:
      cmds.append([sys.executable, '-m', 'adalink_jax.train', f'--config={config_path}',
                   f'--workdir={workdir}'] + flags)
      continue
    for task in eval_tasks:
      cmds.append([sys.executable, '-m', 'adalink_jax.evaluate', f'--config={config_path}',
                   f'--checkpoint={workdir}', f'--out={os.path.join(workdir, "eval_" + task)}',
                   f'--config.data.eval_task={task}'] + flags)
  return cmds


def _finished_result(workdir: str) -> dict | None:
  """The point's result.json if its run finished (not preempted, not failed), else None."""
  path = os.path.join(workdir, 'result.json')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    r = json.load(f)
  return r if r.get('finished') and r.get('preempted_at') is None else None


def _done(cmd: list[str]) -> bool:
  """A train point is done when it finished; an evaluate point when it wrote its metrics."""
  workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith(('--workdir=', '--out=')))
  if '--workdir=' + workdir in cmd:
    return _finished_result(workdir) is not None
  return os.path.isdir(os.path.join(workdir, 'eval')) and any(
      n.startswith('metrics_') for n in os.listdir(os.path.join(workdir, 'eval')))


def collect(out: str) -> list[dict[str, Any]]:
  """Reads every finished point's result.json -> rows; writes results.csv, .md and .png.

  Points that have not finished (running, preempted, failed) are left out and named."""
  rows, unfinished = [], []
  for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
    if not os.path.exists(os.path.join(out, name, 'result.json')):
      continue
    r = _finished_result(os.path.join(out, name))
    if r is None:
      unfinished.append(name)
      continue
    over = dict(kv.split('=', 1) for kv in name.split(',') if '=' in kv)
    row = {'point': name, 'method': over.get('peft.method', ''),
           'rank': over.get('peft.rank', ''), 'trainable_params': r.get('trainable_params'),
           'final_loss': r.get('final_loss'), 'step': r.get('step')}
    row.update({f'eval_{k}': v for k, v in (r.get('eval') or {}).items()})
    rows.append(row)
  if unfinished:
    print(f'not finished, left out of the table: {", ".join(unfinished)}', file=sys.stderr)
  if not rows:
    return rows
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(out, 'results.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else ('' if v is None else str(v))
  md = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  md += ['| ' + ' | '.join(fmt(r.get(k)) for k in keys) + ' |' for r in rows]
  with open(os.path.join(out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(md) + '\n')
  _plot(rows, os.path.join(out, 'results.png'))
  return rows


def _plot(rows: list[dict[str, Any]], path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  metric = next((k for k in rows[0] if k.startswith('eval_')), 'final_loss')
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in sorted({r['method'] for r in rows}):
    pts = sorted((r['trainable_params'], r.get(metric)) for r in rows
                 if r['method'] == method and r.get(metric) is not None and r['trainable_params'])
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=method or 'default')
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel(metric)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--mode', choices=('print', 'run', 'collect'), default='print')
  p.add_argument('--eval_tasks', default='', help='comma-separated seqio task names')
  args, extra = p.parse_known_args(argv)
  tasks = [t for t in args.eval_tasks.split(',') if t]
  if args.mode != 'collect':
    for cmd in commands(args.config, args.out, extra, tasks):
      print(shlex.join(cmd), flush=True)
      if args.mode == 'run':
        if _done(cmd):
          continue  # finished earlier
        rc = subprocess.call(cmd)
        if rc:
          print(f'point failed (exit {rc}): {shlex.join(cmd)}', file=sys.stderr)
          return rc
  rows = collect(args.out)
  if rows:
    print(f'collected {len(rows)} points into {args.out}/results.{{csv,md,png}}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
