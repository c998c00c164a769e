"""The train loop: mesh, sharded init, the pure train step, checkpoints, logs, eval.

State that is saved: trainable params, optimizer state and the step. The RNG of step ``s`` is
``fold_in(seed, s)`` and the data of step ``s`` is batch ``s`` of a deterministic pipeline,
so a run killed at any point and restarted from its last checkpoint reproduces an
uninterrupted run bit for bit. Frozen weights are loaded from ``config.init`` every time
and never re-saved; each checkpoint records their path and content hash.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from adalink_jax import checkpointing
from adalink_jax import evaluation
from adalink_jax import input_pipeline
from adalink_jax import logs
from adalink_jax import model_builder
from adalink_jax import multihost
from adalink_jax import optim
from adalink_jax import partitioning
from adalink_jax import preemption
from adalink_jax import rank_classification
from adalink_jax import workdir as workdir_lib
from adalink_jax.checkpoints import backbone as backbone_lib
from adalink_jax.peft import methods as peft_methods
from adalink_jax.peft import registry as peft_registry
from adalink_jax.peft import train as peft_train

log = logging.getLogger(__name__)

RESULT = 'result.json'


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


def plan_params(config: Any, setup: model_builder.Setup, mesh) -> tuple[Any, Any, dict]:
  """(boxed parameter shapes, their shardings, an init batch), all abstract: nothing allocated.

  Adapters are replicated (tiny, updated every step); frozen weights follow the rules table.
  Full fine-tuning trains everything, so everything follows the rules table.
  """
  d = config.data
  batch = setup.init_batch(int(config.batch_size), int(d.text_len), int(d.target_len))
  boxed = jax.eval_shape(setup.init, jax.random.key(0), batch)
  replicate = None if peft_registry.get(config.peft.method).trains_all else setup.trainable
  return boxed, partitioning.param_shardings(boxed, mesh, replicate=replicate), batch


class Trainer:
  """Everything built from a config: model, mesh, shardings, frozen weights, step functions."""

  def __init__(self, config: Any, workdir: str):
    self.config = config
    self.workdir = workdir
    self.setup = model_builder.build(config)
    self.mesh = partitioning.make_mesh(**dict(config.mesh))
    replicas = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    if int(config.batch_size) % replicas:
      raise ValueError(f'config.batch_size={config.batch_size} must be divisible by '
                       f'mesh data x fsdp = {replicas} (the batch is split over them)')
    self.source = input_pipeline.make_source(config)
    _check_vocab_fits(getattr(self.source, 'vocab', None), self.setup)
    self.boxed_shapes, self.param_shardings, self._init_batch = plan_params(
        config, self.setup, self.mesh)
    self.tx, self.schedule = optim.make_optimizer(dict(config.optimizer))
    self._predict = {}  # eval task name (None: any task without label words) -> jitted eval
    self._eval_sharding = partitioning.batch_sharding(self.mesh, 2)  # of every eval output

  # ---------------------------------------------------------------- parameters

  def _split(self, tree):
    return peft_methods.split(tree, self.setup.trainable)

  def init_params(self) -> tuple[dict, dict]:
    """(trainable, frozen): random init in place on the mesh, then the backbone from config.init."""
    init = jax.jit(lambda rng: nn.unbox(self.setup.init(rng, self._init_batch)),
                   out_shardings=self.param_shardings)
    with self.mesh:
      params = init(jax.random.key(self.config.seed))
    params = backbone_lib.load_into(self.config.init, params, self.param_shardings,
                                    self.setup)
    trainable, frozen = self._split(params)
    peft_cfg = peft_methods.parse(self.config.peft)
    after_load = peft_registry.get(peft_cfg.method).after_load
    if after_load is not None:  # e.g. a prompt drawn from the loaded token table
      with self.mesh:
        trainable = after_load(peft_cfg, trainable, self.setup.embedding_table(frozen),
                               jax.random.fold_in(jax.random.key(self.config.seed), 1))
    frozen = jax.tree.map(lambda x: x.astype(self.setup.frozen_dtype)
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    return trainable, frozen

  def init_opt_state(self, trainable: dict) -> Any:
    """Optimizer state on the mesh: slots follow their parameter, scalars are replicated."""
    with self.mesh:
      state = jax.jit(self.tx.init)(trainable)
    replicated = NamedSharding(self.mesh, P())
    # Scalars (step counts) come back on one device; pin them to the mesh so a restored
    # state has the same placement as a fresh one.
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding)
                        else jax.device_put(x, replicated), state)

  # ---------------------------------------------------------------- steps

  def batch_shardings(self, batch: dict) -> dict:
    return {k: partitioning.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

  def to_global(self, local: dict) -> dict:
    """Host-local numpy batch -> global arrays sharded over data x fsdp."""
    arrays = {k: v for k, v in local.items() if isinstance(v, np.ndarray)}
    sh = self.batch_shardings(arrays)
    return {k: jax.make_array_from_process_local_data(sh[k], v) for k, v in arrays.items()}

  def make_train_step(self):
    step = peft_train.make_train_step(self.setup.model, self.tx, forward=self.setup.forward,
                                      num_microbatches=int(self.config.get('num_microbatches', 1)))

    def train_step(trainable, opt_state, frozen, batch, step_index):
      rng = jax.random.fold_in(jax.random.key(self.config.seed), step_index)
      trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, rng)
      metrics['learning_rate'] = self.schedule(step_index)
      return trainable, opt_state, metrics
    return jax.jit(train_step, donate_argnums=(0, 1))

  # ---------------------------------------------------------------- eval

  def _predictor(self, task: evaluation.EvalTask):
    """The jitted eval of one batch -> (tokens[, rank scores ``[b, c]``]): the configured
    decoding, plus, for a task with label words, every label scored on the same run of the
    prompt (``generate_and_score``; the labels are a constant every host holds alike). Built
    once per run, and once per task with label words."""
    key = None if task.candidates is None else task.name
    if key in self._predict:
      return self._predict[key]
    dec = dict(self.config.eval.decoding)
    method = dec.pop('method', 'greedy')
    max_len = int(dec.pop('max_decode_len', self.config.data.target_len))
    if method == 'sample':
      dec['rng'] = jax.random.key(self.config.seed)
    if key is None:
      def predict(params, batch):
        return (self.setup.generate(params, batch, max_len, method, **dec),)
    else:
      predict = functools.partial(self.setup.generate_and_score, max_decode_len=max_len,
                                  candidates=np.asarray(task.candidates, np.int32),
                                  method=method, **dec)
    self._predict[key] = jax.jit(predict, out_shardings=self._eval_sharding)
    return self._predict[key]

  def predict_batch(self, params: dict, batch: dict, task: evaluation.EvalTask
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """(decoded tokens, rank scores or None) of this host's rows of the global ``batch``."""
    out = [np.asarray(multihost_utils.global_array_to_host_local_array(
        x, self.mesh, self._eval_sharding.spec)) for x in self._predictor(task)(params, batch)]
    return out[0], (out[1] if len(out) > 1 else None)

  def _padding_batch(self, like: dict | None) -> dict:
    """An all-invalid eval batch, for a host whose shard of the eval set ran out first."""
    if like is None:  # this host had no eval example at all
      n = multihost.local_batch_size(int(self.config.batch_size))
      keys = [k for k in _ENCODE_KEYS if k in self._init_batch
              and (k != 'task_id' or 'image' in self._init_batch)]
      like = {k: np.zeros((n,) + self._init_batch[k].shape[1:], self._init_batch[k].dtype)
              for k in keys}
    n = len(next(iter(like.values())))
    pad = {k: np.zeros_like(v) for k, v in like.items()}
    return dict(pad, valid=np.zeros((n,), bool), targets=[None] * n, prompts=[''] * n)

  def _eval_rows(self, params: dict, task: evaluation.EvalTask) -> tuple[list, list, list, list]:
    """(predictions, targets, prompts, ranked label indices or []) of one eval task, valid
    rows, every host's.

    Every host runs the same number of batches -- a host whose shard ran out feeds padding,
    masked out of the metric -- so the collectives inside ``predict`` cannot hang; the decoded
    strings are gathered once at the end.
    """
    batches = iter(self.source.eval_batches(int(self.config.eval.num_batches), task.name))
    rows, template = [], None
    while True:
      local = next(batches, None)
      if not preemption.any_process(local is not None):
        break
      if local is None:
        local = self._padding_batch(template)
      model_inputs = {k: v for k, v in local.items() if k in _ENCODE_KEYS}
      template = template or model_inputs
      n = len(local['targets'])
      valid = local.get('valid', np.ones((n,), bool))
      tokens, scores = self.predict_batch(params, self.to_global(model_inputs), task)
      ranked = np.full((n,), -1)
      if scores is not None:
        ranked = np.argmax(rank_classification.checked_scores(
            scores, (n, len(task.candidates)), f'the candidates of {task.name}'), axis=1)
      prompts = local.get('prompts', [''] * n)
      rows += [(self.source.decode_text(tokens[i]), _jsonable(local['targets'][i]), prompts[i],
                int(ranked[i])) for i in range(n) if valid[i]]
    rows = multihost.gather_strings(rows)
    ranked = [r[3] for r in rows] if task.candidates is not None else []
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], ranked

  def evaluate(self, trainable: dict, frozen: dict, step: int, write: bool = True) -> dict:
    """Decodes every eval task, scores each by its own rules, writes predictions and metrics.

    Returns flat metrics (:func:`evaluation.flatten`): ``<task>/<metric>``, plus the bare
    metric names with one task or ``average`` with several.
    """
    per_task, outputs = {}, {}
    params = peft_methods.merge(trainable, frozen)
    with self.mesh:
      for task in self.source.eval_tasks():
        predictions, targets, prompts, ranked = self._eval_rows(params, task)
        per_task[task.name] = evaluation.score(task, predictions, targets)
        if ranked:
          per_task[task.name].update(evaluation.score_ranked(task, ranked, targets))
        outputs[task.name] = (predictions, targets, prompts,
                              [task.labels[i] for i in ranked] or [None] * len(predictions))
    metrics = evaluation.flatten(per_task)
    if write and jax.process_index() == 0:
      out = os.path.join(self.workdir, 'eval')
      os.makedirs(out, exist_ok=True)
      several = len(outputs) > 1
      for name, (predictions, targets, prompts, ranked) in outputs.items():
        path = os.path.join(out, f'predictions_{step}' + (f'_{name}' if several else '') +
                            '.jsonl')
        with open(path, 'w', encoding='utf-8') as f:
          for p, r, q, k in zip(predictions, targets, prompts, ranked):
            row = {'prompt': q, 'prediction': p, 'references': r}
            f.write(json.dumps(row if k is None else dict(row, rank_prediction=k)) + '\n')
      with open(os.path.join(out, f'metrics_{step}.json'), 'w', encoding='utf-8') as f:
        json.dump({'step': step, 'num_examples': sum(len(o[0]) for o in outputs.values()),
                   **({'num_examples_per_task': {k: len(o[0]) for k, o in outputs.items()}}
                      if several else {}), **metrics}, f, indent=1)
    return metrics


