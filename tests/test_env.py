"""TensorFlow is for data only: no accelerators, and no start-up noise in our output."""
import subprocess
import sys


def test_tensorflow_import_is_quiet_and_sees_no_accelerator():
  code = ('from adalink_jax import data\n'
          'import tasks\n'
          'from adalink_jax.env import import_tensorflow\n'
          'tf = import_tensorflow()\n'
          'kinds = {d.device_type for d in tf.config.get_visible_devices()}\n'
          'print(sorted(kinds))\n')
  env = {'PATH': '/usr/bin:/bin', 'HOME': '/tmp'}  # no TF_CPP_MIN_LOG_LEVEL preset
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "['CPU']"
  assert proc.stderr == '', proc.stderr


_FAULTS_PER_STEP = '''
import resource, statistics, sys
import importlib
importlib.import_module(sys.argv[2])  # a command's imports must not start the backend
from adalink_jax import env
applied = env.reuse_freed_host_memory(sys.argv[1], 'cpu')
import jax, jax.numpy as jnp
step = jax.jit(lambda a: a * 2.0 + 1.0)  # a fresh 64 MiB result per call, as XLA:CPU allocates
x = jnp.ones((16, 1024, 1024), jnp.float32)
jax.block_until_ready(step(x))
faults = []
for _ in range(40):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = step(x)
  jax.block_until_ready(y)
  del y
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults[-10:]))  # steady state: the heap has grown to fit
'''


def _median_faults(mode: str, command: str = 'adalink_jax.train') -> tuple[str, float]:
  env = {'PATH': '/usr/bin:/bin', 'HOME': '/tmp', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', _FAULTS_PER_STEP, mode, command],
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  applied, faults = proc.stdout.split()
  return applied, float(faults)


def test_reused_host_memory_stops_refaulting_large_buffers_every_step():
  pages = 64 * 2 ** 20 // 4096
  applied, faults = _median_faults('system')
  assert applied == 'False' and faults > 0.8 * pages  # glibc mmaps and unmaps it every call
  for command in ('adalink_jax.train', 'adalink_jax.evaluate', 'bench.common'):
    applied, faults = _median_faults('reuse', command)
    assert applied == 'True' and faults < 0.05 * pages, command  # freed pages used again


def test_host_allocator_auto_only_on_cpu_and_bad_mode_named():
  from adalink_jax import env
  assert env.computes_on_cpu('cpu') and env.computes_on_cpu('cpu,cuda')
  assert not env.computes_on_cpu('cuda,cpu') and not env.computes_on_cpu('tpu')
  assert env.reuse_freed_host_memory('auto', 'cuda') is False
  assert env.reuse_freed_host_memory('system', 'cpu') is False
  import pytest
  with pytest.raises(ValueError, match='choose one of auto, reuse, system'):
    env.reuse_freed_host_memory('keep', 'cpu')
