"""One train-step configuration (model x method), measured in its own process.

``python -m bench.train_step --spec=spec.json --out=result.json``; ``spec``: ``model`` (a
``setups.TRAIN_MODELS`` entry), ``method``, ``steps`` (timed), ``warmup``, ``dtype``.

The step is :func:`adalink_jax.peft.make_train_step` with AdamW, jitted with the trainable
params and optimizer state donated, exactly as the trainer does. Measured: trace+lower and
compile seconds, compiled FLOPs (``cost_analysis``), XLA's memory plan (``memory_analysis``),
the median of ``steps`` step times after ``warmup`` calls (each call blocks until its outputs
are ready), the process's RSS high-water mark, parameter / optimizer-state / checkpoint bytes.
"""
from __future__ import annotations

import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax import model_builder, optim, peft
from bench import common
from bench import setups


def _batch(setup, spec: dict, seed: int = 0) -> dict:
  """Random tokens (never pad) and, for PaLI, an image in [-1, 1]."""
  rng = np.random.default_rng(seed)
  b, l, t = spec['batch'], spec['text_len'], spec['target_len']
  v = setup.t5_config.vocab_size
  tok = lambda n: jnp.asarray(rng.integers(2, v, (b, n)), jnp.int32)
  batch = dict(encoder_input_tokens=tok(l), decoder_input_tokens=tok(t),
               decoder_target_tokens=tok(t), decoder_loss_weights=jnp.ones((b, t), jnp.float32))
  if setup.pali_config is not None:
    h, w = setup.pali_config.vit.image_size
    c = setup.pali_config.vit.num_channels
    batch['image'] = jnp.asarray(rng.uniform(-1, 1, (b, h, w, c)), jnp.float32)
  return batch


def run(spec: dict) -> dict:
  """Builds, compiles and times one configuration; returns the measurements (JSON-able)."""
  jax.devices()  # start the runtime: what every configuration pays before its own arrays
  rss_base = common.peak_rss_bytes()
  mspec, method = spec['model'], spec['method']
  cfg = setups.config(mspec['model'], method, dtype=spec.get('dtype', 'float32'))
  setup = model_builder.build(cfg)
  init_batch = setup.init_batch(1, 4, 4)
  boxed = jax.eval_shape(setup.init, jax.random.key(0), init_batch)
  shapes = nn.unbox(boxed)
  counts = peft.param_counts(shapes, setup.trainable)
  t0 = time.perf_counter()
  trainable, frozen = peft.split(common.random_params(shapes), setup.trainable)
  init_s = time.perf_counter() - t0

  optimizer, _ = optim.make_optimizer(dict(name='adamw', learning_rate=1e-4))
  opt_state = optimizer.init(trainable)
  batch = _batch(setup, mspec)
  step = jax.jit(peft.make_train_step(setup.model, optimizer, forward=setup.forward),
                 donate_argnums=(0, 1))

  t0 = time.perf_counter()
  lowered = step.lower(trainable, opt_state, frozen, batch, None)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = common.flops_of(compiled)
  memory = common.memory_of(compiled)

  state = [trainable, opt_state, None]

  def one_step():
    state[0], state[1], state[2] = compiled(state[0], state[1], frozen, batch, None)
    jax.block_until_ready(state)

  warm = common.timed(one_step, spec.get('warmup', 1))
  times = common.timed(one_step, spec['steps'])
  loss = float(state[2]['loss'])
  rss_peak = common.peak_rss_bytes()  # before the checkpoint write below
  device_mem = common.device_memory_stats()

  # The adapter checkpoint (safetensors + card). Full fine-tuning "checkpoint" = all params:
  # its size is the trainable bytes (writing ~1 GB per run would only time the disk).
  trainable_bytes = common.tree_bytes(state[0])
  if method == 'ft':
    ckpt_bytes, ckpt_kind = trainable_bytes, 'trainable params (not written)'
  else:
    with tempfile.TemporaryDirectory(prefix='adalink_bench_ckpt_') as tmp:
      path = os.path.join(tmp, f'{mspec["name"]}_{method}')
      peft.save_adapter(path, state[0], frozen,
                        setups.peft_block(method, mspec['model']['family']),
                        base_model=mspec['name'])
      ckpt_bytes = os.path.getsize(os.path.join(path, peft.artifacts.TENSORS))
    ckpt_kind = 'adapter.safetensors'

  med = common.median(times)
  tokens = mspec['batch'] * (_encoder_len(setup, mspec) + mspec['target_len'])
  return dict(
      kind='train', model=mspec['name'], method=method, backend=jax.default_backend(),
      device=str(jax.devices()[0].device_kind), dtype=spec.get('dtype', 'float32'),
      batch=mspec['batch'], text_len=mspec['text_len'], target_len=mspec['target_len'],
      encoder_len=_encoder_len(setup, mspec), tokens_per_step=tokens,
      params_total=counts['total'], params_trainable=counts['trainable'],
      trainable_fraction=counts['trainable_fraction'],
      init_s=init_s, lower_s=lower_s, compile_s=compile_s, warmup_s=warm,
      step_times_s=times, step_s=med, step_min_s=float(np.min(times)),
      tokens_per_s=tokens / med, flops=flops,
      flops_per_s=None if flops is None else flops / med,
      xla_memory=memory, device_memory=device_mem,
      rss_baseline_bytes=rss_base, rss_peak_bytes=rss_peak,
      rss_above_baseline_bytes=rss_peak - rss_base,
      opt_state_bytes=common.tree_bytes(state[1]), trainable_bytes=trainable_bytes,
      frozen_bytes=common.tree_bytes(frozen), checkpoint_bytes=ckpt_bytes,
      checkpoint_kind=ckpt_kind, final_loss=loss, finite=bool(np.isfinite(loss)))


def _encoder_len(setup, mspec: dict) -> int:
  """Encoder positions fed by the data: image tokens + text tokens (a soft prompt not counted)."""
  n_img = setup.pali_config.num_image_tokens if setup.pali_config is not None else 0
  return n_img + mspec['text_len']


if __name__ == '__main__':
  common.child_main(run)
