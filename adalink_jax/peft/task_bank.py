"""Per-task adapter banks: which tasks a bank holds, and task ids that are always checked.

Data carries *global* task ids (``tasks.common.TASK_IDS`` for the seqio tasks, 0-14; the demo
is task 0). A bank of ``num_tasks`` adapters holds an ordered subset of those tasks
(``peft.bank_tasks``, or else the tasks of the training mixture): bank index ``i`` is the
adapter of ``names[i]``. Two guards keep an id from silently picking the wrong adapter
(``jnp.take`` fills out-of-range ids with NaN and wraps negative ones):

* host side, :meth:`TaskBank.map_batch_task_ids` rewrites a numpy batch's global ids to bank
  indices and raises for any task the bank does not hold;
* model side, :func:`bank_indices` raises for indices outside ``[0, num_tasks)`` -- eagerly
  with ``ValueError``, and inside ``jit`` through a host callback that aborts the computation.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

HINT = ('set peft.bank_tasks to the tasks you train and evaluate on, in bank order, and '
        'peft.num_tasks to their count')


def _identity(name: str) -> str:
  return name


@dataclasses.dataclass(frozen=True)
class TaskBank:
  """The tasks of a bank in bank order: ``names[i]`` (global id ``global_ids[i]``) is index i.

  ``known``: every global id the data can carry -> its name (for messages only);
  ``canonical``: name -> catalogue name (e.g. ``'vqav2_raw' -> 'vqav2'``); raises KeyError.
  """
  names: tuple[str, ...]
  global_ids: tuple[int, ...]
  known: Mapping[int, str] = dataclasses.field(default_factory=dict, compare=False)
  canonical: Callable[[str], str] = dataclasses.field(default=_identity, compare=False)

  @property
  def num_tasks(self) -> int:
    return len(self.names)

  def describe(self) -> str:
    """``"['vqav2' (id 2), 'okvqa' (id 3)]"``: the bank's tasks with their global ids."""
    return '[' + ', '.join(f'{n!r} (id {i})' for n, i in zip(self.names, self.global_ids)) + ']'

  def _key(self, name: str) -> str:
    return _canonical_or_self(self.canonical, name)

  def holds(self, name: str) -> bool:
    """Whether the task (or benchmark) ``name`` has an adapter in this bank."""
    return self._key(name) in self.names

  def index(self, name: str) -> int:
    """Bank index of a task or benchmark name; ValueError listing the bank's tasks otherwise."""
    if not self.holds(name):
      raise ValueError(f'task {name!r} is not in this adapter bank; it holds {self.describe()}')
    return self.names.index(self._key(name))

  def map_task_ids(self, task_id: Any, where: str = 'batch') -> np.ndarray:
    """Global ids ``[b]`` -> bank indices ``[b]`` int32; ValueError naming ids not in the bank."""
    ids = np.asarray(task_id)
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'{where}: task_id must be integers, got dtype {ids.dtype}')
    lookup = {g: i for i, g in enumerate(self.global_ids)}
    unknown = sorted({int(g) for g in np.unique(ids)} - set(lookup))
    if unknown:
      named = ', '.join(f'{g} ({self.known.get(g, "unknown task")})' for g in unknown)
      raise ValueError(f'{where}: task id(s) {named} are not in the adapter bank of '
                       f'num_tasks={self.num_tasks} {self.describe()}; {HINT}')
    return np.vectorize(lookup.__getitem__, otypes=[np.int32])(ids)

  def map_batch_task_ids(self, batch: Mapping[str, Any], where: str = 'batch') -> dict:
    """A numpy batch with global ``task_id [b]`` -> the same batch with bank indices."""
    if 'task_id' not in batch:
      raise ValueError(f'{where} has no task_id, but peft.num_tasks={self.num_tasks} needs one '
                       f'per example to pick its adapter from {self.describe()}; use a data '
                       'pipeline that keeps task_id (or peft.num_tasks=1)')
    return {**batch, 'task_id': self.map_task_ids(batch['task_id'], where)}


def _canonical_or_self(canonical: Callable[[str], str], name: str) -> str:
  try:
    return canonical(str(name))
  except KeyError:
    return str(name)


def make_bank(names: Sequence[str], catalog: Mapping[str, int],
              canonical: Callable[[str], str] = _identity) -> TaskBank:
  """Task names in bank order -> :class:`TaskBank`, checked against ``catalog`` (name -> id)."""
  keys = [_canonical_or_self(canonical, n) for n in names]
  unknown = [n for n, k in zip(names, keys) if k not in catalog]
  if unknown:
    raise ValueError(f'adapter bank: unknown task(s) {unknown}; known tasks: {sorted(catalog)}')
  dup = sorted({k for k in keys if keys.count(k) > 1})
  if dup:
    raise ValueError(f'peft.bank_tasks={tuple(names)} names {dup} twice; each task gets one '
                     'adapter of the bank')
  known = {i: n for n, i in catalog.items()}
  return TaskBank(tuple(keys), tuple(catalog[k] for k in keys), known, canonical)