def _check_vocab_fits(vocab: Any, setup: model_builder.Setup) -> None:
  """Refuses a task vocabulary larger than the model's token table, for every family: ids
  beyond the table would be silently clamped by the embedding lookup."""
  if vocab is not None and vocab.vocab_size > setup.vocab_size:
    raise ValueError(f'the task vocabulary ({vocab.vocab_size} ids, config.data.vocab) does not '
                     f'fit the model\'s token table ({setup.vocab_size} rows, config.model '
                     f'{setup.family} {setup.config.model.get("name")!r}): ids beyond the table '
                     'would be silently clamped; raise the model\'s vocab_size override or use '
                     'its own vocabulary')


def _jsonable(x: Any) -> Any:
  """numpy scalars / arrays / bytes in targets -> JSON types (they are gathered as JSON)."""
  if isinstance(x, bytes):
    return x.decode('utf-8')
  if isinstance(x, np.ndarray):
    return [_jsonable(v) for v in x.tolist()]
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


_ENCODE_KEYS = ('encoder_input_tokens', 'image', 'task_id')


def restore_trainable(trainer: Trainer, trainable: dict, checkpoint: str) -> tuple[int, dict, dict]:
  """Trainable params from a run's workdir (newest step) -> (step, trainable, meta).

  Reads the trainable parameters alone: no optimizer state is allocated or read.
  """
  directory = os.path.join(checkpoint, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoints/ in {checkpoint!r}: pass the --workdir of a '
                            'training run (python -m adalink_jax.train ... --workdir=DIR)')
  ckpt = checkpointing.TrainCheckpointer(directory)
  try:
    restored = ckpt.restore_subtree('trainable', checkpointing.abstract_like(trainable))
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'{directory} holds no checkpoint')
  return restored


