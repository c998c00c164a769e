"""Untrusted inputs: checkpoint listings that point outside the checkpoint, shell metacharacters
given to the launcher.

A checkpoint's own files (HF ``model.safetensors.index.json``, the T5X msgpack's TensorStore
specs) name other files; those names are data and must stay inside the checkpoint. Each
escape below points at a real, loadable file outside, so a reader without the check would
read it (and the tests would fail).
"""
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import serialization
from safetensors.numpy import save_file

from adalink_jax.checkpoints import common, hf, hf_vision
from adalink_jax.checkpoints.t5x import load_t5x_params
from tests.test_t5x_import import _abstract, _model, reference, write_legacy_t5x  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(ROOT / 'scripts' / 'launch.py')]
_TINY_T5 = dict(model_type='t5', vocab_size=8, d_model=4, num_heads=1, d_kv=4, d_ff=8,
                num_layers=1, feed_forward_proj='relu')


# ------------------------------------------------------------------ the helper


@pytest.mark.parametrize('rel', ['../x', 'a/../../x', '/etc/passwd', '', '.', 'a/..'])
def test_resolve_inside_refuses_escapes(tmp_path, rel):
  with pytest.raises(common.UnsafePathError, match='outside the checkpoint directory') as e:
    common.resolve_inside(tmp_path, rel, 'index.json')
  assert 'index.json' in str(e.value) and '\n' not in str(e.value)


def test_resolve_inside_accepts_inside(tmp_path):
  assert common.resolve_inside(tmp_path, 'a/b.safetensors', 'i') == str(tmp_path / 'a' /
                                                                        'b.safetensors')
  assert common.resolve_inside(tmp_path, 'a/../b', 'i') == str(tmp_path / 'b')


# ------------------------------------------------------------------ HF index.json


def _hf_dir(d: pathlib.Path, shard: str, config=None) -> pathlib.Path:
  d.mkdir(parents=True, exist_ok=True)
  (d / hf.CONFIG_FILE).write_text(json.dumps(config or _TINY_T5))
  (d / hf.INDEX_FILE).write_text(json.dumps({'metadata': {}, 'weight_map': {
      'shared.weight': shard}}))
  return d


@pytest.fixture
def outside_shard(tmp_path):
  """A real safetensors file next to (not inside) the checkpoint directories."""
  f = tmp_path / 'outside.safetensors'
  save_file({'shared.weight': np.ones((8, 4), np.float32)}, str(f))
  return f


@pytest.mark.parametrize('kind', ['dotdot', 'absolute'])
def test_hf_index_escaping_the_checkpoint_is_refused(tmp_path, outside_shard, kind):
  shard = '../outside.safetensors' if kind == 'dotdot' else str(outside_shard)
  d = _hf_dir(tmp_path / 'ckpt', shard)
  with pytest.raises(common.UnsafePathError, match='outside the checkpoint directory') as e:
    hf.load_hf_t5(d)
  assert shard in str(e.value) and hf.INDEX_FILE in str(e.value)
  # The image-tower reader goes through the same check.
  siglip = dict(model_type='siglip_vision_model', hidden_size=4, num_attention_heads=1)
  v = _hf_dir(tmp_path / 'vision', '../outside.safetensors' if kind == 'dotdot' else shard,
              siglip)
  with pytest.raises(common.UnsafePathError, match='outside the checkpoint directory'):
    hf_vision.load_hf_vision(v, {})


def test_hf_index_inside_is_read(tmp_path):
  # Control: the same index naming a shard inside the directory gets past the path check and
  # the file is read (this one-tensor file then lacks most of the model).
  d = _hf_dir(tmp_path / 'ckpt', 'sub/model-00001-of-00001.safetensors')
  (d / 'sub').mkdir()
  save_file({'shared.weight': np.ones((8, 4), np.float32)},
            str(d / 'sub' / 'model-00001-of-00001.safetensors'))
  with pytest.raises(common.CheckpointMismatchError, match='missing from the checkpoint'):
    hf.load_hf_t5(d)


# ------------------------------------------------------------------ T5X TensorStore specs


