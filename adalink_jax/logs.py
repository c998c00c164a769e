"""What a person reads during a run: a progress bar, TensorBoard events and a JSON-lines log.

Only process 0 writes; other hosts get a silent writer so multi-host runs don't interleave.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np


def setup_logging(level: int = logging.INFO):
  """Readable ``time level message`` logs on stderr; silence chatty libraries."""
  logging.basicConfig(level=level, format='%(asctime)s %(levelname)s %(name)s: %(message)s',
                      stream=sys.stderr, force=True)
  for noisy in ('absl', 'tensorflow', 'jax._src', 'orbax', 'etils', 'seqio'):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _scalar(v: Any) -> Any:
  if isinstance(v, (np.ndarray, jax.Array)):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()
  return v


class MetricWriter:
  """Writes scalars to ``<workdir>/metrics.jsonl`` and TensorBoard, and drives a tqdm bar."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
               enabled: Optional[bool] = None, show_bar: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._bar = None
    self._tb = None
    self._jsonl = None
    self._last = (initial_step, time.perf_counter())
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
    if show_bar:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                       desc='train', unit='step', file=sys.stderr)

  def steps_per_second(self, step: int) -> float:
    """Steps/s since the previous call (wall clock)."""
    last_step, last_t = self._last
    now = time.perf_counter()
    self._last = (step, now)
    return (step - last_step) / max(now - last_t, 1e-9)

  def write(self, step: int, scalars: Mapping[str, Any], kind: str = 'train'):
    """Logs ``scalars`` at ``step`` under ``kind`` (``train``, ``eval/<task>`` ...)."""
    if not self.enabled:
      return
    row = {'step': int(step), 'kind': kind, 'time': time.time(),
           **{k: _scalar(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for k, v in row.items():
      if k not in ('step', 'kind', 'time') and isinstance(v, (int, float)):
        self._tb.add_scalar(f'{kind}/{k}', v, step)
    self._tb.flush()

  def progress(self, step: int, **postfix: float):
    """Moves the bar to ``step`` and shows ``postfix`` (loss, lr, steps/s)."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
