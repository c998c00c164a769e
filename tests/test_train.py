"""The train system end to end on the demo task: logs, eval, resume, preemption, NaN, dry run."""
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adalink_jax import demo
from adalink_jax import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / 'configs' / 'demo.py'


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
  d = tmp_path_factory.mktemp('demo_assets')
  demo.train_vocabulary(demo.spm_path(str(d)))
  return str(d)


def tiny_config(assets, **over):
  """configs/demo.py on a random backbone ('pretrain' prompts), small enough for tests."""
  spec = importlib.util.spec_from_file_location('demo_config', DEMO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.assets_dir = assets
  c.data.mode = 'pretrain'
  c.batch_size = 8
  c.total_steps = 12
  c.optimizer.total_steps = 12
  c.optimizer.warmup_steps = 2
  c.log_every = 2
  c.checkpoint_every = 4
  c.eval.every = 0
  c.eval.num_batches = 1
  c.eval.metric = 'exact_match'
  c.eval.at_start = False
  for k, v in over.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def cli_args(assets, workdir, **over):
  base = {'data.assets_dir': assets, 'data.mode': 'pretrain', 'batch_size': 8,
          'total_steps': 12, 'optimizer.total_steps': 12, 'optimizer.warmup_steps': 2,
          'log_every': 1, 'checkpoint_every': 2, 'eval.every': 0, 'eval.at_start': False}
  base.update(over)
  return ([sys.executable, '-m', 'adalink_jax.train', f'--config={DEMO_CONFIG}',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in base.items()])


def final_trainable(workdir):
  """The trainable params of the newest checkpoint, as numpy, read with Orbax directly."""
  ckdir = pathlib.Path(workdir) / 'checkpoints'
  step = max(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  path = ckdir / str(step) / 'state'
  ckptr = ocp.StandardCheckpointer()
  # Restore onto this process's first device whatever mesh or process count saved it.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ckptr.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  state = ckptr.restore(path, target)
  flat = {}

  def walk(prefix, node):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(f'{prefix}{k}/', v)
      else:
        flat[prefix + k] = np.asarray(v)
  walk('', state['trainable'])
  return step, flat


def rows(workdir, kind='train'):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


def test_train_loss_falls_and_writes_logs(assets, tmp_path):
  c = tiny_config(assets, total_steps=30, **{'optimizer.total_steps': 30, 'peft.method': 'ft',
                                            'optimizer.learning_rate': 3e-3, 'eval.every': 30,
                                            'checkpoint_every': 10})
  result = trainer.train(c, str(tmp_path))
  train_rows = rows(str(tmp_path))
  first, last = train_rows[0]['loss'], train_rows[-1]['loss']
  assert last < 0.6 * first, (first, last)
  assert {'loss', 'learning_rate', 'steps_per_second', 'grad_norm'} <= set(train_rows[-1])
  ev = rows(str(tmp_path), 'eval')
  assert ev and 'exact_match' in ev[-1] and 0 <= ev[-1]['exact_match'] <= 100
  assert (tmp_path / 'eval' / 'metrics_30.json').exists()
  preds = (tmp_path / 'eval' / 'predictions_30.jsonl').read_text().splitlines()
  assert len(preds) == 8 and {'prompt', 'prediction', 'references'} <= set(json.loads(preds[0]))
  assert any(p.startswith('events.out.tfevents') for p in os.listdir(tmp_path / 'tb'))
  assert result['step'] == 30 and json.loads((tmp_path / 'result.json').read_text())['step'] == 30
  assert sorted(int(p) for p in os.listdir(tmp_path / 'checkpoints') if p.isdigit())[-1] == 30


def test_adalink_trains_only_adapters_and_loss_falls(assets, tmp_path):
  c = tiny_config(assets, total_steps=30, **{'optimizer.total_steps': 30,
                                            'optimizer.learning_rate': 1e-2})
  trainer.train(c, str(tmp_path))
  train_rows = rows(str(tmp_path))
  assert train_rows[-1]['loss'] < 0.8 * train_rows[0]['loss']
  _, flat = final_trainable(str(tmp_path))
  assert flat and all('encoder_input_adapter' in k for k in flat), sorted(flat)


def test_kill9_then_resume_is_bit_exact(assets, tmp_path):
  ref = tmp_path / 'ref'
  subprocess.run(cli_args(assets, ref), check=True, capture_output=True, cwd=ROOT, timeout=300)
  run = tmp_path / 'killed'
  proc = subprocess.Popen(cli_args(assets, run), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckdir = run / 'checkpoints'
  deadline = time.time() + 240
  # Kill hard once a middle checkpoint is committed (Orbax renames it into place atomically).
  while time.time() < deadline and proc.poll() is None:
    done = [p for p in ckdir.glob('[0-9]*') if p.name.isdigit()
            and (p / '_CHECKPOINT_METADATA').exists()]
    if any(int(p.name) >= 4 for p in done):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  killed_at = max(int(r['step']) for r in rows(str(run)))
  assert killed_at < 12
  resumed = subprocess.run(cli_args(assets, run), capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step' in resumed.stderr
  step_a, a = final_trainable(ref)
  step_b, b = final_trainable(run)
  assert step_a == step_b == 12
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigterm_saves_and_exits_zero(assets, tmp_path):
  proc = subprocess.Popen(cli_args(assets, tmp_path, total_steps=100000,
                                   checkpoint_every=100000,
                                   **{'optimizer.total_steps': 100000}),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline:
    if (tmp_path / 'metrics.jsonl').exists() and len(rows(str(tmp_path))) >= 3:
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  result = json.loads((tmp_path / 'result.json').read_text())
  assert os.listdir(tmp_path / 'checkpoints'), out[-3000:]
  step, _ = final_trainable(tmp_path)
  assert result['preempted_at'] == step >= 3


def test_nan_loss_stops_with_clear_message(assets, tmp_path):
  c = tiny_config(assets, **{'peft.method': 'ft', 'optimizer.name': 'sgd',
                             'optimizer.learning_rate': 1e30, 'optimizer.grad_clip_norm': 0.0,
                             'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0})
  # A fresh run has no good checkpoint: the message must not claim one (issue: it said step 0).
  with pytest.raises(trainer.NonFiniteLossError, match='no checkpoint had been saved yet'):
    trainer.train(c, str(tmp_path))
  saved = [int(p) for p in os.listdir(tmp_path / 'checkpoints') if p.isdigit()]
  assert all(np.isfinite(v).all() for v in final_trainable(tmp_path)[1].values()) if saved else True


def test_dry_run_prints_counts_sharding_and_memory(assets):
  out = subprocess.run(cli_args(assets, '/unused') + ['--dry_run'], check=True, cwd=ROOT,
                       capture_output=True, text=True, timeout=300).stdout
  assert 'trainable total' in out and 'frozen total' in out
  assert 'encoder_input_adapter' in out and 'img/' in out  # sharding plan lists every param
  assert 'per-device memory estimate' in out and 'GiB' in out


def test_config_typo_names_the_field(assets, tmp_path):
  proc = subprocess.run(cli_args(assets, tmp_path) + ['--config.peft.rnak=3'], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'rnak' in proc.stderr


def test_prompt_vocab_init_draws_rows_of_the_loaded_table(assets, tmp_path):  # noqa: F811
  """peft.prompt_init='vocab' from a config: every prompt vector is a row of the first
  prompt_vocab_first_n rows of the *loaded* embedding table (Lester et al.)."""
  from adalink_jax import trainer  # pylint: disable=g-import-not-at-top
  c = tiny_config(assets, **{'peft.method': 'prompt'})
  c.peft.prompt_length, c.peft.prompt_init, c.peft.prompt_vocab_first_n = 6, 'vocab', 20
  trainable, frozen = trainer.Trainer(c, str(tmp_path)).init_params()
  table = np.asarray(frozen['t5']['token_embedder']['embedding'])[:20]
  prompt = np.asarray(trainable['encoder_input_adapter']['prompt'])
  assert prompt.shape == (6, table.shape[1])
  for row in prompt:
    assert np.min(np.abs(table - row).max(axis=1)) == 0.0
  assert len({tuple(r) for r in prompt}) > 1
