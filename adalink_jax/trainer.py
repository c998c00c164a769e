"""The train loop: mesh, sharded init, the pure train step, checkpoints, logs, eval.

State that is saved: trainable params, optimizer state and the step. The RNG of step ``s`` is
``fold_in(seed, s)`` and the data of step ``s`` is batch ``s`` of a deterministic pipeline,
so a run killed at any point and restarted from its last checkpoint reproduces an
uninterrupted run bit for bit. Frozen weights are loaded from ``config.init`` every time
and never re-saved; each checkpoint records their path and content hash.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from adalink_jax import checkpointing
from adalink_jax import decoding
from adalink_jax import input_pipeline
from adalink_jax import logs
from adalink_jax import model_builder
from adalink_jax import optim
from adalink_jax import partitioning
from adalink_jax.checkpoints import backbone as backbone_lib
from adalink_jax.peft import methods as peft_methods
from adalink_jax.peft import train as peft_train

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (save, then exit 0)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._old)


def plan_params(config: Any, setup: model_builder.Setup, mesh) -> tuple[Any, Any, dict]:
  """(boxed parameter shapes, their shardings, an init batch), all abstract: nothing allocated.

  Adapters are replicated (tiny, updated every step); frozen weights follow the rules table.
  Full fine-tuning trains everything, so everything follows the rules table.
  """
  d = config.data
  batch = setup.init_batch(int(config.batch_size), int(d.text_len), int(d.target_len))
  boxed = jax.eval_shape(setup.init, jax.random.key(0), batch)
  replicate = None if config.peft.method == 'ft' else setup.trainable
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
    self.boxed_shapes, self.param_shardings, self._init_batch = plan_params(
        config, self.setup, self.mesh)
    self.tx, self.schedule = optim.make_optimizer(dict(config.optimizer))

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

  def evaluate(self, trainable: dict, frozen: dict, step: int, write: bool = True) -> dict:
    """Decodes the eval split, computes the task metric, writes predictions and metrics."""
    cfg = self.config.eval
    params = peft_methods.merge(trainable, frozen)
    dec = dict(cfg.decoding)
    method = dec.pop('method', 'greedy')
    max_len = int(dec.pop('max_decode_len', self.config.data.target_len))
    eos, start = self.setup.t5_config.eos_id, self.setup.t5_config.decoder_start_id
    model = self.setup.model

    @jax.jit
    def predict(params, batch):
      encoded, mask = self.setup.encode(params, batch)
      task_id = batch.get('task_id')
      if method == 'beam':
        return decoding.beam_search(model, params, encoded, mask, max_len, eos_id=eos,
                                    start_id=start, task_id=task_id, **dec).sequences
      if method == 'sample':
        return decoding.sample_decode(model, params, encoded, mask, max_len,
                                      jax.random.key(self.config.seed), eos_id=eos,
                                      start_id=start, task_id=task_id, **dec)
      return decoding.greedy_decode(model, params, encoded, mask, max_len, eos_id=eos,
                                    start_id=start, task_id=task_id)

    predictions, references, prompts = [], [], []
    with self.mesh:
      for local in self.source.eval_batches(int(cfg.num_batches)):
        n = len(local['answers'])
        valid = local.pop('valid', np.ones((n,), bool))
        tokens = predict(params, self.to_global(local))
        tokens = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
        valid = input_pipeline.gather_strings([bool(v) for v in valid])
        refs = input_pipeline.gather_strings(local['answers'])
        prm = input_pipeline.gather_strings(local.get('prompts', [''] * n))
        keep = [i for i, v in enumerate(valid) if v]  # drop the padding of a last batch
        predictions += [self.source.decode_text(tokens[i]) for i in keep]
        references += [refs[i] for i in keep]
        prompts += [prm[i] for i in keep]
    metrics = input_pipeline.compute_metrics(cfg.metric, predictions, references)
    if write and jax.process_index() == 0:
      out = os.path.join(self.workdir, 'eval')
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, f'predictions_{step}.jsonl'), 'w', encoding='utf-8') as f:
        for p, r, q in zip(predictions, references, prompts):
          f.write(json.dumps({'prompt': q, 'prediction': p, 'references': r}) + '\n')
      with open(os.path.join(out, f'metrics_{step}.json'), 'w', encoding='utf-8') as f:
        json.dump({'step': step, **metrics}, f, indent=1)
    return metrics


def restore_trainable(trainer: Trainer, trainable: dict, checkpoint: str) -> tuple[int, dict, dict]:
  """Trainable params from a run's workdir (newest good step) -> (step, trainable, meta)."""
  directory = os.path.join(checkpoint, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoints/ in {checkpoint!r}: pass the --workdir of a '
                            'training run (python -m adalink_jax.train ... --workdir=DIR)')
  ckpt = checkpointing.TrainCheckpointer(directory)
  restored = ckpt.restore_latest(checkpointing.abstract_like(
      {'trainable': trainable, 'opt_state': trainer.init_opt_state(trainable)}))
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'{directory} holds no readable checkpoint')
  step, state, meta = restored
  return step, state['trainable'], meta