def _checkpoint_meta(config, backbone: dict, step: int) -> dict:
  return {'step': step, 'backbone': backbone, 'peft': dict(config.get('peft') or {}),
          'model': {'family': config.model.family, 'name': config.model.name}}


@jax.jit
def _finite(leaves: list) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree: Any) -> bool:
  """Whether every float in ``tree`` is finite (one compiled reduction, reused every check)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_finite(leaves)) if leaves else True


def _bytes_held_here(tree: Any) -> tuple[int, int]:
  """(bytes of ``tree`` whose values this process holds, total bytes): FSDP at work."""
  here = total = 0
  for x in jax.tree.leaves(tree):
    total += x.nbytes
    here += sum({str(s.index): s.data.nbytes for s in x.addressable_shards}.values())
  return here, total


def _read_result(workdir: str) -> dict:
  path = os.path.join(workdir, RESULT)
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _write_result(workdir: str, result: dict):
  if jax.process_index() == 0:
    path = os.path.join(workdir, RESULT)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
    os.replace(path + '.tmp', path)


def train(config: Any, workdir: str) -> dict:
  """Runs (or resumes) training; returns the final metrics (also in ``workdir/result.json``)."""
  return train_and_return_params(config, workdir)[0]


def train_and_return_params(config: Any, workdir: str) -> tuple[dict, dict]:
  """Like :func:`train`, and also returns the final parameters (trainable and frozen merged).

  Holds the workdir's lock and refuses a workdir of another experiment (:mod:`workdir`).
  """
  with preemption.PREEMPTION:
    os.makedirs(workdir, exist_ok=True)
    with workdir_lib.Lock(workdir):
      workdir_lib.check_config(workdir, config)
      return _train(config, workdir, preemption.PREEMPTION)


def _train(config: Any, workdir: str, preempt: preemption.Preemption) -> tuple[dict, dict]:
  every = int(config.get('preempt_check_every', 10))

  def stop_now(step):
    return preempt.agreed(step, 1)  # start-up phases: every process is at the same point

  trainer = Trainer(config, workdir)
  trainable, frozen = trainer.init_params()
  backbone = backbone_lib.describe(config.init, frozen)
  counts = peft_methods.param_counts(peft_methods.merge(trainable, frozen), trainer.setup.trainable,
                                     num_tasks=int(config.peft.get('num_tasks', 1)))
  log.info('parameters:\n%s', peft_methods.param_table(counts))
  here, total_bytes = _bytes_held_here(frozen)
  log.info('frozen weights: %.2f of %.2f MiB held by process %d (%.0f%%)', here / 2**20,
           total_bytes / 2**20, jax.process_index(), 100 * here / max(total_bytes, 1))
  opt_state = trainer.init_opt_state(trainable)

  ckpt = checkpointing.TrainCheckpointer(os.path.join(workdir, 'checkpoints'),
                                         max_to_keep=int(config.keep_checkpoints),
                                         best_metric=config.get('best_metric') or None)
  start = 0
  restored = ckpt.restore_latest(checkpointing.abstract_like(
      {'trainable': trainable, 'opt_state': opt_state}))
  if restored is not None:
    start, state, meta = restored
    backbone_lib.check_same(meta.get('backbone', {}), backbone, frozen)
    trainable, opt_state = state['trainable'], state['opt_state']
    log.info('resumed from step %d in %s', start, ckpt.directory)
  workdir_lib.record_config(workdir, config)

  total = int(config.total_steps)
  previous = _read_result(workdir)
  result: dict = {k: v for k, v in previous.items() if k in ('eval_at_start', 'eval')}
  result.update(trainable_params=counts['trainable'], frozen_params=counts['frozen'])
  if start >= total and previous.get('finished'):
    ckpt.close()
    log.info('this run finished at step %d; its results are in %s (raise config.total_steps '
             'to train longer)', start, os.path.join(workdir, RESULT))
    return previous, peft_methods.merge(trainable, frozen)
  if stop_now(start):
    ckpt.close()
    raise preemption.Preempted(f'SIGTERM during start-up, before step {start + 1}: nothing '
                               'new to save; run the same command again to continue')

  writer = logs.MetricWriter(workdir, total, start)
  step_fn = trainer.make_train_step()
  if config.eval.get('at_start', False) and start == 0:
    result['eval_at_start'] = trainer.evaluate(trainable, frozen, 0)
    writer.write(0, result['eval_at_start'], kind='eval')
    log.info('eval before training (frozen model + zero-initialised adapters): %s',
             result['eval_at_start'])
    if stop_now(start):
      writer.close()
      ckpt.close()
      raise preemption.Preempted('SIGTERM during the initial eval: nothing to save yet; run '
                                 'the same command again to start')

  batches = trainer.source.train_batches(start)
  step = start
  last_good = start if start else None
  metrics, warned_zero_grad = None, False
  rates = []  # steps/s of each logging interval: the first holds the compile
  with trainer.mesh:
    while step < total:
      batch = trainer.to_global(next(batches))
      trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                              jnp.asarray(step, jnp.int32))
      step += 1
      # One agreed read of the flag per step: the save and the exit below must agree on it.
      stop = preempt.agreed(step, every)
      is_log = step % int(config.log_every) == 0 or step == total
      is_ckpt = step % int(config.checkpoint_every) == 0 or step == total or stop
      is_eval = int(config.eval.every) > 0 and (step % int(config.eval.every) == 0 or step == total)
      if is_log or is_ckpt or is_eval:
        loss = float(metrics['loss'])
        # The loss is the one before this update; the state about to be saved is after it.
        if not math.isfinite(loss) or not _all_finite((trainable, opt_state)):
          writer.close()
          ckpt.close()
          kept = (f'the last good checkpoint (step {last_good}) is kept in {ckpt.directory}'
                  if last_good else 'no checkpoint had been saved yet')
          raise NonFiniteLossError(
              f'training became non-finite at step {step} (loss {loss}); stopping without '
              f'saving this state: {kept}. Lower optimizer.learning_rate, add '
              'optimizer.grad_clip_norm or check the data.')
      if is_log:
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars['steps_per_second'] = writer.steps_per_second(step)
        rates.append(scalars['steps_per_second'])
        writer.write(step, scalars)
        writer.progress(step, loss=scalars['loss'], lr=scalars['learning_rate'],
                        steps_per_s=scalars['steps_per_second'])
        if scalars.get('grad_norm') == 0.0 and not warned_zero_grad:
          warned_zero_grad = True
          log.warning('the gradient is exactly zero at step %d: the trainable parameters are '
                      'not learning (saturated activations, a learning rate far too large, or '
                      'all loss weights zero?)', step)
      eval_metrics = None
      if is_eval:
        eval_metrics = trainer.evaluate(trainable, frozen, step)
        writer.write(step, eval_metrics, kind='eval')
        _warn_if_collapsed(result.get('eval') or result.get('eval_at_start'), eval_metrics, step)
        result['eval'] = eval_metrics
        log.info('eval at step %d: %s', step, eval_metrics)
      if is_ckpt:
        # force: Orbax's own save policy must not veto a preemption or final save.
        saved = ckpt.save(step, {'trainable': trainable, 'opt_state': opt_state},
                          _checkpoint_meta(config, backbone, step), metrics=eval_metrics,
                          force=True)
        if not saved:
          raise RuntimeError(f'checkpoint at step {step} was not written to {ckpt.directory}')
        last_good = step
      if stop:
        log.warning('SIGTERM: every process saved step %d; exiting', step)
        result['preempted_at'] = step
        break
  batches.close()  # an open tf.data iterator can hang the interpreter's exit
  ckpt.wait()
  ckpt.close()
  writer.close()
  if len(rates) > 1:  # the median interval after the compile, data pipeline included
    result['step_time_s'] = float(np.median([1 / r for r in rates[1:]]))
  result.update(step=step, finished=step >= total and 'preempted_at' not in result,
                final_loss=float(metrics['loss']) if metrics is not None else
                previous.get('final_loss'))
  report = getattr(trainer.source, 'report', None)
  if report is not None:
    result['data'] = report()
  _write_result(workdir, result)
  return result, peft_methods.merge(trainable, frozen)


def _warn_if_collapsed(before: dict | None, after: dict, step: int):
  """A metric that fell from a positive value to zero is worth a warning, not silence."""
  for k, v in after.items():
    if before and (before.get(k) or 0) > 0 and v == 0:
      log.warning('eval %s collapsed from %.4g to 0 at step %d: check the learning rate and '
                  'the predictions in eval/', k, before[k], step)
