"""``python -m adalink_jax.train --config=configs/X.py[:arg] --workdir=DIR [--config.a.b=v] [--dry_run]``.

Trains (or resumes, if DIR has checkpoints) the method in ``config.peft`` on ``config.data``
over a mesh of all devices. ``--dry_run`` builds everything abstractly, prints parameter
counts, the sharding plan and a per-device memory estimate, and exits. ``--multihost``
calls ``jax.distributed.initialize()`` first (TPU pods, SLURM, or the ``--coordinator`` flags).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from adalink_jax import cli
from adalink_jax import config_env
from adalink_jax import preemption

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'experiment config file (configs/*.py)',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'where checkpoints, logs and results go')
flags.DEFINE_bool('dry_run', False, 'print counts, sharding plan and memory estimate; exit')
flags.DEFINE_bool('multihost', False, 'initialise jax.distributed (multi-process runs)')
flags.DEFINE_string('coordinator', '', 'host:port of process 0 (multihost without auto-detect)')
flags.DEFINE_integer('num_processes', 0, 'number of processes (with --coordinator)')
flags.DEFINE_integer('process_id', -1, 'this process (with --coordinator)')
cli.define_host_allocator_flag()

log = logging.getLogger('adalink_jax.train')


def init_distributed():
  """jax.distributed.initialize from flags, or auto-detected (TPU pod / SLURM)."""
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  else:
    jax.distributed.initialize()


def main(argv):
  with preemption.PREEMPTION:  # before any work: SIGTERM during start-up is a clean stop too
    try:
      return _main(argv)
    except preemption.Preempted as e:
      print(f'stopped: {e}', flush=True)
      return 0


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.apply_host_allocator()  # before jax.distributed or any computation starts the backend
  from adalink_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from adalink_jax import logs  # pylint: disable=g-import-not-at-top
  logs.setup_logging()
  if FLAGS.multihost:
    init_distributed()
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config=configs/<experiment>.py is required')
  config_env.fill_config(config, os.environ)  # ADALINK_* variables fill empty data fields
  if FLAGS.dry_run:
    from adalink_jax import dry_run  # pylint: disable=g-import-not-at-top
    print(dry_run.report(config))
    return 0
  if not FLAGS.workdir:
    raise app.UsageError('--workdir=DIR is required (checkpoints, logs and results go there)')
  from adalink_jax import trainer  # pylint: disable=g-import-not-at-top
  from adalink_jax import workdir  # pylint: disable=g-import-not-at-top
  try:
    cli.resolve_demo_backbone(config, FLAGS['config'].config_filename)
    result = trainer.train(config, FLAGS.workdir)
  except (workdir.WorkdirError, checkpointing.CheckpointMismatchError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  summary = {k: v for k, v in result.items() if k in ('eval_at_start', 'eval', 'step',
                                                     'final_loss', 'preempted_at')}
  print(f'done: {summary}\nresults in {os.path.abspath(FLAGS.workdir)}', flush=True)
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=cli.parse_flags)