def _checkpoint_meta(config, backbone: dict, step: int) -> dict:
  return {'step': step, 'backbone': backbone, 'peft': dict(config.get('peft') or {}),
          'model': {'family': config.model.family, 'name': config.model.name}}


def train(config: Any, workdir: str) -> dict:
  """Runs (or resumes) training; returns the final metrics (also in ``workdir/result.json``)."""
  return train_and_return_params(config, workdir)[0]


def train_and_return_params(config: Any, workdir: str) -> tuple[dict, dict]:
  """Like :func:`train`, and also returns the final parameters (trainable and frozen merged)."""
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, workdir)
  trainable, frozen = trainer.init_params()
  backbone = backbone_lib.describe(config.init, frozen)
  counts = peft_methods.param_counts(peft_methods.merge(trainable, frozen), trainer.setup.trainable,
                                     num_tasks=int(config.peft.get('num_tasks', 1)))
  log.info('parameters:\n%s', peft_methods.param_table(counts))
  opt_state = trainer.init_opt_state(trainable)

  ckpt = checkpointing.TrainCheckpointer(os.path.join(workdir, 'checkpoints'),
                                         max_to_keep=int(config.keep_checkpoints),
                                         best_metric=config.get('best_metric') or None)
  start = 0
  restored = ckpt.restore_latest(checkpointing.abstract_like(
      {'trainable': trainable, 'opt_state': opt_state}))
  if restored is not None:
    start, state, meta = restored
    backbone_lib.check_same(meta.get('backbone', {}), backbone)
    trainable, opt_state = state['trainable'], state['opt_state']
    log.info('resumed from step %d in %s', start, ckpt.directory)

  total = int(config.total_steps)
  writer = logs.MetricWriter(workdir, total, start)
  step_fn = trainer.make_train_step()
  result: dict = {'trainable_params': counts['trainable'], 'frozen_params': counts['frozen']}
  if config.eval.get('at_start', False) and start == 0:
    result['eval_at_start'] = trainer.evaluate(trainable, frozen, 0)
    writer.write(0, result['eval_at_start'], kind='eval')
    log.info('eval before training (frozen model + zero-initialised adapters): %s',
             result['eval_at_start'])

  batches = trainer.source.train_batches(start)
  step = start
  last_good = start
  with _Preemption() as preempt, trainer.mesh:
    while step < total:
      batch = trainer.to_global(next(batches))
      trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                              jnp.asarray(step, jnp.int32))
      step += 1
      # One read of the flag per step: the save and the exit below must agree on it.
      stop = preempt.requested
      is_log = step % int(config.log_every) == 0 or step == total
      is_ckpt = step % int(config.checkpoint_every) == 0 or step == total or stop
      is_eval = int(config.eval.every) > 0 and (step % int(config.eval.every) == 0 or step == total)
      if is_log or is_ckpt or is_eval:
        loss = float(metrics['loss'])
        if not math.isfinite(loss):
          writer.close()
          ckpt.close()
          raise NonFiniteLossError(
              f'loss became {loss} at step {step}; stopping without saving this state. The last '
              f'good checkpoint (step {last_good}) is kept in {ckpt.directory}; lower '
              f'optimizer.learning_rate, add optimizer.grad_clip_norm or check the data.')
      if is_log:
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars['steps_per_second'] = writer.steps_per_second(step)
        writer.write(step, scalars)
        writer.progress(step, loss=scalars['loss'], lr=scalars['learning_rate'],
                        steps_per_s=scalars['steps_per_second'])
      eval_metrics = None
      if is_eval:
        eval_metrics = trainer.evaluate(trainable, frozen, step)
        writer.write(step, eval_metrics, kind='eval')
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
        log.warning('SIGTERM received: saved step %d, exiting', step)
        result['preempted_at'] = step
        break
  ckpt.wait()
  ckpt.close()
  writer.close()
  result.update(step=step, final_loss=float(metrics['loss']) if step > start else None)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'result.json'), 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
  return result, peft_methods.merge(trainable, frozen)
