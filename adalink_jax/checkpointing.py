"""Train-state checkpoints with Orbax: trainable params, optimizer state, step, RNG, data position.

The frozen backbone is never re-saved: each checkpoint's JSON ``meta`` records the
backbone's path and content hash, and a resume against a different backbone is refused.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it);
a latest checkpoint that cannot be read is skipped with a warning and the previous good
one is used.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class TrainCheckpointer:
  """Periodic / final saves, keep-N, keep-best-by-metric and a robust restore of the latest good step."""

  def __init__(self, directory: str, max_to_keep: int = 3, best_metric: Optional[str] = None,
               best_mode: str = 'max', async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
        best_mode=best_mode,
        keep_checkpoints_without_metrics=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a save killed half-way
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, meta: Mapping[str, Any],
           metrics: Optional[Mapping[str, float]] = None, force: bool = False) -> bool:
    """Starts an (async) save of ``state`` (a pytree of arrays) and JSON ``meta`` at ``step``."""
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None  # only eval steps carry the metric; others are kept by recency
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(dict(meta))),
        metrics=dict(metrics) if metrics else None, force=force)

  def wait(self):
    """Blocks until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """Restores the newest readable checkpoint into ``abstract_state``'s shapes and shardings.

    Returns ``(step, state, meta)`` or None when there is no checkpoint. A checkpoint that
    fails to read (truncated file, missing array) is skipped with a warning naming it.
    """
    self.manager.reload()
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          meta=ocp.args.JsonRestore()))
        return step, restored['state'], dict(restored['meta'])
      except Exception as e:  # pylint: disable=broad-except
        log.warning('checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one',
                    step, self.directory, type(e).__name__, str(e)[:200])
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing ``tree``, the restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)
