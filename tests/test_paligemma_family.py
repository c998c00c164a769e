"""The PaliGemma family through the real entry points: the demo (train, eval, export, reload),
a seqio VQA task, and dry runs of the public shapes on a simulated 256-device mesh."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from adalink_jax import peft
from adalink_jax import trainer
from tests.test_train import ROOT
from tests.test_train_tasks import _check, _seqio_config, assets, files  # noqa: F401

CONFIG = str(ROOT / 'configs' / 'demo_paligemma.py')


def test_demo_trains_evaluates_exports_and_reloads(tmp_path):
  """A tiny PaliGemma pre-trained on the demo shapes, frozen; AdaLink lifts VQA accuracy."""
  assets, run, out = tmp_path / 'assets', tmp_path / 'run', tmp_path / 'adapter'
  over = [f'--config.data.assets_dir={assets}', '--config.demo_backbone.steps=60',
          '--config.total_steps=40', '--config.optimizer.total_steps=40', '--config.eval.every=40',
          '--config.checkpoint_every=40']
  subprocess.run([sys.executable, '-m', 'adalink_jax.train', f'--config={CONFIG}',
                  f'--workdir={run}'] + over, check=True, cwd=ROOT, capture_output=True,
                 timeout=600)
  result = json.load(open(run / 'result.json'))
  assert result['eval']['vqa_accuracy'] > result['eval_at_start']['vqa_accuracy'] + 5, result
  assert (assets / 'backbone_paligemma').is_dir() and not (assets / 'backbone').exists()
  subprocess.run([sys.executable, '-m', 'adalink_jax.export', f'--config={CONFIG}',
                  f'--workdir={run}', f'--out={out}'] + over, check=True, cwd=ROOT,
                 capture_output=True, timeout=300)
  card = json.load(open(out / 'adapter_card.json'))
  assert card['method'] == 'adalink' and card['base_model'] == 'paligemma:paligemma_tiny'
  saved = safetensors.numpy.load_file(out / 'adapter.safetensors')
  assert np.abs(saved['encoder_input_adapter/image/up']).max() > 0  # it trained
  from adalink_jax import cli  # pylint: disable=g-import-not-at-top
  config = cli.load_config_module(CONFIG).get_config()
  config.data.assets_dir = str(assets)
  config.init.native = str(assets / 'backbone_paligemma')
  _, frozen = trainer.Trainer(config, str(tmp_path / 'w')).init_params()
  loaded, _ = peft.load_adapter(str(out), frozen)
  np.testing.assert_array_equal(np.asarray(loaded['encoder_input_adapter']['text']['up']),
                                saved['encoder_input_adapter/text/up'])


def test_vqa_task_trains_and_evaluates(assets, files, tmp_path):  # noqa: F811
  """A seqio VQA task (official-format files) on a tiny PaliGemma, scored by the VQA rules."""
  c = _seqio_config(assets, files, 'vqav2_raw', 'pali', 'vqa_accuracy')
  c.model = dict(family='paligemma', name='paligemma_tiny', image_size=32, dtype='float32',
                 frozen_dtype='float32', separator_id=-1,
                 vit=dict(patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2),
                 llm=dict(vocab_size=640, d_model=32, num_layers=2, head_dim=8, d_ff=64))
  c.init = dict(native='', paligemma='', paligemma_format='big_vision')
  c.optimizer.learning_rate = 1e-2  # a randomly initialised Gemma learns slower than T5 at 3e-3
  trainer.train(c, str(tmp_path))
  _check(str(tmp_path), 'vqa_accuracy', 24)


@pytest.mark.parametrize('model,trainable,frozen', [
    ('paligemma_3b', 4 * 2048 * 64, (2.9e9, 3.0e9)),
    ('paligemma2_28b', 4 * 4608 * 64, (27.5e9, 27.8e9))])
def test_dry_run_on_256_devices(model, trainable, frozen):
  """The VQAv2 config's AdaLink (rank 64, text + image) on the public shapes, fsdp=256."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=256',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'adalink_jax.train',
                        f'--config={ROOT / "configs" / "vqav2_paligemma.py"}:model={model}',
                        '--workdir=/nonexistent/dry', '--dry_run'], env=env, check=True,
                       cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
  assert "'fsdp': 256" in out and 'over 256 cpu devices' in out
  count = lambda name: int(next(l for l in out.splitlines() if l.startswith(name))
                           .split()[-1].replace(',', ''))
  assert count('trainable total') == trainable
  assert frozen[0] < count('frozen total') < frozen[1]
  # Every frozen Gemma matrix is sharded over fsdp. (So400m's widths, 1152 and 4304, do not
  # divide by 256: the SigLIP tower stays replicated on this mesh, ~0.8 GiB per device.)
  plan = out.split('sharding plan')[1].split('per-device memory')[0].splitlines()
  kernels = [l for l in plan if l.startswith('llm/') and
             l.split()[0].rsplit('/', 1)[-1] in ('kernel', 'input_embedding', 'w')]
  assert len(kernels) > 5 and all("'fsdp'" in l for l in kernels), kernels
  gib = float(next(l for l in out.splitlines() if 'frozen_weights' in l).split()[-2])
  assert gib < 1.5  # bf16 frozen weights / 256 devices
