"""Makes the demo's vocabulary and frozen backbone on first use (nothing is downloaded)."""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from adalink_jax import demo
from adalink_jax import preemption
from adalink_jax import trainer
from adalink_jax.checkpoints import backbone as backbone_lib

log = logging.getLogger(__name__)


def ensure(config: Any, pretrain_config: Any) -> str:
  """Returns the backbone directory for ``config``, pre-training it first if it is not there."""
  assets = config.data.get('assets_dir') or demo.default_assets_dir()
  spm = demo.spm_path(assets)
  if not os.path.exists(spm):
    log.info('demo: training the SentencePiece vocabulary at %s', spm)
    demo.train_vocabulary(spm)
  # One backbone per family, so the PaLI demo and the PaliGemma demo never share a folder.
  suffix = '' if config.model.family == 'pali' else f'_{config.model.family}'
  out = os.path.join(assets, 'backbone' + suffix)
  if os.path.exists(os.path.join(out, backbone_lib.NATIVE_CARD)):
    return out
  pre = pretrain_config.copy_and_resolve_references()
  pre.data.assets_dir = assets
  log.info('demo: pre-training the tiny frozen backbone (%d steps of full fine-tuning on '
           'rendered shapes); done once, kept in %s', pre.total_steps, out)
  t0 = time.time()
  result, params = trainer.train_and_return_params(pre, os.path.join(assets, 'pretrain_run' + suffix))
  if result.get('preempted_at') is not None:
    raise preemption.Preempted('demo: backbone pre-training was interrupted (SIGTERM); run '
                               'the same command again to resume it')
  backbone_lib.save_native(out, params, {
      'family': pre.model.family, 'name': pre.model.name, 'made_by': 'adalink_jax.demo_assets',
      'pretrain_steps': int(pre.total_steps), 'final_loss': result.get('final_loss')})
  log.info('demo: backbone ready in %.0f s (final loss %.3f)', time.time() - t0,
           result.get('final_loss') or float('nan'))
  return out
