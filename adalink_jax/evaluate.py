"""``python -m adalink_jax.evaluate --config=configs/X.py --checkpoint=WORKDIR [--out=DIR]``.

Loads the frozen backbone from ``config.init`` and the trainable params from the newest
checkpoint of a training run, decodes ``config.data.eval_task`` with ``config.eval.decoding``
and writes ``eval/predictions_<step>.jsonl`` and ``eval/metrics_<step>.json`` under ``--out``.
By default ``--out`` is a new folder ``<WORKDIR>/evaluations/step<step>-<time>``, so a
standalone evaluation never touches the training run's own ``eval/`` files; an ``--out`` that
already holds results for that step is refused.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from adalink_jax import cli
from adalink_jax import config_env

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
flags.DEFINE_string('checkpoint', None, 'workdir of the training run to evaluate')
flags.DEFINE_string('out', None, 'where to write eval/ (default: a new folder '
                    '<checkpoint>/evaluations/step<step>-<time>)')
cli.define_host_allocator_flag()


def _out_dir(checkpoint: str, step: int, out: str | None) -> str:
  if out:
    return out
  base = os.path.join(checkpoint, 'evaluations', f'step{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  path, n = base, 1
  while os.path.exists(path):
    path, n = f'{base}_{n}', n + 1
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.apply_host_allocator()  # before anything starts the backend
  from adalink_jax import logs  # pylint: disable=g-import-not-at-top
  from adalink_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from adalink_jax.checkpoints import backbone  # pylint: disable=g-import-not-at-top
  logs.setup_logging()
  config = FLAGS.config
  config_env.fill_config(config, os.environ)  # ADALINK_* variables fill empty data fields
  cli.resolve_demo_backbone(config, FLAGS['config'].config_filename)
  t = trainer_lib.Trainer(config, FLAGS.out or FLAGS.checkpoint)
  trainable, frozen = t.init_params()
  step, trainable, meta = trainer_lib.restore_trainable(t, trainable, FLAGS.checkpoint)
  backbone.check_same(meta.get('backbone', {}), backbone.describe(config.init, frozen), frozen)
  t.workdir = _out_dir(FLAGS.checkpoint, step, FLAGS.out)
  existing = os.path.join(t.workdir, 'eval', f'metrics_{step}.json')
  if os.path.exists(existing):
    print(f'error: {existing} exists (results of an earlier evaluation); pass another --out',
          file=sys.stderr)
    return 1
  metrics = t.evaluate(trainable, frozen, step)
  print(f'results in {os.path.abspath(os.path.join(t.workdir, "eval"))}', file=sys.stderr)
  print(json.dumps({'step': step, **metrics}), flush=True)
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'checkpoint'])
  app.run(main, flags_parser=cli.parse_flags)
