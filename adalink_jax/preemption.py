"""SIGTERM (preemption) as a flag that every process of a run agrees on.

A TPU/GPU job is told to stop with SIGTERM, on one host or on all at slightly different
times. The train loop reads :meth:`Preemption.agreed` between steps: every process gets the
same answer at the same step, so all save that step and exit 0 together. On several
processes that answer comes from JAX's preemption service (which takes over SIGTERM when
``jax.distributed`` starts), and from an all-reduce of this module's flag every N steps. The handler is
installed before any work (the CLI enters :data:`PREEMPTION` first), so a SIGTERM during
start-up is a clean stop too, not a death by signal.
"""
from __future__ import annotations

import logging
import signal

import numpy as np

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
  """SIGTERM arrived before the run could do (and so save) anything new."""


def any_process(flag: bool) -> bool:
  """True if ``flag`` holds on any process (every process gets the same answer)."""
  import jax  # pylint: disable=g-import-not-at-top  (keeps this module light for the CLI)
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


class Preemption:
  """``with PREEMPTION:`` installs the SIGTERM handler (re-entrant; restored on the last exit)."""

  def __init__(self):
    self.requested = False
    self._depth = 0
    self._old = None

  def __enter__(self):
    if self._depth == 0:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    self._depth += 1
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True
    log.warning('SIGTERM received: stopping at the next agreed step')

  def __exit__(self, *exc):
    self._depth -= 1
    if self._depth == 0:
      signal.signal(signal.SIGTERM, self._old)
      self.requested = False

  def agreed(self, step: int, every: int) -> bool:
    """Whether all processes stop after ``step``: any process's SIGTERM, seen by every process
    at the same step. With several processes the flags are all-reduced every ``every`` steps
    (a small collective); one process reads its flag every step."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # Once jax.distributed is up, JAX's preemption service owns SIGTERM (and, on Cloud TPU,
    # the maintenance notices): it picks the first step every host can still reach. It must
    # be asked at every step.
    if multihost_utils.reached_preemption_sync_point(step):
      self.requested = True
      return True
    if step % max(every, 1):
      return False
    return any_process(self.requested)


PREEMPTION = Preemption()  # SIGTERM is process-wide, so is its flag
