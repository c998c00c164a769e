"""The command-line tools around training: evaluate, export (adapter, fold, backbone), sweep, launchers."""
import csv
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from adalink_jax import peft
from tests.test_train import DEMO_CONFIG, ROOT, assets, cli_args, tiny_config  # noqa: F401

LAUNCH = [sys.executable, str(ROOT / 'scripts' / 'launch.py')]


@pytest.fixture(scope='module')
def run(assets, tmp_path_factory):  # noqa: F811
  d = tmp_path_factory.mktemp('run')
  subprocess.run(cli_args(assets, d, total_steps=6, checkpoint_every=6,
                          **{'optimizer.total_steps': 6}),
                 check=True, cwd=ROOT, capture_output=True, timeout=300)
  return d


def _over(assets):  # noqa: F811
  return [f'--config.data.assets_dir={assets}', '--config.data.mode=pretrain',
          '--config.batch_size=8', '--config.eval.num_batches=1']


def test_evaluate_cli_writes_predictions_and_metrics(assets, run, tmp_path):  # noqa: F811
  out = subprocess.run([sys.executable, '-m', 'adalink_jax.evaluate', f'--config={DEMO_CONFIG}',
                        f'--checkpoint={run}', f'--out={tmp_path}'] + _over(assets),
                       check=True, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result['step'] == 6 and 0 <= result['vqa_accuracy'] <= 100
  assert json.load(open(tmp_path / 'eval' / 'metrics_6.json'))['vqa_accuracy'] == \
      result['vqa_accuracy']
  assert len((tmp_path / 'eval' / 'predictions_6.jsonl').read_text().splitlines()) == 8


def test_export_adapter_and_folded_table(assets, run, tmp_path):  # noqa: F811
  subprocess.run([sys.executable, '-m', 'adalink_jax.export', f'--config={DEMO_CONFIG}',
                  f'--workdir={run}', f'--out={tmp_path}', '--fold'] + _over(assets),
                 check=True, cwd=ROOT, capture_output=True, timeout=300)
  card = json.load(open(tmp_path / 'adapter_card.json'))
  assert card['method'] == 'adalink' and card['num_params'] == 2048
  assert card['modalities'] == ['text', 'image'] and len(card['base_hash']) == 64
  adapter = safetensors.numpy.load_file(tmp_path / 'adapter.safetensors')
  assert set(adapter) == {f'encoder_input_adapter/{m}/{w}' for m in ('text', 'image')
                          for w in ('down', 'up')}
  assert np.abs(adapter['encoder_input_adapter/text/up']).max() > 0  # it trained
  table = safetensors.numpy.load_file(tmp_path / 'folded_embedding.safetensors')
  table = table['token_embedder/embedding']
  # E' = E + E @ down @ up (identity activation), checked against the frozen embedding.
  from adalink_jax import trainer  # pylint: disable=g-import-not-at-top
  _, frozen = trainer.Trainer(tiny_config(assets), str(tmp_path / 'w')).init_params()
  emb = np.asarray(frozen['t5']['token_embedder']['embedding'])
  want = emb + emb @ adapter['encoder_input_adapter/text/down'] @ \
      adapter['encoder_input_adapter/text/up']
  np.testing.assert_allclose(table, want, atol=1e-5)
  # The artifact loads back onto the same base, and is refused by another.
  loaded, _ = peft.load_adapter(str(tmp_path), frozen)
  np.testing.assert_array_equal(np.asarray(loaded['encoder_input_adapter']['text']['up']),
                                adapter['encoder_input_adapter/text/up'])
  other = jax.tree.map(lambda x: x + 1, frozen)
  with pytest.raises(ValueError, match='different weights'):
    peft.load_adapter(str(tmp_path), other)


def test_sweep_runs_points_and_collects_table_and_plot(assets, tmp_path):  # noqa: F811
  cfg = tmp_path / 'sweep_cfg.py'
  cfg.write_text(f'''
import importlib.util
spec = importlib.util.spec_from_file_location('demo', {str(DEMO_CONFIG)!r})
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)
get_config = demo.get_config

def sweep(add):
  add(**{{'peft.method': 'adalink', 'peft.rank': 2}})
  add(**{{'peft.method': 'adalink', 'peft.rank': 8}})
''')
  common = [f'--config.{k}={v}' for k, v in {
      'data.assets_dir': assets, 'data.mode': 'pretrain', 'batch_size': 8, 'total_steps': 4,
      'optimizer.total_steps': 4, 'optimizer.warmup_steps': 1, 'checkpoint_every': 4,
      'eval.every': 4, 'eval.num_batches': 1, 'eval.at_start': False, 'log_every': 2}.items()]
  base = [sys.executable, '-m', 'adalink_jax.sweep', f'--config={cfg}', f'--out={tmp_path}/s']
  printed = subprocess.run(base + ['--mode=print'] + common, check=True, cwd=ROOT,
                           capture_output=True, text=True, timeout=120).stdout.splitlines()
  assert len(printed) == 2 and all('-m adalink_jax.train' in p for p in printed)
  assert '--config.peft.rank=2' in printed[0] and '--config.total_steps=4' in printed[0]
  subprocess.run(base + ['--mode=run'] + common, check=True, cwd=ROOT, capture_output=True,
                 timeout=600)
  rows = list(csv.DictReader(open(tmp_path / 's' / 'results.csv')))
  assert sorted(int(r['trainable_params']) for r in rows) == [512, 2048]
  assert all(0 <= float(r['eval_vqa_accuracy']) <= 100 for r in rows)
  md = (tmp_path / 's' / 'results.md').read_text()  # the paper's layout: a row per method
  assert md.startswith('| method | trainable params | demo (vqa_accuracy) |')
  assert '| adalink r=2 | 512 |' in md and '| adalink r=8 | 2,048 |' in md
  # Eval-only: the trained points are evaluated again, without training, into sweep_eval/.
  before = {p: (tmp_path / 's' / p / 'result.json').read_bytes()
            for p in ('peft.method=adalink,peft.rank=2', 'peft.method=adalink,peft.rank=8')}
  subprocess.run(base + ['--mode=eval'] + common, check=True, cwd=ROOT, capture_output=True,
                 timeout=600)
  for point, result in before.items():
    assert (tmp_path / 's' / point / 'result.json').read_bytes() == result  # no training
    ev = json.loads((tmp_path / 's' / point / 'sweep_eval' / 'eval' / 'metrics_4.json')
                    .read_text())
    row = next(r for r in csv.DictReader(open(tmp_path / 's' / 'results.csv'))
               if r['point'] == point)
    assert float(row['eval_vqa_accuracy']) == ev['vqa_accuracy']
  assert (tmp_path / 's' / 'results.png').stat().st_size > 1000


def test_launchers_dry_run_print_exact_commands(tmp_path):
  def launch(*args):
    args = list(args)
    at = args.index('--') if '--' in args else len(args)  # after '--': train overrides
    args.insert(at, '--dry_run')
    return subprocess.run(LAUNCH + args, check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip().splitlines()
  assert launch('tpu-create', '--name=a', '--zone=z', '--accelerator=v4-32', '--spot') == [
      'gcloud compute tpus tpu-vm create a --zone=z --accelerator-type=v4-32 '
      '--version=tpu-ubuntu2204-base --spot']
  run = launch('tpu-run', '--name=a', '--zone=z', '--config=configs/coco_mmit.py',
               '--workdir=gs://b/r', '--', '--config.peft.rank=16')
  assert run == ["gcloud compute tpus tpu-vm ssh a --zone=z --worker=all '--command=cd "
                 "adalink_jax && python -m adalink_jax.train --config=configs/coco_mmit.py "
                 "--workdir=gs://b/r --multihost --config.peft.rank=16'"]
  assert launch('tpu-delete', '--name=a', '--zone=z', '--project=p') == [
      'gcloud compute tpus tpu-vm delete a --zone=z --project=p --quiet']
  assert launch('gpu-run', '--config=c.py', '--workdir=/w', '--gpus=0,1') == [
      'CUDA_VISIBLE_DEVICES=0,1 python -m adalink_jax.train --config=c.py --workdir=/w']
  slurm = launch('slurm', '--config=c.py', '--workdir=/w', '--nodes=4', '--gpus_per_node=8')
  assert '#SBATCH --nodes=4' in slurm and '#SBATCH --gpus-per-node=8' in slurm
  assert 'srun python -m adalink_jax.train --config=c.py --workdir=/w --multihost' in slurm
  assert slurm[-1] == 'sbatch adalink_job.sbatch'
