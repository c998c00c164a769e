"""Sweeps from a config file's ``sweep(add)``: print, run, evaluate, and collect the paper's table.

  python -m adalink_jax.sweep --config=configs/demo.py --out=sweeps/demo --mode=print
  python -m adalink_jax.sweep --config=configs/demo.py --out=sweeps/demo --mode=run
  python -m adalink_jax.sweep --config=configs/glue_t5xxl.py --out=S --mode=eval --eval_tasks=a,b
  python -m adalink_jax.sweep --config=configs/mr_gemma3_270m.py \
      --config=configs/trec_gemma3_270m.py --out=S --mode=run --select=rank_accuracy

``print`` writes one train command per point for a batch system; ``run`` runs them one after
another (a point that finished is skipped -- a preempted one is resumed -- so an interrupted
sweep resumes); ``eval`` evaluates the trained points again without training (on
``--eval_tasks``, default: each config's own eval tasks) into ``<point>/sweep_eval/``. All end
by ``collect``, which writes, from every finished point:

* ``results.md`` -- the paper's layout: one row per method (with its trainable parameters),
  one column per task (its metrics, ``a/b`` when a task has two, as T5 reports F1/accuracy),
  then the average over tasks; below it, what the runs took to compute;
* ``results.csv`` -- the same rows with every metric in its own column;
* ``results.png`` -- the average (or the one task's metric) against trainable parameters, a
  line per method.

Several ``--config`` (say one per task) run into ``out/<config>/`` and collect into one table:
a point's row has every config's task columns, and a step-time column per config (the median
train step of the run, compile excluded). ``--select=<metric>`` folds the learning-rate grid:
each method keeps, per task, the rate best on that metric on the evaluation split (given in the
cell), and the average is of that metric; ``results_all.md`` keeps every point.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from typing import Any, Sequence

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


# How an override reads in a row label (the method and its size are the label's start).
_SHORT = {'optimizer.learning_rate': 'lr'}


def method_label(over: dict[str, str], leave_out: Sequence[str] = ()) -> str:
  """``adalink r=16``, ``prompt 20``, ``ft``, ``adalink r=16 (random backbone)``, ``zero-shot``
  ... from a point's overrides (``leave_out``: keys a table folds, e.g. the learning rate)."""
  if str(over.get('total_steps', '')) == '0':
    return 'zero-shot'
  m = over.get('peft.method', '')
  field = registry.get(m).size_field if m in registry.names() else None
  size = f'peft.{field}' if field else None
  label = m or 'default'
  if size and size in over:
    label = f'{m} {"r=" if "rank" in size else ""}{over[size]}'
  extras = []
  for k, v in over.items():
    if k in ('peft.method', size, 'eval.at_start') or k in leave_out:
      continue
    # An emptied init.<tower> is the random-initialisation control.
    extras.append('random backbone' if k.startswith('init.') and v == '' else
                  f'{_SHORT.get(k, k)}={v}')
  return label + (f' ({", ".join(extras)})' if extras else '')


def _tasks_of(metrics: dict) -> dict[str, dict[str, float]]:
  """``{'task/metric': v}`` -> ``{task: {metric: v}}`` (bare names and 'average' are not tasks)."""
  out: dict[str, dict[str, float]] = {}
  for k, v in metrics.items():
    if '/' in k and isinstance(v, (int, float)):
      task, metric = k.split('/', 1)
      out.setdefault(task, {})[metric] = float(v)
  return out


def _point_dirs(out: str) -> list[tuple[str, str]]:
  """``(group, point dir)`` of every point under ``out``: ``out/<point>`` (one config, group
  '') or ``out/<config>/<point>`` (several configs, one folder each)."""
  found = []
  for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
    d = os.path.join(out, name)
    if os.path.exists(os.path.join(d, 'result.json')):
      found.append(('', d))
    elif os.path.isdir(d):
      found += [(name, os.path.join(d, p)) for p in sorted(os.listdir(d))
                if os.path.exists(os.path.join(d, p, 'result.json'))]
  return found


