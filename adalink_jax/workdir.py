"""What a training workdir promises: one writer at a time, one experiment, nothing overwritten.

* :class:`Lock` -- ``<workdir>/.lock`` (host, pid, process start time) taken by process 0 and
  agreed by all processes. A second writer is refused; a lock left by a dead process on this
  host (kill -9, OOM) is stale and taken over with a warning.
* :func:`check_config` -- ``<workdir>/config.json`` records the experiment. Re-running with a
  different experiment (another method, rank, task, learning rate ...) stops with the fields
  that differ, before anything is written; fields that may change between the runs of one
  experiment (total steps, logging, eval, mesh, paths) are allowed. ``config.restart=True``
  moves the old run into ``<workdir>/previous/<time>/`` and starts again.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

LOCK, CONFIG, PREVIOUS = '.lock', 'config.json', 'previous'

# Fields that may differ between the runs of one experiment (resume longer, log or evaluate
# differently, run on another mesh, find the same files elsewhere). Everything else is part of
# what the checkpoints in the workdir mean.
RESUMABLE_FIELDS = ('total_steps', 'optimizer.total_steps', 'log_every', 'checkpoint_every',
                    'keep_checkpoints', 'best_metric', 'eval', 'mesh', 'num_microbatches',
                    'restart', 'preempt_check_every', 'init', 'data.assets_dir',
                    'data.tfds_data_dir', 'data.data_dirs', 'data.vocab', 'data.eval_task',
                    'data.eval_split', 'demo_backbone')


class WorkdirError(RuntimeError):
  """The workdir is in use, or holds another experiment."""


def _agree(ok: bool) -> bool:
  """Process 0's decision, seen by every process."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))


def _start_time(pid: int) -> Optional[str]:
  """The process's start time in clock ticks since boot (tells a reused pid apart)."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  if holder.get('host') != socket.gethostname():
    return True  # cannot check another host: assume it is running
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  started = holder.get('started')
  return started is None or _start_time(int(holder['pid'])) == started


class Lock:
  """``with Lock(workdir):`` -- refuses a second writer; see the module docstring."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._held = False

  def _try_take(self) -> Optional[str]:
    """Takes the lock; returns None, or why it cannot."""
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': _start_time(os.getpid()),
          'time': time.strftime('%Y-%m-%d %H:%M:%S')}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          with open(self.path, encoding='utf-8') as f:
            holder = json.load(f)
        except (OSError, ValueError):
          holder = {}
        if holder and _alive(holder):
          return (f'{os.path.dirname(self.path)} is in use by another training run (pid '
                  f'{holder.get("pid")} on {holder.get("host")} since {holder.get("time")}); '
                  f'use another --workdir, or delete {self.path} if that run is gone')
        log.warning('taking over the stale lock %s (%s is not running)', self.path,
                    holder or 'an unreadable lock')
        os.remove(self.path)
        continue
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        json.dump(me, f)
      return None
    return f'could not take the lock {self.path}'

  def __enter__(self):
    problem = self._try_take() if jax.process_index() == 0 else None
    if not _agree(problem is None):
      raise WorkdirError(problem or 'process 0 could not lock the workdir (see its log)')
    self._held = jax.process_index() == 0
    return self

  def __exit__(self, *exc):
    if self._held and os.path.exists(self.path):
      os.remove(self.path)
    self._held = False


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_dict(config: Any) -> dict:
  """The config as JSON-able nested dicts (tuples -> lists), as stored in ``config.json``."""
  return json.loads(config.to_json_best_effort()) if hasattr(config, 'to_json_best_effort') \
      else json.loads(json.dumps(config, default=str))


def _resumable(field: str) -> bool:
  return any(field == f or field.startswith(f + '.') for f in RESUMABLE_FIELDS)


def config_diff(saved: dict, current: dict) -> list[str]:
  """``['peft.rank: 8 -> 4', ...]`` for the experiment-defining fields that differ."""
  a, b = _flat(saved), _flat(current)
  return [f'{k}: {a.get(k, "<unset>")} -> {b.get(k, "<unset>")}'
          for k in sorted(set(a) | set(b)) if not _resumable(k) and a.get(k) != b.get(k)]


def _archive(workdir: str) -> str:
  """Moves everything in ``workdir`` (but the lock and older archives) to previous/<time>/."""
  dest = os.path.join(workdir, PREVIOUS, time.strftime('%Y%m%d-%H%M%S'))
  while os.path.exists(dest):
    dest += '_'
  os.makedirs(dest)
  for name in os.listdir(workdir):
    if name not in (LOCK, PREVIOUS):
      os.replace(os.path.join(workdir, name), os.path.join(dest, name))
  return dest


def check_config(workdir: str, config: Any) -> None:
  """Refuses a workdir holding another experiment (see the module docstring).

  Call with the lock held. With ``config.restart=True`` the old run is archived first.
  """
  current = config_dict(config)
  path = os.path.join(workdir, CONFIG)
  problem = None
  if jax.process_index() == 0:
    has_run = os.path.exists(path) or os.path.isdir(os.path.join(workdir, 'checkpoints'))
    if has_run and config.get('restart', False):
      log.warning('config.restart=True: moved the previous run in %s to %s', workdir,
                  _archive(workdir))
    elif os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        diff = config_diff(json.load(f), current)
      if diff:
        problem = (f'{workdir} holds another experiment ({"; ".join(diff)}); use a new '
                   '--workdir, or pass --config.restart=True to move the old run to '
                   f'{os.path.join(workdir, PREVIOUS)}/ and start again')
  if not _agree(problem is None):
    raise WorkdirError(problem or 'process 0 refused the workdir (see its log)')


def record_config(workdir: str, config: Any) -> None:
  """Writes ``config.json`` -- once the run's checkpoints are known to fit this config."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, CONFIG)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(config_dict(config), f, indent=1, sort_keys=True)
    os.replace(path + '.tmp', path)
