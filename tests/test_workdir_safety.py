"""Nothing lost, nothing silent: another experiment on a workdir, re-runs, the lock, corrupt
checkpoints, non-finite states, SIGTERM at start-up, standalone evaluation, sweeps, typos."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from adalink_jax import checkpointing
from adalink_jax import sweep
from adalink_jax import trainer
from adalink_jax import workdir as workdir_lib
from tests.test_train import ROOT, assets, cli_args, final_trainable, tiny_config  # noqa: F401


def _snapshot(workdir):
  """Every file under ``workdir`` -> its bytes (what 'nothing was touched' means)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, workdir)] = fh.read()
  return out


def _config(assets, **over):  # noqa: F811
  base = {'eval.every': 12, 'eval.at_start': True}
  base.update(over)
  return tiny_config(assets, **base)


@pytest.fixture(scope='module')
def finished(assets, tmp_path_factory):  # noqa: F811
  """A finished 12-step AdaLink run (rank 8): checkpoints 8 and 12, eval at 0 and 12."""
  w = str(tmp_path_factory.mktemp('finished'))
  trainer.train(_config(assets), w)
  return w


def _copy(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  return str(dst)


def test_other_experiment_is_refused_and_nothing_is_touched(assets, finished, tmp_path):  # noqa: F811
  w = _copy(finished, tmp_path / 'w')
  before = _snapshot(w)
  with pytest.raises(workdir_lib.WorkdirError, match=r'peft\.rank: 8 -> 4.*restart=True'):
    trainer.train(_config(assets, **{'peft.rank': 4}), w)
  assert _snapshot(w) == before
  # The explicit way out: the old run is moved aside, whole, and a new one starts.
  result = trainer.train(_config(assets, **{'peft.rank': 4, 'restart': True}), w)
  assert result['trainable_params'] == 1024 and result['finished']
  (prev,) = os.listdir(os.path.join(w, 'previous'))
  moved = _snapshot(os.path.join(w, 'previous', prev))
  assert moved == before


def test_checkpoint_of_other_shapes_is_a_mismatch_not_corruption(assets, finished, tmp_path):  # noqa: F811
  w = _copy(finished, tmp_path / 'w')
  os.remove(os.path.join(w, 'config.json'))  # a workdir from before config.json was recorded
  before = _snapshot(w)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'trainable/.*checkpoint \(64, 8\) float32 vs this run \(64, 4\)'):
    trainer.train(_config(assets, **{'peft.rank': 4}), w)
  assert _snapshot(w) == before  # nothing moved aside as "corrupt", no config.json written


def test_rerun_of_finished_run_leaves_results_alone(assets, finished, tmp_path, caplog):  # noqa: F811
  w = _copy(finished, tmp_path / 'w')
  before = _snapshot(w)
  with caplog.at_level(logging.INFO):
    result = trainer.train(_config(assets), w)
  assert 'finished at step 12' in caplog.text
  assert _snapshot(w) == before
  assert result['eval_at_start'] == json.loads(before['result.json'])['eval_at_start']
  # Training longer resumes and keeps the eval before training in result.json.
  longer = trainer.train(_config(assets, total_steps=16, **{'optimizer.total_steps': 16,
                                                            'eval.every': 16}), w)
  assert longer['step'] == 16 and longer['finished']
  assert longer['eval_at_start'] == result['eval_at_start']
  assert 'metrics_12.json' in os.listdir(os.path.join(w, 'eval'))