def resolve_bank(bank_tasks: Sequence[str], num_tasks: int, trained: Sequence[str],
                 catalog: Mapping[str, int],
                 canonical: Callable[[str], str] = _identity) -> TaskBank:
  """``peft.bank_tasks`` or, if empty, the ``trained`` tasks ordered by global id -> a bank.

  ValueError when the bank's size differs from ``num_tasks`` (naming both).
  """
  if bank_tasks:
    bank = make_bank(bank_tasks, catalog, canonical)
    if bank.num_tasks != num_tasks:
      raise ValueError(f'peft.bank_tasks lists {bank.num_tasks} tasks {bank.names} but '
                       f'peft.num_tasks={num_tasks}; make them agree')
    return bank
  # Global-id order: the same bank whatever order a mixture lists its tasks in.
  keys = sorted({_canonical_or_self(canonical, t) for t in trained},
                key=lambda k: (catalog.get(k, -1), k))
  bank = make_bank(keys, catalog, canonical)
  if bank.num_tasks != num_tasks:
    raise ValueError(f'peft.num_tasks={num_tasks} but the training data has {bank.num_tasks} '
                     f'task(s) {bank.describe()}; set peft.num_tasks={bank.num_tasks} or '
                     'list the bank explicitly in peft.bank_tasks')
  log.info('adapter bank of %d tasks derived from the training data: %s', bank.num_tasks,
           bank.describe())
  return bank


def check_declared(bank: TaskBank, tasks: Sequence[str], where: str) -> None:
  """Fails early (before any data is read) when ``where`` uses tasks the bank lacks."""
  missing = [t for t in tasks if not bank.holds(t)]
  if missing:
    raise ValueError(f'{where} uses task(s) {missing} that are not in the adapter bank of '
                     f'num_tasks={bank.num_tasks} {bank.describe()}; {HINT}')


# ------------------------------------------------------------------ model side


def check_index(task: Any, num_tasks: int, where: str) -> int:
  """One concrete bank index (e.g. the task to fold) -> int, or ValueError."""
  if isinstance(task, (bool, np.bool_)) or not isinstance(task, (int, np.integer)):
    raise ValueError(f'{where}: task must be an integer bank index, got {task!r}')
  if not 0 <= int(task) < num_tasks:
    raise ValueError(f'{where}: task {int(task)} is outside the bank of num_tasks={num_tasks} '
                     f'(valid 0..{num_tasks - 1}); look tasks up by name in the bank\'s '
                     'bank_tasks (adapter card)')
  return int(task)


def _raise_out_of_range(got: str, num_tasks: int, where: str) -> None:
  raise ValueError(f'{where}: task_id out of range for a bank of num_tasks={num_tasks}: got '
                   f'{got}, valid 0..{num_tasks - 1}; map global task ids to bank indices with '
                   'adalink_jax.peft.task_bank (peft.bank_tasks)')


def bank_indices(task_id: Optional[Any], num_tasks: int, where: str) -> jax.Array:
  """Per-example bank indices ``[b]`` -> int32 ``[b]``, checked to lie in ``[0, num_tasks)``.

  Concrete ids raise ValueError here. Traced ids (under jit) get a device-side range check; on
  failure a host callback raises, which aborts the computation with this ValueError's message
  (only the two scalars min/max travel, and only when something is wrong). After this, a
  gather may use ``mode='promise_in_bounds'``.
  """
  if task_id is None:
    raise ValueError(f'{where} holds a bank of num_tasks={num_tasks} adapters: pass task_id[b]')
  if not jnp.issubdtype(jnp.result_type(task_id), jnp.integer):
    raise ValueError(f'{where}: task_id must be integers, got dtype {jnp.result_type(task_id)}')
  if not isinstance(task_id, jax.core.Tracer):
    ids = np.asarray(task_id)
    bad = ids[(ids < 0) | (ids >= num_tasks)]
    if bad.size:
      _raise_out_of_range(f'task_id(s) {sorted(set(bad.tolist()))}', num_tasks, where)
    return jnp.asarray(ids, jnp.int32)
  ids = task_id.astype(jnp.int32)
  if ids.size == 0:
    return ids
  lo, hi = jnp.min(ids), jnp.max(ids)

  def fail(lo, hi):
    jax.debug.callback(
        lambda a, b: _raise_out_of_range(f'ids in [{int(a)}, {int(b)}]', num_tasks, where), lo, hi)

  jax.lax.cond((lo < 0) | (hi >= num_tasks), fail, lambda lo, hi: None, lo, hi)
  return ids


def gather(bank: jax.Array, ids: jax.Array) -> jax.Array:
  """``bank[tasks, ...]``, checked ``ids [b]`` (from :func:`bank_indices`) -> ``[b, ...]``."""
  return bank.at[ids].get(mode='promise_in_bounds')
