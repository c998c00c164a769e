"""sweep's table from several configs: one row per point across configs, the learning-rate grid
folded by a metric, the zero-shot and random-backbone rows, the step-time column."""
import csv
import json

from adalink_jax import sweep


def _point(root, group, name, *, step=60, params=20480, evals=None, at_start=None, step_s=1.5):
  d = root / group / name
  d.mkdir(parents=True)
  r = {'step': step, 'finished': True, 'trainable_params': params, 'final_loss': 0.5,
       'step_time_s': step_s}
  if evals is not None:
    r['eval'] = evals
  if at_start is not None:
    r['eval_at_start'] = at_start
  (d / 'result.json').write_text(json.dumps(r))


def test_two_configs_fold_the_grid_by_the_selected_metric(tmp_path, capsys):
  lo, hi = 'optimizer.learning_rate=0.0003', 'optimizer.learning_rate=0.003'
  ada, rnd = 'peft.method=adalink,peft.rank=16', 'peft.method=adalink,peft.rank=16,init.gemma='
  # MR prefers the high rate, TREC the low one: each task keeps its own best.
  _point(tmp_path, 'mr', f'{ada},{lo}', evals={'mr/rank_accuracy': 70.0, 'mr/accuracy': 69.0})
  _point(tmp_path, 'mr', f'{ada},{hi}', evals={'mr/rank_accuracy': 80.0, 'mr/accuracy': 79.0},
         step_s=1.25)
  _point(tmp_path, 'trec', f'{ada},{lo}', step_s=1.0,
         evals={'trec/rank_accuracy': 90.0, 'trec/rank_macro_f1': 85.0})
  _point(tmp_path, 'trec', f'{ada},{hi}', step_s=0.5,
         evals={'trec/rank_accuracy': 60.0, 'trec/rank_macro_f1': 50.0})
  _point(tmp_path, 'mr', f'{rnd},{hi}', evals={'mr/rank_accuracy': 50.0})
  zero = 'total_steps=0,eval.at_start=True,peft.method=adalink'
  _point(tmp_path, 'mr', zero, step=0, at_start={'mr/rank_accuracy': 58.0}, step_s=None)
  _point(tmp_path, 'trec', zero, step=0, at_start={'trec/rank_accuracy': 30.0,
                                                   'trec/rank_macro_f1': 20.0}, step_s=None)
  (tmp_path / 'trec' / 'peft.method=lora').mkdir()  # a point still running: named, left out
  (tmp_path / 'trec' / 'peft.method=lora' / 'result.json').write_text(
      json.dumps({'step': 3, 'finished': False}))

  rows = sweep.collect(str(tmp_path), select='rank_accuracy',
                       shown=('rank_accuracy', 'rank_macro_f1'))
  # The metrics in the order asked for, whatever order the runs wrote them in.
  assert sweep.paper_table(rows, shown=('rank_macro_f1', 'rank_accuracy')).startswith(
      '| method | trainable params | mr (rank_accuracy) | trec (rank_macro_f1/rank_accuracy) |')
  assert 'not finished, left out of the table: trec/peft.method=lora' in capsys.readouterr().err
  by_point = {r['point']: r for r in rows}
  assert len(rows) == 4  # adalink x 2 rates, random backbone, zero-shot: configs merged
  merged = by_point[f'{ada},{hi}']
  assert merged['eval_mr/rank_accuracy'] == 80.0 and merged['eval_trec/rank_accuracy'] == 60.0
  assert merged['step_time_s_mr'] == 1.25 and merged['step_time_s_trec'] == 0.5
  assert by_point[zero]['trainable_params'] == 0 and by_point[zero]['label'] == 'zero-shot'
  assert by_point[f'{rnd},{hi}']['label'] == 'adalink r=16 (random backbone, lr=0.003)'

  md = (tmp_path / 'results.md').read_text().splitlines()
  assert md[0] == ('| method | trainable params | mr (rank_accuracy) | '
                   'trec (rank_accuracy/rank_macro_f1) | average (rank_accuracy) | '
                   'step (s, mr/trec) |')
  # Folded: MR at 3e-3 (80.0), TREC at 3e-4 (90.0/85.0), the average of the selected metric.
  assert '| adalink r=16 | 20,480 | 80.0 @0.003 | 90.0/85.0 @0.0003 | 85.0 | 1.50/1.00 |' in md
  # Scored on MR only (its TREC point not run yet): no average over a subset of the tasks.
  assert '| adalink r=16 (random backbone) | 20,480 | 50.0 |  |  | 1.50/- |' in md
  assert '| zero-shot | 0 | 58.0 | 30.0/20.0 | 44.0 | -/- |' in md
  every = (tmp_path / 'results_all.md').read_text()
  assert '| adalink r=16 (lr=0.0003) | 20,480 | 70.0 | 90.0/85.0 |' in every
  csv_rows = list(csv.DictReader(open(tmp_path / 'results.csv')))
  assert {r['point'] for r in csv_rows} == set(by_point)
  assert (tmp_path / 'results.png').stat().st_size > 1000


