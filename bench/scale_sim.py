"""Scale by simulation: compile (never run) an AdaLink train step of a PaLI-X-shaped model on a
fake mesh of CPU devices and read XLA's per-device memory plan.

``python -m bench.scale_sim --spec=spec.json --out=result.json``, started by
:func:`bench.common.run_child` with ``--xla_force_host_platform_device_count=<mesh size>``.
Nothing is allocated: parameters, optimizer state and batch are ``jax.ShapeDtypeStruct`` with
shardings. Frozen weights are bf16 and FSDP-sharded by the project's logical-axis rules;
AdaLink weights (fp32) and their AdamW state are replicated; the batch is split over
``data x fsdp``; both stacks are scanned over layers with full remat; activations are bf16.

spec: ``model`` (model_builder block), ``mesh`` (data/fsdp/model sizes), ``batch_per_device``,
``text_len``, ``target_len`` and optional ``layer_fraction`` (< 1 keeps that fraction of every
stack's layers: the fallback when the full model takes too long to compile).
"""
from __future__ import annotations

import contextlib
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from adalink_jax import model_builder, optim, partitioning, peft
from adalink_jax.models import pali as pali_lib
from bench import common
from bench import setups


def _scaled_model(model: dict, fraction: float) -> dict:
  """Model block with every stack's depth multiplied by ``fraction`` (at least one layer)."""
  if fraction >= 1.0:
    return model
  full = pali_lib.pali_config(model['name'])
  keep = lambda n: max(1, int(round(n * fraction)))
  out = dict(model)
  out['t5'] = dict(model.get('t5') or {}, num_encoder_layers=keep(full.t5.num_encoder_layers),
                   num_decoder_layers=keep(full.t5.num_decoder_layers))
  out['vit'] = dict(model.get('vit') or {}, depth=keep(full.vit.depth))
  return out


def batch_constraints(mesh, global_batch: int):
  """A flax method interceptor pinning every module output ``[global_batch, ...]`` to the batch
  sharding (``data x fsdp`` on dim 0, the rest replicated).

  Why: the T5 blocks pin their ``[batch, length, embed]`` activations, but other module outputs
  (ViT, adapters, projections) carry no annotation, and with weights FSDP-sharded on ``embed``
  XLA's propagation may resolve the conflict by replicating the batch on every device. t5x pins
  activations to ``('batch', 'length', 'embed')`` for the same reason; this does it from
  outside the model, at every module boundary.
  """

  def pin(x):
    if isinstance(x, jax.Array) and x.ndim >= 2 and x.shape[0] == global_batch:
      spec = P(partitioning.BATCH_AXES, *([None] * (x.ndim - 1)))
      return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x

  def interceptor(next_fun, args, kwargs, context):  # pylint: disable=unused-argument
    return jax.tree.map(pin, next_fun(*args, **kwargs))

  return nn.intercept_methods(interceptor)


def run(spec: dict) -> dict:
  """Lowers and compiles the sharded AdaLink step; returns its memory plan and the layer counts."""


  fraction = float(spec.get('layer_fraction', 1.0))
  model = _scaled_model(spec['model'], fraction)
  cfg = setups.config(model, 'adalink', dtype='bfloat16',
                      t5_extra=dict(scan_layers=True, remat_policy='full'))
  setup = model_builder.build(cfg)
  mesh = partitioning.make_mesh(**spec['mesh'])
  n_dev = mesh.devices.size
  b = spec['batch_per_device'] * mesh.shape['data'] * mesh.shape['fsdp']

  t0 = time.perf_counter()
  boxed = jax.eval_shape(setup.init, jax.random.key(0), setup.init_batch(1, 4, 4))
  shardings = partitioning.param_shardings(boxed, mesh, replicate=setup.trainable)
  shapes = nn.unbox(boxed)
  counts = peft.param_counts(shapes, setup.trainable)
  train_shapes, frozen_shapes = peft.split(shapes, setup.trainable)
  train_sh, frozen_sh = peft.split(shardings, setup.trainable)
  sds = lambda x, s, dt=None: jax.ShapeDtypeStruct(x.shape, dt or x.dtype, sharding=s)
  trainable = jax.tree.map(sds, train_shapes, train_sh)
  frozen = jax.tree.map(lambda x, s: sds(x, s, jnp.bfloat16), frozen_shapes, frozen_sh)

  optimizer, _ = optim.make_optimizer(dict(name='adamw', learning_rate=1e-4))
  replicated = NamedSharding(mesh, P())
  opt_state = jax.tree.map(lambda x: sds(x, replicated),
                           jax.eval_shape(optimizer.init, train_shapes))
  bsh = lambda nd: partitioning.batch_sharding(mesh, nd)
  pc = setup.pali_config
  h, w = pc.vit.image_size
  batch = dict(
      image=jax.ShapeDtypeStruct((b, h, w, pc.vit.num_channels), jnp.bfloat16, sharding=bsh(4)),
      encoder_input_tokens=jax.ShapeDtypeStruct((b, spec['text_len']), jnp.int32, sharding=bsh(2)),
      decoder_input_tokens=jax.ShapeDtypeStruct((b, spec['target_len']), jnp.int32,
                                                sharding=bsh(2)),
      decoder_target_tokens=jax.ShapeDtypeStruct((b, spec['target_len']), jnp.int32,
                                                 sharding=bsh(2)),
      decoder_loss_weights=jax.ShapeDtypeStruct((b, spec['target_len']), jnp.float32,
                                                sharding=bsh(2)))
  # Outputs keep the inputs' shardings so the donated adapters / optimizer state alias in place.
  out_shardings = (jax.tree.map(lambda x: x.sharding, trainable),
                   jax.tree.map(lambda x: x.sharding, opt_state), replicated)
  step = jax.jit(peft.make_train_step(setup.model, optimizer, forward=setup.forward),
                 donate_argnums=(0, 1), out_shardings=out_shardings)
  plan_s = time.perf_counter() - t0
  pin = spec.get('activation_constraints', True)
  with mesh, (batch_constraints(mesh, b) if pin else contextlib.nullcontext()):
    t0 = time.perf_counter()
    lowered = step.lower(trainable, opt_state, frozen, batch, None)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
  memory = common.memory_of(compiled)

  frozen_bytes = common.tree_bytes(frozen)
  per_device_frozen = sum(
      math.prod(s.sharding.shard_shape(s.shape)) * jnp.dtype(s.dtype).itemsize
      for s in jax.tree_util.tree_leaves(frozen))
  return dict(
      kind='scale', model=spec['model']['name'], layer_fraction=fraction,
      activation_constraints=bool(pin),
      vit_depth=pc.vit.depth, t5_encoder_layers=pc.t5.num_encoder_layers,
      t5_decoder_layers=pc.t5.num_decoder_layers, mesh=dict(mesh.shape), num_devices=n_dev,
      global_batch=b, batch_per_device=spec['batch_per_device'],
      image_tokens=pc.num_image_tokens, text_len=spec['text_len'], target_len=spec['target_len'],
      params_total=counts['total'], params_trainable=counts['trainable'],
      frozen_bytes_total=frozen_bytes, frozen_bytes_per_device=int(per_device_frozen),
      plan_s=plan_s, lower_s=lower_s, compile_s=compile_s, xla_memory=memory,
      rss_peak_bytes=common.peak_rss_bytes())


if __name__ == '__main__':
  common.child_main(run)
