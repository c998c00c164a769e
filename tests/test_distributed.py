"""Mesh and multi-process runs of the train CLI match a single-device run.

Tolerance: sharded matmuls and the cross-device gradient psum add fp32 partial sums in another
order than one device does (relative round-off ~1e-7 per op). SGD makes updates linear in the
gradients, so after 8 steps the trainable parameters may differ by a few ulps times the number
of steps: we allow 1e-5 absolute + 1e-4 relative, far below any real divergence (a wrong
sharding or a missed gradient reduction moves parameters by > 1e-2 here).
"""
import os
import socket
import subprocess

import numpy as np
import pytest

from tests.test_train import ROOT, assets, cli_args, final_trainable, rows  # noqa: F401

COMMON = {'total_steps': 8, 'optimizer.total_steps': 8, 'optimizer.name': 'sgd',
          'optimizer.learning_rate': 0.3, 'optimizer.schedule': 'constant',
          'optimizer.warmup_steps': 0, 'checkpoint_every': 8, 'log_every': 2,
          'eval.every': 8, 'eval.num_batches': 1}


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _run(assets, workdir, devices, **over):  # noqa: F811
  args = cli_args(assets, workdir, **{**COMMON, **over})
  subprocess.run(args, check=True, cwd=ROOT, env=_env(devices), capture_output=True,
                 timeout=400)


def _assert_close(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-4, err_msg=k)


@pytest.fixture(scope='module')
def single_device(assets, tmp_path_factory):  # noqa: F811
  d = tmp_path_factory.mktemp('one_device')
  _run(assets, d, 1, **{'mesh.data': 1})
  return d


def test_8_device_mesh_matches_1_device(assets, single_device, tmp_path):  # noqa: F811
  _run(assets, tmp_path, 8, **{'mesh.data': 4, 'mesh.model': 2})
  _, a = final_trainable(single_device)
  _, b = final_trainable(tmp_path)
  _assert_close(a, b)
  # And the runs really trained (the comparison would be vacuous otherwise).
  assert max(float(np.abs(v).max()) for k, v in a.items() if k.endswith('up')) > 1e-3
  la = [r['loss'] for r in rows(str(single_device))]
  lb = [r['loss'] for r in rows(str(tmp_path))]
  np.testing.assert_allclose(la, lb, rtol=1e-4)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(assets, single_device, tmp_path):  # noqa: F811
  port = _free_port()
  procs = []
  for pid in range(2):
    args = cli_args(assets, tmp_path, **{**COMMON, 'mesh.data': 4, 'mesh.model': 2})
    args += ['--multihost', f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={pid}']
    procs.append(subprocess.Popen(args, cwd=ROOT, env=_env(4), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  _, a = final_trainable(single_device)
  _, b = final_trainable(tmp_path)
  _assert_close(a, b)
  # Eval gathers predictions from both processes: same metric as one process on all data.
  ev_a = rows(str(single_device), 'eval')[-1]
  ev_b = rows(str(tmp_path), 'eval')[-1]
  assert ev_a['vqa_accuracy'] == ev_b['vqa_accuracy']
  preds_a = (single_device / 'eval' / 'predictions_8.jsonl').read_text().splitlines()
  preds_b = (tmp_path / 'eval' / 'predictions_8.jsonl').read_text().splitlines()
  assert len(preds_a) == len(preds_b) == 8
