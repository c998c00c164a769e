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
