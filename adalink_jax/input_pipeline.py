"""Training and eval batches for the trainer, one host-local shard per process.

A *source* has ``train_batches(start)`` (endless, deterministic: batch ``k`` is always the
same, so resuming at step ``s`` just starts at batch ``s``), ``eval_tasks()`` (what each eval
task scores and how, :class:`evaluation.EvalTask`), ``eval_batches(n, task)`` and
``decode_text(ids)``. Batches are dicts of numpy arrays (``image``, ``encoder_input_tokens``,
``decoder_input_tokens``, ``decoder_target_tokens``, ``decoder_loss_weights``, ``task_id``);
eval batches add ``targets`` (per example, postprocessed by the task), ``prompts`` and
``valid`` (False on the padding rows of a last batch).

``task_id`` leaves the sources as a *global* id (the task package's ``TASK_IDS``; the demo is 0).
With a per-task adapter bank (``peft.num_tasks > 1``) :func:`make_source` wraps the source so
every batch reaching the model carries *bank indices* instead, and refuses tasks outside the
bank (see :mod:`adalink_jax.peft.task_bank`).
"""
from __future__ import annotations

from typing import Any, Iterator

from adalink_jax import evaluation
from adalink_jax import multihost
from adalink_jax.peft import task_bank


# The demo's ShapesTask labels every example task 0, its only task.
DEMO_TASKS = {'demo': 0}


class DemoSource:
  """The embedded demo's synthetic shapes (see :mod:`adalink_jax.demo`)."""

  def __init__(self, config: Any):
    from adalink_jax import demo  # pylint: disable=g-import-not-at-top
    d = config.data
    assets = d.get('assets_dir') or demo.default_assets_dir()
    self.task = demo.ShapesTask(demo.spm_path(assets), mode=d.get('mode', 'vqa'),
                                batch_size=int(config.batch_size), image_size=int(d.image_size),
                                text_len=int(d.text_len), target_len=int(d.target_len),
                                seed=int(d.get('seed', 0)))
    self.metric = config.eval.metric

  def train_batches(self, start: int = 0) -> Iterator[dict]:
    for b in self.task.train_batches(start):
      yield multihost.host_slice(b)

  def eval_tasks(self) -> list[evaluation.EvalTask]:
    """One task, scored by ``config.eval.metric`` against every answer of the example."""
    return [evaluation.EvalTask('demo', str.strip, (evaluation.named_metric(self.metric),))]

  def eval_batches(self, num_batches: int, task: str = 'demo') -> Iterator[dict]:
    del task  # the demo has one eval task
    for b in self.task.eval_batches(num_batches):
      yield dict(multihost.host_slice(b), targets=multihost.host_slice({'a': b['answers']})['a'])

  def decode_text(self, ids) -> str:
    return self.task.decode_text(ids)


class BankedSource:
  """A source whose batches carry bank indices (``bank.map_batch_task_ids``), not global ids."""

  def __init__(self, source: Any, bank: task_bank.TaskBank):
    self.source = source
    self.bank = bank

  def train_batches(self, start: int = 0) -> Iterator[dict]:
    for i, b in enumerate(self.source.train_batches(start), start):
      yield self.bank.map_batch_task_ids(b, f'train batch {i}')

  def eval_batches(self, num_batches: int, task: str) -> Iterator[dict]:
    for i, b in enumerate(self.source.eval_batches(num_batches, task)):
      yield self.bank.map_batch_task_ids(b, f'eval batch {i} of {task}')

  def __getattr__(self, name: str) -> Any:  # decode_text, vocab, ... of the wrapped source
    return getattr(self.__dict__['source'], name)


def _seqio_names(task: Any) -> tuple[str, ...]:
  """Names of the seqio Tasks in a Task or (nested) Mixture."""
  import seqio  # pylint: disable=g-import-not-at-top
  return tuple(t.name for t in (task.tasks if isinstance(task, seqio.Mixture) else [task]))


def _task_catalog(source: Any) -> tuple[dict, Any, tuple, tuple]:
  """(name -> global id, name normaliser, training task names, eval task names) of a source."""
  if isinstance(source, DemoSource):
    return DEMO_TASKS, str, tuple(DEMO_TASKS), tuple(DEMO_TASKS)
  package = source.task_package  # the seqio source's tasks (ids, benchmark names)
  return (package.TASK_IDS, package.benchmark_of, _seqio_names(source.train_task),
          tuple(t.name for t in source.eval_tasks()))


def task_bank_for(config: Any, source: Any) -> task_bank.TaskBank:
  """The bank ``config.peft`` asks for (``bank_tasks`` or the training tasks), checked against
  the training and eval tasks of ``source`` before any data is read."""
  catalog, canonical, train, evals = _task_catalog(source)
  p, d = config.peft, config.data
  bank = task_bank.resolve_bank(tuple(p.get('bank_tasks', ()) or ()), int(p.num_tasks), train,
                                catalog, canonical)
  task_bank.check_declared(bank, train, f'training data (config.data.task={d.get("task")!r})')
  task_bank.check_declared(bank, evals, 'eval data (config.data.eval_task='
                           f'{d.get("eval_task") or d.get("task")!r})')
  return bank


def make_source(config: Any):
  """``config.data.kind`` -> a source ('demo' or 'seqio'); bank indices for a task bank."""
  kind = config.data.kind
  if kind == 'demo':
    source = DemoSource(config)
  elif kind == 'seqio':
    # Imported here: it loads TensorFlow, seqio and the task package, which the demo never needs.
    from adalink_jax import seqio_source  # pylint: disable=g-import-not-at-top
    source = seqio_source.SeqioSource(config)
  else:
    raise ValueError(f"config.data.kind={kind!r}; choose 'demo' or 'seqio'")
  if int(config.peft.get('num_tasks', 1)) == 1:
    return source
  return BankedSource(source, task_bank_for(config, source))