def compute_seconds(workdir: str) -> tuple[float, float]:
  """(train, eval) seconds a point computed, from its ``metrics.jsonl``: each logged interval
  of steps at its logged rate, each evaluation from the record logged just before it. Time
  between a stop and the resume is not counted; an evaluation at step 0 (the first record) is
  not timed."""
  path = os.path.join(workdir, 'metrics.jsonl')
  train = evaluation = 0.0
  if not os.path.exists(path):
    return train, evaluation
  step, before = 0, None
  with open(path, encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if r['kind'] == 'train' and r.get('steps_per_second'):
        train += max(r['step'] - step, 0) / r['steps_per_second']
        step = r['step']
      elif r['kind'] == 'eval' and before is not None:
        evaluation += r['time'] - before
      before = r['time']
  return train, evaluation


def _overrides(point: str) -> dict[str, str]:
  """A point's folder name (:func:`point_name`) -> its overrides ``{key: value}``."""
  return dict(kv.split('=', 1) for kv in point.split(',') if '=' in kv)


def _row(group: str, workdir: str, r: dict) -> dict[str, Any]:
  name = os.path.basename(workdir)
  over = _overrides(name)
  evaluated = _sweep_eval(workdir)
  # A point that trains no step (the zero-shot row) is scored by its evaluation at start.
  scored = evaluated or r.get('eval') or (r.get('eval_at_start') if not r.get('step') else None)
  metrics = {k: v for k, v in (scored or {}).items()
             if k not in ('step', 'num_examples', 'num_examples_per_task')}
  row = {'point': name, 'method': over.get('peft.method', ''), 'label': method_label(over),
         'rank': over.get('peft.rank', ''), 'lr': over.get('optimizer.learning_rate', ''),
         'trainable_params': r.get('trainable_params') if r.get('step') else 0,
         'final_loss': r.get('final_loss'), 'step': r.get('step')}
  suffix = '_' + group if group else ''
  if r.get('step_time_s') is not None:
    row[f'step_time_s{suffix}'] = r['step_time_s']
  row[f'train_s{suffix}'], row[f'eval_s{suffix}'] = compute_seconds(workdir)
  row.update({f'eval_{k}': v for k, v in metrics.items()})
  return row


def collect(out: str, select: str = '', shown: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Reads every finished point -> rows; writes results.md, results.csv and results.png.

  Points of several configs (``out/<config>/<point>``) with the same overrides are one row, with
  each config's task columns. select: a metric (e.g. ``rank_accuracy``): results.md then folds
  the learning-rate grid, giving each task the value of the learning rate best on that metric
  (the rate in the cell), and averages that metric over the tasks; results_all.md keeps every
  point. shown: the metrics the markdown shows (default: all). Points that have not finished
  (running, preempted, failed) are left out and named."""
  rows: dict[str, dict[str, Any]] = {}
  unfinished = []
  for group, workdir in _point_dirs(out):
    r = _finished_result(workdir)
    if r is None:
      unfinished.append(os.path.relpath(workdir, out))
      continue
    row = _row(group, workdir, r)
    merged = rows.setdefault(row['point'], {})  # the same point of another config: one row
    for k, v in row.items():
      if v is not None or k not in merged:
        merged[k] = v
  if unfinished:
    print(f'not finished, left out of the table: {", ".join(unfinished)}', file=sys.stderr)
  rows_list = list(rows.values())
  if not rows_list:
    return rows_list
  keys = list(dict.fromkeys(k for r in rows_list for k in r))
  with open(os.path.join(out, 'results.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows_list)
  table = paper_table(rows_list, shown=shown)
  if select:
    with open(os.path.join(out, 'results_all.md'), 'w', encoding='utf-8') as f:
      f.write(table + '\n')
    folded = fold_grid(rows_list, select)
    table = paper_table(folded, shown=shown, average_of=select)
  else:
    folded = rows_list
  with open(os.path.join(out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(table + '\n\n' + compute_line(rows_list) + '\n')
  _plot(folded, os.path.join(out, 'results.png'),
        metric='eval_average' if not select else 'avg_selected')
  return rows_list


def compute_line(rows: list[dict[str, Any]]) -> str:
  """What the collected points took to compute (:func:`compute_seconds`), summed."""
  train = sum(v for r in rows for k, v in r.items() if k.startswith('train_s'))
  evaluation = sum(v for r in rows for k, v in r.items() if k.startswith('eval_s'))
  runs = sum(1 for r in rows for k in r if k.startswith('train_s'))
  return (f'Compute over {runs} runs: training {train / 3600:.2f} h + evaluation '
          f'{evaluation / 3600:.2f} h = {(train + evaluation) / 3600:.2f} h (logged steps at '
          'their logged rates, evaluations from the log before them; stops excluded).')


def fold_grid(rows: list[dict[str, Any]], select: str,
              grid_key: str = 'optimizer.learning_rate') -> list[dict[str, Any]]:
  """One row per label without ``grid_key``: each task's metrics from the point best on
  ``task/select`` (ties: the first), that point's ``grid_key`` value in ``chosen_<task>``, and
  ``avg_selected`` -- only for a label scored on every task of the sweep (an average over
  some tasks would not compare with the others, e.g. in a sweep still running)."""
  every_task = {t for r in rows for t in _tasks_of(_evals(r))
                if f'eval_{t}/{select}' in r}
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(method_label(_overrides(r['point']), leave_out=(grid_key,)), []).append(r)
  out = []
  for label, members in groups.items():
    row = {k: v for k, v in members[0].items() if not k.startswith('eval_')}
    row['label'] = label
    tasks = sorted({t for m in members for t in _tasks_of(_evals(m))})
    picked = []
    for task in tasks:
      have = [m for m in members if f'eval_{task}/{select}' in m]
      if not have:
        continue
      best = max(have, key=lambda m: m[f'eval_{task}/{select}'])
      row.update({k: v for k, v in best.items() if k.startswith(f'eval_{task}/')})
      if len(members) > 1:
        row[f'chosen_{task}'] = _overrides(best['point']).get(grid_key, '')
      picked.append(best[f'eval_{task}/{select}'])
    if picked and len(picked) == len(every_task):
      row['avg_selected'] = sum(picked) / len(picked)
    out.append(row)
  return out


def _evals(row: dict[str, Any]) -> dict[str, Any]:
  return {k[len('eval_'):]: v for k, v in row.items() if k.startswith('eval_')}


def _cell(values: dict[str, float]) -> str:
  return '/'.join(f'{v:.1f}' for v in values.values())


def paper_table(rows: list[dict[str, Any]], shown: Sequence[str] = (),
                average_of: str = '') -> str:
  """Markdown: method | trainable params | one column per task | average | step time.

  shown: the metrics to show, in this order (default all); average_of: the column averaged over
  tasks is that metric (``avg_selected`` of :func:`fold_grid`), else the runs' own ``average``."""
  order = {m: i for i, m in enumerate(shown)}
  per_row = [{t: dict(sorted(((m, v) for m, v in ms.items() if not shown or m in shown),
                             key=lambda mv: order.get(mv[0], len(order))))
              for t, ms in _tasks_of(_evals(r)).items()} for r in rows]
  tasks = sorted({t for p in per_row for t in p if p[t]})
  metric_names = {t: '/'.join(next(p[t] for p in per_row if p.get(t))) for t in tasks}
  head = ['method', 'trainable params'] + [f'{t} ({metric_names[t]})' for t in tasks]
  avg_key = 'avg_selected' if average_of else 'eval_average'
  with_avg = any(avg_key in r for r in rows)
  head += [f'average ({average_of})' if average_of else 'average'] if with_avg else []
  step_keys = sorted({k for r in rows for k in r if k.startswith('step_time_s')})
  if step_keys:
    groups = [k[len('step_time_s_'):] for k in step_keys if k != 'step_time_s']
    head.append(f'step (s{", " + "/".join(groups) if groups else ""})')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r, p in zip(rows, per_row):
    params = r.get('trainable_params')
    cells = [r['label'], f'{params:,}' if isinstance(params, int) else '']
    for t in tasks:
      chosen = f' @{r[f"chosen_{t}"]}' if r.get(f'chosen_{t}') else ''
      cells.append(_cell(p[t]) + chosen if p.get(t) else '')
    if with_avg:
      cells.append(f'{r[avg_key]:.1f}' if avg_key in r else '')
    if step_keys:
      cells.append('/'.join(f'{r[k]:.2f}' if r.get(k) is not None else '-' for k in step_keys))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _plot(rows: list[dict[str, Any]], path: str, metric: str = 'eval_average'):
  """``metric`` (else the first bare metric, else the loss) against trainable parameters: a line
  per label family (method), a horizontal line for rows that train nothing (zero-shot)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not any(metric in r for r in rows):
    metric = next((k for k in rows[0] if k.startswith('eval_') and '/' not in k), 'final_loss')
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  series: dict[str, list[tuple[int, float]]] = {}
  for r in rows:
    if r.get(metric) is None:
      continue
    if not r.get('trainable_params'):
      ax.axhline(r[metric], color='gray', ls='--', lw=1, label=r['label'])
      continue
    extra = r['label'].split(' (', 1)[1].rstrip(')') if ' (' in r['label'] else ''
    name = (r['method'] or 'default') + (f' ({extra})' if extra else '')
    series.setdefault(name, []).append((r['trainable_params'], r[metric]))
  for name, pts in sorted(series.items()):
    pts.sort()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=name)
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel({'avg_selected': 'average over tasks'}.get(metric, metric.replace('eval_', '')))
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def config_outputs(configs: Sequence[str], out: str) -> list[tuple[str, str]]:
  """``(config, its output folder)``: ``out`` for one config, ``out/<config's name>`` for several
  (their points then share the table's rows: one column group per config)."""
  if len(configs) == 1:
    return [(configs[0], out)]
  names = [os.path.splitext(os.path.basename(c.split(':')[0]))[0] for c in configs]
  if len(set(names)) != len(names):
    raise SystemExit(f'--config: two configs share a file name ({names}); their points would '
                     'share a folder')
  return [(c, os.path.join(out, n)) for c, n in zip(configs, names)]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', required=True, action='append',
                 help='a config file with sweep(add) (``file.py:arg`` too); repeat it to run '
                 'several configs into one table (e.g. one per task)')
  p.add_argument('--out', required=True)
  p.add_argument('--mode', choices=('print', 'run', 'eval', 'collect'), default='print')
  p.add_argument('--eval_tasks', default='', help='with --mode=eval: comma-separated seqio '
                 'tasks or mixtures (default: each config\'s eval tasks)')
  p.add_argument('--select', default='', help='a metric (e.g. rank_accuracy): results.md keeps, '
                 'per method and task, the learning rate of the grid best on it')
  p.add_argument('--metrics', default='', help='comma-separated metrics results.md shows '
                 '(default: all)')
  args, extra = p.parse_known_args(argv)
  tasks = [t for t in args.eval_tasks.split(',') if t]
  if args.mode != 'collect':
    for config, out in config_outputs(args.config, args.out):
      for cmd in commands(config, out, extra, args.mode, tasks):
        print(shlex.join(cmd), flush=True)
        if args.mode in ('run', 'eval'):
          if _done(cmd):
            continue  # finished earlier
          rc = subprocess.call(cmd)
          if rc:
            print(f'point failed (exit {rc}): {shlex.join(cmd)}', file=sys.stderr)
            return rc
  rows = collect(args.out, select=args.select,
                 shown=tuple(m for m in args.metrics.split(',') if m))
  if rows:
    print(f'collected {len(rows)} points into {args.out}/results.{{md,csv,png}}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
