"""``python -m adalink_jax.export --config=configs/X.py --workdir=RUN --out=DIR [--fold] [--backbone]``.

Default: the adapter alone (``adapter.safetensors`` + ``adapter_card.json`` with method, ranks,
modalities, tasks, base model and the base weights' hash). ``--fold`` also writes the adapter
folded into base weights (``folded_embedding.safetensors``), for methods that fold (their
``registry.Method.fold``): AdaLink's text adapter becomes an encoder input-embedding table that
an unmodified T5 serves at no extra cost; for a per-task bank, ``--task=NAME`` names the task
to fold (one of the card's ``bank_tasks``, e.g. ``--task=vqav2``). ``--backbone`` writes the
whole model (frozen + trainable merged) as a native backbone, e.g. the MMIT checkpoint the
``*_mmit`` configs start from.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from adalink_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'the run\'s config file', lock_config=True)
flags.DEFINE_string('workdir', None, 'workdir of the training run')
flags.DEFINE_string('out', None, 'output directory')
flags.DEFINE_bool('fold', False, 'also write the adapter folded into base weights (AdaLink: '
                  'the text embedding table)')
flags.DEFINE_bool('backbone', False, 'write frozen + trainable merged as a native backbone')
flags.DEFINE_string('task', '', 'with --fold and a per-task bank: the name of the task to fold '
                    '(one of the bank_tasks in the adapter card)')


def fold_index(bank, task: str, fold: bool):
  """``--task`` -> the bank index to fold (None for a single adapter); UsageError otherwise.

  bank: the run's :class:`~adalink_jax.peft.task_bank.TaskBank`, None when num_tasks=1.
  Checked before anything is written, so a wrong name leaves no half-written export.
  """
  if task and not fold:
    raise app.UsageError(f'--task={task} picks the bank adapter to fold: add --fold')
  if not fold:
    return None
  if bank is None:
    if task:
      raise app.UsageError(f'--task={task}: this run has one adapter (peft.num_tasks=1), not a '
                           'bank; drop --task')
    return None
  if not task:
    raise app.UsageError(f'--fold on a bank of {bank.num_tasks} adapters needs --task=NAME, one '
                         f'of {list(bank.names)}')
  try:
    return bank.index(task)
  except ValueError as e:
    raise app.UsageError(f'--task: {e}') from e


def folder(peft_block, fold: bool):
  """With ``--fold``: the method's fold function ``(merged params, bank index) -> tensors``.

  Asked before anything is written; UsageError if the method (or this config of it) does not
  fold. None without ``--fold``.
  """
  if not fold:
    return None
  from adalink_jax.peft import methods, registry  # pylint: disable=g-import-not-at-top
  cfg = methods.parse(dict(peft_block))
  method = registry.get(cfg.method)
  if method.fold is None:
    folding = [m.name for m in registry.methods() if m.fold is not None]
    raise app.UsageError(f'--fold: peft.method={cfg.method} has no folded form (methods that '
                         f'fold: {", ".join(folding)}); drop --fold')
  try:
    return method.fold(cfg)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from adalink_jax import logs  # pylint: disable=g-import-not-at-top
  from adalink_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from adalink_jax.checkpoints import backbone  # pylint: disable=g-import-not-at-top
  from adalink_jax import peft  # pylint: disable=g-import-not-at-top
  logs.setup_logging()
  config = FLAGS.config
  cli.resolve_demo_backbone(config, FLAGS['config'].config_filename)
  t = trainer_lib.Trainer(config, FLAGS.out)
  bank = getattr(t.source, 'bank', None)
  task_index = fold_index(bank, FLAGS.task, FLAGS.fold)
  fold = folder(config.peft, FLAGS.fold)
  trainable, frozen = t.init_params()
  step, trainable, meta = trainer_lib.restore_trainable(t, trainable, FLAGS.workdir)
  backbone.check_same(meta.get('backbone', {}), backbone.describe(config.init, frozen), frozen)
  os.makedirs(FLAGS.out, exist_ok=True)
  if FLAGS.backbone:
    backbone.save_native(FLAGS.out, peft.merge(trainable, frozen),
                         {'family': config.model.family, 'name': config.model.name,
                          'made_by': 'adalink_jax.export', 'source_run': FLAGS.workdir,
                          'step': step})
    print(f'wrote backbone {FLAGS.out}')
    return 0
  base = f'{config.model.family}:{config.model.name}'
  card = peft.save_adapter(FLAGS.out, trainable, frozen, dict(config.peft), base,
                           extra={'step': step, 'source_run': os.path.abspath(FLAGS.workdir)},
                           bank_tasks=bank.names if bank is not None else None)
  print(f'wrote adapter ({card["num_params"]:,} params) to {FLAGS.out}')
  if fold is not None:
    folded = fold(peft.merge(trainable, frozen), task_index)
    tensors = {k: np.asarray(v) for k, v in folded.items()}
    save_file(tensors, os.path.join(FLAGS.out, 'folded_embedding.safetensors'))
    which = '' if task_index is None else f' for task {bank.names[task_index]!r}'
    shapes = ', '.join(f'{k} {tuple(v.shape)}' for k, v in tensors.items())
    print(f'wrote folded weights {shapes}{which}')
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir', 'out'])
  app.run(main, flags_parser=cli.parse_flags)