def test_several_configs_get_a_folder_each():
  assert sweep.config_outputs(['configs/a.py:steps=3'], '/o') == [('configs/a.py:steps=3', '/o')]
  assert sweep.config_outputs(['configs/mr.py:steps=3', 'x/trec.py'], '/o') == [
      ('configs/mr.py:steps=3', '/o/mr'), ('x/trec.py', '/o/trec')]


def test_readme_real_weights_command_lists_both_tasks_every_point(tmp_path):
  """The README's real-weights command (print mode: the run needs the gemma3 and realdata
  extras and hours): both configs, each point once, each into its config's folder."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = __import__('pathlib').Path(__file__).resolve().parents[1]
  cmd = [sys.executable, '-m', 'adalink_jax.sweep',
         '--config=configs/mr_gemma3_270m.py:steps=40,eval_batches=16',
         '--config=configs/trec_gemma3_270m.py:steps=40,eval_batches=16', f'--out={tmp_path}',
         '--mode=print',
         '--select=rank_accuracy', '--metrics=rank_accuracy,rank_macro_f1']
  lines = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True,
                         timeout=120).stdout.splitlines()
  per_task = len(sweep.points(str(root / 'configs' / 'mr_gemma3_270m.py')))
  assert per_task == 2 * 9 + 1  # 9 methods/controls x 2 learning rates + zero-shot
  assert len(lines) == 2 * per_task
  for task in ('mr', 'trec'):
    mine = [l for l in lines if f'--workdir={tmp_path}/{task}_gemma3_270m/' in l]
    assert len(mine) == per_task and all(
        f'configs/{task}_gemma3_270m.py:steps=40,eval_batches=16' in l for l in mine)


def test_compute_time_counts_logged_steps_and_evals_not_the_stops(tmp_path):
  """A point's metrics.jsonl as the trainer writes it: an eval at step 0 (untimed: nothing is
  logged before it), 10 steps at 2/s and 10 at 1/s, a stop of 1000 s, 10 steps at 0.5/s, then
  the final eval 7 s after the last log. The table's footer sums every point."""
  rows = [dict(step=0, kind='eval', time=100.0), dict(step=10, kind='train', time=110.0,
                                                       steps_per_second=2.0),
          dict(step=20, kind='train', time=120.0, steps_per_second=1.0),
          dict(step=30, kind='train', time=1140.0, steps_per_second=0.5),
          dict(step=30, kind='eval', time=1147.0)]
  _point(tmp_path, 'mr', 'peft.method=adalink,peft.rank=16', evals={'mr/accuracy': 70.0})
  point = tmp_path / 'mr' / 'peft.method=adalink,peft.rank=16'
  (point / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  assert sweep.compute_seconds(str(point)) == (5.0 + 10.0 + 20.0, 7.0)
  _point(tmp_path, 'trec', 'peft.method=adalink,peft.rank=16', evals={'trec/accuracy': 60.0})
  (tmp_path / 'trec' / 'peft.method=adalink,peft.rank=16' / 'metrics.jsonl').write_text(
      json.dumps(dict(step=36, kind='train', time=0.0, steps_per_second=0.01)) + '\n')
  sweep.collect(str(tmp_path))
  assert (tmp_path / 'results.md').read_text().splitlines()[-1].startswith(
      'Compute over 2 runs: training 1.01 h + evaluation 0.00 h = 1.01 h')  # 35 s + 3600 s


def test_readme_full_protocol_commands_run(tmp_path):
  """The README's full-protocol commands, as shown (the two runs in print mode: they need the
  extras and hours): each run lists its config's every point into its folder, and the collect
  command reads those folders."""
  import re  # pylint: disable=g-import-not-at-top
  import shlex  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = __import__('pathlib').Path(__file__).resolve().parents[1]
  readme = (root / 'README.md').read_text()
  block = readme.split('### The full protocol', 1)[1].split('```')[1]
  commands = [shlex.split(c.replace('\\\n', ' ')) for c in
              re.split(r'\n(?=python )', block.strip())]
  assert [c[:3] for c in commands] == [['python', '-m', 'adalink_jax.sweep']] * 3
  per_task = len(sweep.points(str(root / 'configs' / 'mr_gemma3_270m.py')))
  for cmd in commands:
    args = [a.replace('--out=S', f'--out={tmp_path}').replace('--mode=run', '--mode=print')
            for a in cmd[3:]]
    out = subprocess.run([sys.executable, '-m', 'adalink_jax.sweep', *args], cwd=root,
                         check=True, capture_output=True, text=True, timeout=120).stdout
    if '--mode=print' in args:
      task = 'mr' if 'mr_gemma3_270m.py' in args[0] else 'trec'
      assert out.count(f'--workdir={tmp_path}/{task}_gemma3_270m/') == per_task
