"""Sweeps from a config file's ``sweep(add)``: print, run, evaluate, and collect the paper's table.

  python -m adalink_jax.sweep --config=configs/demo.py --out=sweeps/demo --mode=print
  python -m adalink_jax.sweep --config=configs/demo.py --out=sweeps/demo --mode=run
  python -m adalink_jax.sweep --config=configs/glue_t5xxl.py --out=S --mode=eval --eval_tasks=a,b

``print`` writes one train command per point for a batch system; ``run`` runs them one after
another (a point that finished is skipped -- a preempted one is resumed -- so an interrupted
sweep resumes); ``eval`` evaluates the trained points again without training (on
``--eval_tasks``, default: each config's own eval tasks) into ``<point>/sweep_eval/``. All end
by ``collect``, which writes, from every finished point:

* ``results.md`` -- the paper's layout: one row per method (with its trainable parameters),
  one column per task (its metrics, ``a/b`` when a task has two, as T5 reports F1/accuracy),
  then the average over tasks;
* ``results.csv`` -- the same rows with every metric in its own column;
* ``results.png`` -- the average (or the one task's metric) against trainable parameters, a
  line per method.
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
from adalink_jax.peft import registry

SWEEP_EVAL = 'sweep_eval'


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


def commands(config_path: str, out: str, extra: list[str], mode: str = 'run',
             eval_tasks: list[str] | None = None) -> list[list[str]]:
  """One argv per grid point: train runs, or (``mode='eval'``) evaluate runs of trained points."""
  cmds = []
  for over in points(config_path):
    flags = [f'--config.{k}={v}' for k, v in over.items()] + extra
    workdir = os.path.join(out, point_name(over))
    if mode != 'eval':
      cmds.append([sys.executable, '-m', 'adalink_jax.train', f'--config={config_path}',
                   f'--workdir={workdir}'] + flags)
      continue
    tasks = [f'--config.eval.tasks={",".join(eval_tasks)}'] if eval_tasks else []
    cmds.append([sys.executable, '-m', 'adalink_jax.evaluate', f'--config={config_path}',
                 f'--checkpoint={workdir}', f'--out={os.path.join(workdir, SWEEP_EVAL)}']
                + tasks + flags)
  return cmds


def _finished_result(workdir: str) -> dict | None:
  """The point's result.json if its run finished (not preempted, not failed), else None."""
  path = os.path.join(workdir, 'result.json')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    r = json.load(f)
  return r if r.get('finished') and r.get('preempted_at') is None else None


def _sweep_eval(workdir: str) -> dict | None:
  """The newest metrics an eval-only sweep wrote for this point, or None."""
  d = os.path.join(workdir, SWEEP_EVAL, 'eval')
  files = [f for f in os.listdir(d) if f.startswith('metrics_')] if os.path.isdir(d) else []
  if not files:
    return None
  newest = max(files, key=lambda f: int(f[len('metrics_'):-len('.json')]))
  with open(os.path.join(d, newest), encoding='utf-8') as f:
    return json.load(f)


def _done(cmd: list[str]) -> bool:
  """A train point is done when it finished; an evaluate point when it wrote its metrics."""
  workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith(('--workdir=', '--out=')))
  if '--workdir=' + workdir in cmd:
    return _finished_result(workdir) is not None
  return _sweep_eval(os.path.dirname(workdir)) is not None


def method_label(over: dict[str, str]) -> str:
  """``adalink r=16``, ``prompt 20``, ``ft`` ... from a point's overrides."""
  m = over.get('peft.method', '')
  field = registry.get(m).size_field if m in registry.names() else None
  size = f'peft.{field}' if field else None
  if size and size in over:
    return f'{m} {"r=" if "rank" in size else ""}{over[size]}'
  return m or 'default'


def _tasks_of(metrics: dict) -> dict[str, dict[str, float]]:
  """``{'task/metric': v}`` -> ``{task: {metric: v}}`` (bare names and 'average' are not tasks)."""
  out: dict[str, dict[str, float]] = {}
  for k, v in metrics.items():
    if '/' in k and isinstance(v, (int, float)):
      task, metric = k.split('/', 1)
      out.setdefault(task, {})[metric] = float(v)
  return out


def collect(out: str) -> list[dict[str, Any]]:
  """Reads every finished point -> rows; writes results.md, results.csv and results.png.

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
    evaluated = _sweep_eval(os.path.join(out, name))
    metrics = {k: v for k, v in (evaluated or r.get('eval') or {}).items()
               if k not in ('step', 'num_examples', 'num_examples_per_task')}
    row = {'point': name, 'method': over.get('peft.method', ''), 'label': method_label(over),
           'rank': over.get('peft.rank', ''), 'trainable_params': r.get('trainable_params'),
           'final_loss': r.get('final_loss'), 'step': r.get('step')}
    row.update({f'eval_{k}': v for k, v in metrics.items()})
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
  with open(os.path.join(out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(paper_table(rows) + '\n')
  _plot(rows, os.path.join(out, 'results.png'))
  return rows


def _cell(values: dict[str, float]) -> str:
  return '/'.join(f'{v:.1f}' for v in values.values())


def paper_table(rows: list[dict[str, Any]]) -> str:
  """Markdown: method | trainable params | one column per task | average."""
  per_row = [_tasks_of({k[len('eval_'):]: v for k, v in r.items() if k.startswith('eval_')})
             for r in rows]
  tasks = sorted({t for p in per_row for t in p})
  metric_names = {t: '/'.join(next(p[t] for p in per_row if t in p)) for t in tasks}
  head = ['method', 'trainable params'] + [f'{t} ({metric_names[t]})' for t in tasks]
  with_avg = any('eval_average' in r for r in rows)
  head += ['average'] if with_avg else []
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r, p in zip(rows, per_row):
    cells = [r['label'], f'{r["trainable_params"]:,}' if r.get('trainable_params') else '']
    cells += [_cell(p[t]) if t in p else '' for t in tasks]
    if with_avg:
      cells.append(f'{r["eval_average"]:.1f}' if 'eval_average' in r else '')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _plot(rows: list[dict[str, Any]], path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  metric = 'eval_average' if any('eval_average' in r for r in rows) else next(
      (k for k in rows[0] if k.startswith('eval_') and '/' not in k), 'final_loss')
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in sorted({r['method'] for r in rows}):
    pts = sorted((r['trainable_params'], r.get(metric)) for r in rows
                 if r['method'] == method and r.get(metric) is not None and r['trainable_params'])
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=method or 'default')
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel(metric[len('eval_'):] if metric.startswith('eval_') else metric)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--mode', choices=('print', 'run', 'eval', 'collect'), default='print')
  p.add_argument('--eval_tasks', default='', help='with --mode=eval: comma-separated seqio '
                 'tasks or mixtures (default: each config\'s eval tasks)')
  args, extra = p.parse_known_args(argv)
  tasks = [t for t in args.eval_tasks.split(',') if t]
  if args.mode != 'collect':
    for cmd in commands(args.config, args.out, extra, args.mode, tasks):
      print(shlex.join(cmd), flush=True)
      if args.mode in ('run', 'eval'):
        if _done(cmd):
          continue  # finished earlier
        rc = subprocess.call(cmd)
        if rc:
          print(f'point failed (exit {rc}): {shlex.join(cmd)}', file=sys.stderr)
          return rc
  rows = collect(args.out)
  if rows:
    print(f'collected {len(rows)} points into {args.out}/results.{{md,csv,png}}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
