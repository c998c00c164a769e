"""Train-state checkpoints with Orbax: trainable params, optimizer state and the step.

What a step directory ``<step>/`` holds: ``state``, the pytree the trainer passes
(``{'trainable': ..., 'opt_state': ...}``; the optimizer state carries the schedule's count),
and ``meta``, a JSON dict the trainer composes (``trainer._checkpoint_meta``: the step, the
frozen backbone's sources and content hash, the ``peft`` config block, the model family and
name). Nothing else is saved, in particular neither an RNG state nor a data position: the RNG
of step ``s`` is ``fold_in(seed, s)`` and its data is batch ``s`` of the deterministic input
pipeline (computed directly for index-addressable tasks; TFDS tasks skip records, packed
batches are replayed), both recomputed from the config and the step on resume. The frozen
backbone is never re-saved: it is reloaded from ``config.init``, and a resume against a
different backbone (other hash) is refused.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it).

Restore tells two failures apart, because they call for opposite actions:
* a checkpoint whose *structure* (parameter names, shapes, dtypes) differs from what this
  run builds was written by another experiment: :class:`CheckpointMismatchError`, nothing
  is touched (the user chooses a new workdir or an explicit restart);
* a checkpoint that has this run's structure but cannot be read is corrupt: it is moved to
  ``checkpoints/corrupt/<step>`` (kept for inspection, out of Orbax's way so later saves of
  that step succeed) and the previous one is tried, with a warning naming both.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

CORRUPT_DIR = 'corrupt'


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir belongs to a run with other parameter shapes / names."""


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'a/b': (shape, dtype)}`` for array-like leaves (Orbax metadata or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))[0]
  out = {}
  for path, leaf in flat:
    if hasattr(leaf, 'shape'):
      name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                      for k in path)
      out[name] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
  return out


def structure_diff(saved: Any, wanted: Any, limit: int = 6) -> list[str]:
  """Readable differences between two trees of shaped leaves (empty when they agree)."""
  a, b = _leaves(saved), _leaves(wanted)
  out = [f'{k}: only in the checkpoint {a[k][0]}' for k in sorted(set(a) - set(b))]
  out += [f'{k}: only in this run {b[k][0]}' for k in sorted(set(b) - set(a))]
  out += [f'{k}: checkpoint {a[k][0]} {a[k][1]} vs this run {b[k][0]} {b[k][1]}'
          for k in sorted(set(a) & set(b)) if a[k] != b[k]]
  out.sort(key=lambda line: not line.startswith('trainable'))  # parameters before slots
  return out[:limit] + ([f'... and {len(out) - limit} more'] if len(out) > limit else [])


def _all_processes_agree(ok: bool) -> bool:
  """True only if ``ok`` on every process (a restore decision must be the same everywhere)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray([ok], np.int32))))


class TrainCheckpointer:
  """Periodic / final saves, keep-N, keep-best-by-metric and a checked restore of the latest step."""

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

  def _saved_structure(self, step: int) -> Any:
    meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), 'state'))
    return getattr(meta, 'item_metadata', meta)

  def _quarantine(self, step: int, error: Exception):
    """Moves an unreadable step to ``corrupt/<step>`` so the run can go on (and save it anew)."""
    dest = os.path.join(self.directory, CORRUPT_DIR, str(step))
    if jax.process_index() == 0:
      if os.path.exists(dest):  # an earlier quarantine of the same step: keep both
        dest += time.strftime('.%Y%m%d-%H%M%S')
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'quarantine checkpoint {step}')
    log.warning('checkpoint at step %d is unreadable (%s: %s); moved it to %s and trying the '
                'previous one', step, type(error).__name__, str(error)[:200], dest)

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """Restores the newest readable checkpoint into ``abstract_state``'s shapes and shardings.

    Returns ``(step, state, meta)`` or None when there is no readable checkpoint. Raises
    :class:`CheckpointMismatchError` when a checkpoint has another structure; moves a corrupt
    one aside (see the module docstring).
    """
    self.manager.reload()
    for step in reversed(self.all_steps()):
      saved, error = None, RuntimeError('its metadata cannot be read')
      try:
        saved = self._saved_structure(step)
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if saved is not None:
        diff = structure_diff(saved, abstract_state)
        if diff:
          raise CheckpointMismatchError(
              f'checkpoint {step} in {self.directory} was written by a run with other '
              f'parameters ({"; ".join(diff)}); use a new --workdir, or pass '
              '--config.restart=True to move the old run aside and start again')
        try:
          restored = self.manager.restore(
              step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                            meta=ocp.args.JsonRestore()))
          error = None
        except Exception as e:  # pylint: disable=broad-except
          error = e
      if _all_processes_agree(error is None):
        return step, restored['state'], dict(restored['meta'])
      self._quarantine(step, error or RuntimeError('unreadable on another process'))
      self.manager.reload()
    return None

  def restore_subtree(self, key: str, abstract: Any) -> Optional[tuple[int, Any, dict]]:
    """Newest checkpoint's ``state[key]`` alone (e.g. the trainable params, without optimizer
    state), or None. Nothing else of the state is allocated."""
    self.manager.reload()
    for step in reversed(self.all_steps()):
      saved = self._saved_structure(step)
      diff = structure_diff(saved[key], abstract)
      if diff:
        raise CheckpointMismatchError(
            f'checkpoint {step} in {self.directory} does not fit this config '
            f'({"; ".join(diff)}): pass the config the run was trained with')
      restore_args = jax.tree.map(
          lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                         dtype=a.dtype), abstract)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item={key: abstract}, restore_args={key: restore_args},
                                       partial_restore=True),
          meta=ocp.args.JsonRestore()))
      return step, restored['state'][key], dict(restored['meta'])
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing ``tree``, the restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)
