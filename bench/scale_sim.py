"""Scale by simulation: compile (never run) an AdaLink train step of a large image-text model
(PaLI-X: ViT + T5 encoder-decoder; PaliGemma 2: SigLIP + Gemma 2 decoder) on a fake mesh of CPU
devices and read XLA's per-device memory plan.

``python -m bench.scale_sim --spec=spec.json --out=result.json``, started by
:func:`bench.common.run_child` with ``--xla_force_host_platform_device_count=<mesh size>``.
Nothing is allocated: parameters, optimizer state and batch are ``jax.ShapeDtypeStruct`` with
shardings. Frozen weights are bf16 and FSDP-sharded by the project's logical-axis rules;
AdaLink weights (fp32, text + image) and their AdamW state are replicated; the batch (the
family's ``init_batch`` shapes) is split over ``data x fsdp``; both stacks are scanned over
layers with full remat; activations are bf16.

Activation sharding constraints: the model always has its own -- every T5 encoder / decoder
and Gemma block pins its ``[batch, length, embed]`` activations to the batch axes
(``models.t5.constrain_activations``). On top of those, ``activation_constraints`` (default
True) pins *every* module output whose leading dimension is the global batch
(:func:`batch_constraints`: ViT, adapters, projections); False compiles the model with only
its own block constraints.

spec: ``model`` (model_builder block; family ``pali`` or ``paligemma``), ``mesh``
(data/fsdp/model sizes), ``batch_per_device``, ``text_len``, ``target_len``, optional
``activation_constraints`` (see above) and ``layer_fraction`` (< 1 keeps that fraction of
every stack's layers: the fallback when the full model takes too long to compile).
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
from adalink_jax.models import gemma as gemma_lib
from adalink_jax.models import pali as pali_lib
from adalink_jax.models import paligemma as pg_lib
from bench import common
from bench import setups


# Per family: the config block its scan / remat overrides go to (the ViT follows: ``pali_config``
# and ``paligemma_config`` share ``scan_layers`` / ``remat_policy`` with it).
_STACK_BLOCK = {'pali': 't5', 'paligemma': 'llm'}
_SCAN = dict(scan_layers=True, remat_policy='full')


def _family(model: dict) -> str:
  family = model.get('family', 't5')
  if family not in _STACK_BLOCK:
    raise ValueError(f'bench.scale_sim: model family {family!r} is not supported; choose from '
                     f'{sorted(_STACK_BLOCK)} (an image-text family with a scanned ViT)')
  return family


def build(model: dict):
  """The AdaLink (rank 64, text + image) family object of a model block, both stacks scanned
  with full remat, bf16 activations."""
  family = _family(model)
  if family == 'pali':  # the PaLI-X path as it always was
    cfg = setups.config(model, 'adalink', dtype='bfloat16', t5_extra=_SCAN)
  else:
    block = _STACK_BLOCK[family]
    cfg = setups.config(dict(model, **{block: dict(model.get(block) or {}, **_SCAN)}),
                        'adalink', dtype='bfloat16')
  return model_builder.build(cfg)  # AdaLink on text + image tokens (setups.peft_block)


def _config(setup):
  """The family's ViT + language-model config (``PaLIConfig`` / ``PaliGemmaConfig``)."""
  return setup.pali_config if setup.family == 'pali' else setup.paligemma_config


def layer_counts(setup) -> dict:
  """Depth of every stack: ``vit_depth`` and ``t5_encoder_layers`` / ``t5_decoder_layers``
  (PaLI) or ``gemma_layers`` / ``gemma_local_layers`` (PaliGemma; local = sliding window)."""
  pc = _config(setup)
  if setup.family == 'pali':
    return dict(vit_depth=pc.vit.depth, t5_encoder_layers=pc.t5.num_encoder_layers,
                t5_decoder_layers=pc.t5.num_decoder_layers)
  return dict(vit_depth=pc.vit.depth, gemma_layers=pc.llm.num_layers,
              gemma_local_layers=sum(t == gemma_lib.LOCAL for t in pc.llm.layer_types))


def backbone_params(setup) -> int:
  """Parameters of the frozen backbone (no adapters), counted without allocating."""
  count = pali_lib.config_param_count if setup.family == 'pali' else pg_lib.param_count
  return count(_config(setup))


def _scaled_model(model: dict, fraction: float) -> dict:
  """Model block with every stack's depth multiplied by ``fraction`` (at least one layer).

  Gemma keeps the first ``n`` entries of its ``layer_types``: the local/global pattern depends
  on the layer index only (``gemma.layer_pattern``), so that is the pattern of an ``n``-layer
  model of the same family.
  """
  if fraction >= 1.0:
    return model
  if not 0.0 < fraction:
    raise ValueError(f'bench.scale_sim: layer_fraction={fraction} must be in (0, 1]')
  setup = build(model)
  full = _config(setup)
  keep = lambda n: max(1, int(round(n * fraction)))
  out = dict(model, vit=dict(model.get('vit') or {}, depth=keep(full.vit.depth)))
  if setup.family == 'pali':
    out['t5'] = dict(model.get('t5') or {}, num_encoder_layers=keep(full.t5.num_encoder_layers),
                     num_decoder_layers=keep(full.t5.num_decoder_layers))
  else:
    n = keep(full.llm.num_layers)
    out['llm'] = dict(model.get('llm') or {}, num_layers=n, layer_types=full.llm.layer_types[:n])
  return out


def batch_shapes(setup, mesh, batch: int, text_len: int, target_len: int) -> dict:
  """The train batch as sharded ``ShapeDtypeStruct``s, from the family's ``init_batch`` shapes:
  image (bf16, if the family has one) ``[b, H, W, C]``, ``encoder_input_tokens [b, text_len]``,
  ``decoder_input_tokens`` / ``decoder_target_tokens`` (int32) and ``decoder_loss_weights``
  (fp32) ``[b, target_len]``. No ``task_id``: one task, as the trainer's batches."""
  shapes = jax.eval_shape(lambda: setup.init_batch(batch, text_len, target_len))
  shapes.pop('task_id', None)
  dec = shapes['decoder_input_tokens']
  shapes['decoder_target_tokens'] = dec
  shapes['decoder_loss_weights'] = jax.ShapeDtypeStruct(dec.shape, jnp.float32)
  if 'image' in shapes:
    shapes['image'] = jax.ShapeDtypeStruct(shapes['image'].shape, jnp.bfloat16)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                  sharding=partitioning.batch_sharding(mesh, v.ndim))
          for k, v in shapes.items()}


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
  setup = build(_scaled_model(spec['model'], fraction))
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
  batch = batch_shapes(setup, mesh, b, spec['text_len'], spec['target_len'])
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
      kind='scale', model=spec['model']['name'], family=setup.family, layer_fraction=fraction,
      activation_constraints=bool(pin), **layer_counts(setup), mesh=dict(mesh.shape),
      num_devices=n_dev, global_batch=b, batch_per_device=spec['batch_per_device'],
      image_tokens=_config(setup).num_image_tokens, text_len=spec['text_len'],
      target_len=spec['target_len'],
      params_total=counts['total'], params_trainable=counts['trainable'],
      frozen_bytes_total=frozen_bytes, frozen_bytes_per_device=int(per_device_frozen),
      plan_s=plan_s, lower_s=lower_s, compile_s=compile_s, xla_memory=memory,
      rss_peak_bytes=common.peak_rss_bytes())


if __name__ == '__main__':
  common.child_main(run)
