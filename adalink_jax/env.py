"""Process-wide environment set-up that must happen before heavy imports.

TensorFlow is used for data loading only. It must never grab accelerator memory
(JAX owns the GPU/TPU) and its C++ start-up chatter must not reach our logs, so
every TF import in this project goes through :func:`import_tensorflow`.
"""
import contextlib
import logging
import os
import sys


@contextlib.contextmanager
def _native_stderr_silenced():
  """Sends file descriptor 2 to /dev/null: TF's C++ start-up lines bypass Python logging."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow():
  """Imports TensorFlow with accelerators hidden and logging quieted; returns the module."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  # Python exceptions still propagate; only native (C++) writes to stderr are dropped.
  with _native_stderr_silenced():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.get_logger().setLevel(logging.ERROR)
    # Hide every accelerator from TF before it initialises them.
    for kind in ('GPU', 'TPU'):
      try:
        tf.config.set_visible_devices([], kind)
      except (RuntimeError, ValueError):
        pass  # Already initialised, or the kind does not exist in this build.
  return tf
