"""Orbax train-state checkpoints: keep-N, keep-best, corrupt-latest fallback, backbone refusal."""
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from adalink_jax import checkpointing
from adalink_jax.checkpoints import backbone


def _state(v):
  return {'trainable': {'w': jnp.full((3, 2), float(v))}, 'opt_state': {'count': jnp.array(v)}}


def test_keep_n_and_keep_best(tmp_path):
  ck = checkpointing.TrainCheckpointer(str(tmp_path), max_to_keep=2, best_metric='acc')
  scores = {1: 10.0, 2: 90.0, 3: 20.0, 4: 30.0}
  for step, acc in scores.items():
    ck.save(step, _state(step), {'step': step}, metrics={'acc': acc}, force=True)
  ck.wait()
  # The two best by 'acc' survive: 90 (step 2) and 30 (step 4).
  assert ck.all_steps() == [2, 4]
  ck.close()


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
  ck = checkpointing.TrainCheckpointer(str(tmp_path), max_to_keep=3)
  for step in (1, 2):
    ck.save(step, _state(step), {'step': step}, force=True)
  ck.close()
  # Truncate every data file of the newest checkpoint, as a crash mid-copy would.
  for root, _, files in os.walk(tmp_path / '2' / 'state'):
    for f in files:
      if 'manifest' in f or os.sep + 'd' in root:
        with open(os.path.join(root, f), 'wb') as fh:
          fh.write(b'\0\1garbage')
  ck = checkpointing.TrainCheckpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    step, state, meta = ck.restore_latest(checkpointing.abstract_like(_state(0)))
  assert step == 1 and meta == {'step': 1}
  np.testing.assert_array_equal(np.asarray(state['trainable']['w']), np.full((3, 2), 1.0))
  assert 'step 2' in caplog.text and 'unreadable' in caplog.text
  ck.close()


def test_no_checkpoint_restores_none(tmp_path):
  ck = checkpointing.TrainCheckpointer(str(tmp_path / 'empty'))
  assert ck.restore_latest(checkpointing.abstract_like(_state(0))) is None
  ck.close()


def test_resume_on_another_backbone_is_refused():
  a = backbone.describe({'native': '/a'}, {'w': np.ones((2,), np.float32)})
  b = backbone.describe({'native': '/b'}, {'w': np.zeros((2,), np.float32)})
  backbone.check_same(a, a)
  with pytest.raises(ValueError, match='different frozen backbone'):
    backbone.check_same(a, b)
