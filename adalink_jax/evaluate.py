"""``python -m adalink_jax.evaluate --config=configs/X.py --checkpoint=WORKDIR [--out=DIR]``.

Loads the frozen backbone from ``config.init`` and the trainable params from the newest good
checkpoint of a training run, decodes ``config.data.eval_task`` with ``config.eval.decoding``
and writes ``predictions_<step>.jsonl`` and ``metrics_<step>.json`` under ``--out/eval``.
"""
from __future__ import annotations

import json

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
flags.DEFINE_string('checkpoint', None, 'workdir of the training run to evaluate')
flags.DEFINE_string('out', None, 'where to write eval/ (default: the checkpoint workdir)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from adalink_jax import logs  # pylint: disable=g-import-not-at-top
  from adalink_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from adalink_jax.checkpoints import backbone  # pylint: disable=g-import-not-at-top
  logs.setup_logging()
  out = FLAGS.out or FLAGS.checkpoint
  t = trainer_lib.Trainer(FLAGS.config, out)
  trainable, frozen = t.init_params()
  step, trainable, meta = trainer_lib.restore_trainable(t, trainable, FLAGS.checkpoint)
  backbone.check_same(meta.get('backbone', {}), backbone.describe(FLAGS.config.init, frozen))
  metrics = t.evaluate(trainable, frozen, step)
  print(json.dumps({'step': step, **metrics}), flush=True)
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'checkpoint'])
  app.run(main)