def _point_outside(ckpt: str, name: str, new_path: str):
  """Rewrites the TensorStore spec of ``target/<name>`` in the msgpack to ``new_path``."""
  with open(os.path.join(ckpt, 'checkpoint'), 'rb') as f:
    contents = serialization.msgpack_restore(f.read())
  node = contents['optimizer']['target']
  for part in name.split('/'):
    node = node[part]
  node['kvstore']['path'] = new_path
  with open(os.path.join(ckpt, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize(contents))


@pytest.mark.parametrize('kind', ['dotdot', 'absolute'])
def test_t5x_tensor_path_escaping_the_checkpoint_is_refused(reference, tmp_path, kind):  # noqa: F811
  flat, _ = reference
  ckpt = write_legacy_t5x(tmp_path / 'model', 3, flat)
  # The array really exists outside the checkpoint, so an unchecked reader would load it.
  rel = 'target.encoder.encoder_norm.scale'
  outside = tmp_path / 'elsewhere'
  shutil.move(os.path.join(ckpt, rel), outside)
  _point_outside(ckpt, 'encoder/encoder_norm/scale',
                 '../../elsewhere' if kind == 'dotdot' else str(outside))
  with pytest.raises(common.UnsafePathError, match='outside the checkpoint directory') as e:
    load_t5x_params(tmp_path / 'model', _abstract(_model())[1])
  assert 'elsewhere' in str(e.value) and 'checkpoint_3' in str(e.value)


# ------------------------------------------------------------------ the launcher


def _launch(*args, cwd=None, env=None):
  return subprocess.run(LAUNCH + list(args), capture_output=True, text=True, timeout=120,
                        cwd=cwd, env=env)


def test_launch_dry_run_quotes_every_user_value():
  out = _launch('gpu-run', '--config=c.py', '--workdir=/w', '--gpus=0;touch X', '--dry_run')
  assert out.returncode == 0, out.stderr
  line = out.stdout.strip()
  assert line == ("CUDA_VISIBLE_DEVICES='0;touch X' python -m adalink_jax.train "
                  '--config=c.py --workdir=/w')
  nasty = ['--config=c.py; touch Y', '--workdir=$(touch Z)`touch W`']
  out = _launch('gpu-run', *nasty, '--gpus=0', '--dry_run', '--', '--config.x=1 && touch V')
  assert shlex.split(out.stdout.strip()) == [
      'CUDA_VISIBLE_DEVICES=0', 'python', '-m', 'adalink_jax.train', *nasty,
      '--config.x=1 && touch V']
  # tpu-run: quoted locally and again inside the command the workers' shells run.
  out = _launch('tpu-run', '--name=a;b', '--zone=z', '--config=c.py;touch Y',
                '--workdir=gs://b/$(id)', '--dry_run')
  argv = shlex.split(out.stdout.strip())
  assert argv[5] == 'a;b'
  remote = shlex.split(argv[-1][len('--command='):])
  assert remote == ['cd', 'adalink_jax', '&&', 'python', '-m', 'adalink_jax.train',
                    '--config=c.py;touch Y', '--workdir=gs://b/$(id)', '--multihost']


@pytest.mark.parametrize('flag', ['--job_name=a\ntouch X', '--workdir=/r w', '--time=1;id',
                                  '--partition=$(id)'])
def test_launch_slurm_refuses_unsafe_sbatch_values(tmp_path, flag):
  args = ['slurm', '--config=c.py', '--workdir=/w', flag, '--dry_run']
  out = _launch(*args, cwd=tmp_path)
  assert out.returncode != 0
  name = flag.split('=')[0]
  assert f'error: {name}=' in out.stderr and 'SBATCH' in out.stderr
  assert not (tmp_path / 'adalink_job.sbatch').exists()


def test_launch_gpu_run_does_not_run_injected_command(tmp_path):
  # A real (non-dry) launch: the training CLI starts with the given GPUs and stops at once
  # because the config file does not exist; the text after ';' must never run.
  marker = tmp_path / 'INJECTED'
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  out = _launch('gpu-run', f'--config={tmp_path}/missing.py', f'--workdir={tmp_path}/w',
                f'--gpus=0; touch {marker} #', cwd=tmp_path, env=env)
  assert not marker.exists()
  assert out.returncode != 0
  assert 'missing.py' in out.stdout + out.stderr  # the training CLI itself ran and complained