def test_lock_refuses_a_second_writer(assets, tmp_path):  # noqa: F811
  w = tmp_path / 'w'
  first = subprocess.Popen(cli_args(assets, w, total_steps=100000, checkpoint_every=100000,
                                    **{'optimizer.total_steps': 100000}),
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and not (w / 'metrics.jsonl').exists():
      time.sleep(0.1)
    assert (w / workdir_lib.LOCK).exists()
    with pytest.raises(workdir_lib.WorkdirError, match=f'in use by another training run \\(pid '
                       f'{first.pid}'):
      trainer.train(tiny_config(assets, log_every=1, checkpoint_every=2), str(w))
    assert first.poll() is None  # the first run goes on
  finally:
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
  assert first.returncode == 0, out[-2000:]
  assert not (w / workdir_lib.LOCK).exists()  # released on exit


def test_stale_lock_is_taken_over_and_foreign_lock_refused(assets, tmp_path, caplog):  # noqa: F811
  w = tmp_path / 'w'
  w.mkdir()
  dead = subprocess.Popen(['true'])
  dead.wait()
  lock = w / workdir_lib.LOCK
  lock.write_text(json.dumps({'host': os.uname().nodename, 'pid': dead.pid, 'time': 'then'}))
  with caplog.at_level(logging.WARNING):
    assert trainer.train(tiny_config(assets), str(w))['finished']
  assert 'stale lock' in caplog.text and not lock.exists()
  lock.write_text(json.dumps({'host': 'another-host', 'pid': 1, 'time': 'now'}))
  with pytest.raises(workdir_lib.WorkdirError, match='pid 1 on another-host'):
    trainer.train(tiny_config(assets), str(w))


def _corrupt(step_dir):
  """Overwrite the array data of a checkpoint, as a crash mid-copy would."""
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for f in files:
      if 'manifest' in f or os.sep + 'd' in root:
        with open(os.path.join(root, f), 'wb') as fh:
          fh.write(b'\0\1garbage')


def test_corrupt_checkpoint_moved_aside_and_later_runs_work(assets, finished, tmp_path, caplog):  # noqa: F811
  w = _copy(finished, tmp_path / 'w')
  _corrupt(os.path.join(w, 'checkpoints', '12'))
  over = lambda n: dict(total_steps=n, **{'optimizer.total_steps': n, 'eval.every': 0})  # noqa: E731
  with caplog.at_level(logging.INFO):
    r = trainer.train(_config(assets, **over(16)), w)
  assert r['step'] == 16 and r['finished']
  assert 'moved it to' in caplog.text and 'resumed from step 8' in caplog.text
  assert os.path.isdir(os.path.join(w, 'checkpoints', 'corrupt', '12', 'state'))
  # The step that was corrupt was saved anew, and the next run resumes normally.
  assert {'12', '16'} <= set(os.listdir(os.path.join(w, 'checkpoints')))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert trainer.train(_config(assets, **over(20)), w)['step'] == 20
  assert 'resumed from step 16' in caplog.text


def test_non_finite_state_is_never_saved(assets, tmp_path):  # noqa: F811
  c = tiny_config(assets, checkpoint_every=1, log_every=100,
                  **{'optimizer.learning_rate': float('inf'), 'optimizer.schedule': 'constant',
                     'optimizer.warmup_steps': 0, 'optimizer.grad_clip_norm': 0.0})
  with pytest.raises(trainer.NonFiniteLossError, match='no checkpoint had been saved yet'):
    trainer.train(c, str(tmp_path))
  saved = [p for p in os.listdir(tmp_path / 'checkpoints') if p.isdigit()]
  assert saved == []  # step 1's loss was finite, but its updated state was not: not saved


def test_non_finite_after_a_good_checkpoint_names_it(assets, finished, tmp_path):  # noqa: F811
  w = _copy(finished, tmp_path / 'w')
  c = _config(assets, total_steps=16, checkpoint_every=1, log_every=100, restart=False,
              **{'optimizer.total_steps': 16})
  with pytest.raises(trainer.NonFiniteLossError, match=r'last good checkpoint \(step 12\)'):
    # The saved optimizer config must match, so make the update itself blow up: inf data.
    _train_with_poisoned_batches(c, w)
  steps = sorted(int(p) for p in os.listdir(os.path.join(w, 'checkpoints')) if p.isdigit())
  assert steps[-1] == 12
  _, flat = final_trainable(w)
  assert all(np.isfinite(v).all() for v in flat.values())


def _train_with_poisoned_batches(config, workdir):
  """Runs trainer.train with a source whose images are inf (a real corrupt-data failure)."""
  from adalink_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  real = input_pipeline.make_source

  def poisoned(cfg):
    src = real(cfg)
    train = src.train_batches

    def batches(start=0):
      for b in train(start):
        yield dict(b, image=np.full_like(b['image'], np.inf))
    src.train_batches = batches
    return src
  input_pipeline.make_source = poisoned
  try:
    trainer.train(config, workdir)
  finally:
    input_pipeline.make_source = real


def test_zero_gradient_warns(assets, tmp_path, caplog):  # noqa: F811
  # Data whose loss weights are all zero (e.g. every target cut away) gives exactly zero
  # gradients: the run says so instead of idling silently.
  c = tiny_config(assets, log_every=2)
  from adalink_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  real = input_pipeline.make_source

  def no_loss(cfg):
    src = real(cfg)
    train = src.train_batches
    src.train_batches = lambda start=0: (
        dict(b, decoder_loss_weights=np.zeros_like(b['decoder_loss_weights']))
        for b in train(start))
    return src
  input_pipeline.make_source = no_loss
  try:
    with caplog.at_level(logging.WARNING):
      trainer.train(c, str(tmp_path))
  finally:
    input_pipeline.make_source = real
  assert 'gradient is exactly zero at step 2' in caplog.text


def test_sigterm_during_start_up_is_a_clean_stop(assets, tmp_path):  # noqa: F811
  proc = subprocess.Popen(cli_args(assets, tmp_path, **{'eval.at_start': True,
                                                        'eval.num_batches': 50}),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not (tmp_path / workdir_lib.LOCK).exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  assert 'stopped: SIGTERM during' in out
  assert not [p for p in os.listdir(tmp_path / 'checkpoints') if p.isdigit()]


def test_sweep_reruns_a_preempted_point_and_leaves_it_out_of_the_table(tmp_path, capsys):
  for name, r in {'peft.rank=2': {'step': 4, 'finished': True, 'trainable_params': 512,
                                  'eval': {'vqa_accuracy': 50.0}},
                  'peft.rank=8': {'step': 3, 'finished': False, 'preempted_at': 3,
                                  'trainable_params': 2048}}.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / 'result.json').write_text(json.dumps(r))
  rows = sweep.collect(str(tmp_path))
  assert [r['point'] for r in rows] == ['peft.rank=2']
  assert 'not finished, left out of the table: peft.rank=8' in capsys.readouterr().err
  cmd = lambda n: ['python', '-m', 'adalink_jax.train', f'--workdir={tmp_path / n}']  # noqa: E731
  assert sweep._done(cmd('peft.rank=2')) and not sweep._done(cmd('peft.rank=8'))


def test_config_typo_is_one_line_with_close_matches(assets, tmp_path):  # noqa: F811
  for bad, hint in (('peft.rnk=4', 'did you mean config.peft.rank?'),
                    ('num_step=5', 'did you mean config.total_steps')):
    p = subprocess.run(cli_args(assets, tmp_path) + [f'--config.{bad}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f'error: unknown config field config.{bad.split("=")[0]}') and hint in line


def test_evaluate_and_export_find_the_demo_backbone_and_evaluate_writes_apart(assets, tmp_path):  # noqa: F811
  # The real demo path (data.mode=vqa): its frozen backbone is made on first use, here in 60
  # steps; evaluate and export must find that same backbone without being told.
  over = [f'--config.data.assets_dir={tmp_path / "assets"}', '--config.demo_backbone.steps=60',
          '--config.demo_backbone.batch_size=8', '--config.batch_size=8',
          '--config.eval.num_batches=1']
  os.makedirs(tmp_path / 'assets')
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copy(os.path.join(assets, 'spm.model'), tmp_path / 'assets' / 'spm.model')
  cfg = f'--config={ROOT / "configs" / "demo.py"}'
  run = tmp_path / 'run'
  subprocess.run([sys.executable, '-m', 'adalink_jax.train', cfg, f'--workdir={run}',
                  '--config.total_steps=4', '--config.optimizer.total_steps=4',
                  '--config.optimizer.warmup_steps=1',
                  '--config.eval.every=4', '--config.eval.at_start=False'] + over,
                 check=True, cwd=ROOT, capture_output=True, timeout=400)
  train_eval = (run / 'eval' / 'metrics_4.json').read_bytes()
  ev = subprocess.run([sys.executable, '-m', 'adalink_jax.evaluate', cfg, f'--checkpoint={run}']
                      + over, cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert ev.returncode == 0, ev.stderr[-3000:]
  result = json.loads(ev.stdout.strip().splitlines()[-1])
  (out,) = os.listdir(run / 'evaluations')
  assert out.startswith('step4-')
  saved = json.loads((run / 'evaluations' / out / 'eval' / 'metrics_4.json').read_text())
  assert saved['vqa_accuracy'] == result['vqa_accuracy']
  assert (run / 'eval' / 'metrics_4.json').read_bytes() == train_eval  # untouched
  again = subprocess.run([sys.executable, '-m', 'adalink_jax.evaluate', cfg,
                          f'--checkpoint={run}', f'--out={run / "evaluations" / out}'] + over,
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert again.returncode == 1 and 'exists' in again.stderr
  ex = subprocess.run([sys.executable, '-m', 'adalink_jax.export', cfg, f'--workdir={run}',
                       f'--out={tmp_path / "adapter"}'] + over, cwd=ROOT, capture_output=True,
                      text=True, timeout=400)
  assert ex.returncode == 0, ex.stderr[-3000:]
  assert (tmp_path / 'adapter' / 'adapter.safetensors').exists()


def test_eval_compiles_predict_once_and_warns_on_collapse(assets, tmp_path, caplog):  # noqa: F811
  t = trainer.Trainer(tiny_config(assets), str(tmp_path))
  trainable, frozen = t.init_params()
  first = t.evaluate(trainable, frozen, 1)
  second = t.evaluate(trainable, frozen, 2)
  assert first == second
  # one jitted eval per run (its one task has no label words), compiled once
  assert [f._cache_size() for f in t._predict.values()] == [1]  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    trainer._warn_if_collapsed({'exact_match': 46.5}, {'exact_match': 0.0}, 7)  # pylint: disable=protected-access
    trainer._warn_if_collapsed({'exact_match': 0.0}, {'exact_match': 0.0}, 8)  # pylint: disable=protected-access
  assert 'eval exact_match collapsed from 46.5 to 0 at step 7' in caplog.text
  assert 'step 8' not in caplog.text
