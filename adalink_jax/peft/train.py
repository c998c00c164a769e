"""Loss and a train step that differentiates only the trainable params.

The step is a pure function ``(trainable, opt_state, frozen, batch, rng) -> (trainable,
opt_state, metrics)``: ``jax.grad`` sees only ``trainable``; ``frozen`` enters as a plain
argument (no gradient, no optimizer state, any dtype -- e.g. bf16 while adapters are fp32).
The trainer jits it (donating ``trainable``/``opt_state``) and adds sharding.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from adalink_jax.peft.methods import merge

Batch = Mapping[str, jax.Array]
PACKING_KEYS = ('encoder_segment_ids', 'encoder_positions', 'decoder_segment_ids',
                'decoder_positions')
ForwardFn = Callable[[Mapping, Batch, Optional[jax.Array]], jax.Array]


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        weights: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Weighted per-token mean cross-entropy.

  logits ``[b, t, vocab]``, targets ``[b, t]`` int, weights ``[b, t]`` (default: all ones).
  Returns ``(loss, total_weight)`` with ``loss = sum(w * ce) / sum(w)`` (0 if no weight), in fp32.
  """
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  w = jnp.ones_like(ce) if weights is None else weights.astype(jnp.float32)
  total = jnp.sum(w)
  return jnp.sum(ce * w) / jnp.maximum(total, 1e-8), total


def t5_forward(model) -> ForwardFn:
  """Forward for ``T5``: batch keys ``encoder_input_tokens``, ``decoder_input_tokens`` and
  optional ``image_embeddings [b, n, d]``, ``task_id [b]``; dropout on when ``rng`` is given."""

  def forward(params, batch, rng):
    rngs = {} if rng is None else {'dropout': rng}
    # Packed text batches (seqio pack=True) carry segment ids and positions.
    packing = {k: batch[k] for k in PACKING_KEYS if k in batch}
    return model.apply({'params': params}, batch['encoder_input_tokens'],
                       batch['decoder_input_tokens'],
                       image_embeddings=batch.get('image_embeddings'),
                       task_id=batch.get('task_id'), deterministic=rng is None, rngs=rngs,
                       **packing)

  return forward


def make_loss_fn(model=None, forward: Optional[ForwardFn] = None):
  """``loss_fn(trainable, frozen, batch, rng) -> (loss, aux)``; batch needs
  ``decoder_target_tokens`` and optionally ``decoder_loss_weights``."""
  if forward is None:
    if model is None:
      raise ValueError('make_loss_fn needs a model or a forward function')
    forward = t5_forward(model)

  def loss_fn(trainable, frozen, batch, rng):
    logits = forward(merge(trainable, frozen), batch, rng)
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights')
    loss, total = token_cross_entropy(logits, targets, weights)
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * w)
    return loss, dict(loss=loss, accuracy=correct / jnp.maximum(total, 1e-8), num_tokens=total)

  return loss_fn


def make_train_step(model, optimizer: optax.GradientTransformation, *,
                    forward: Optional[ForwardFn] = None, num_microbatches: int = 1):
  """Returns ``step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)``.

  Gradients are taken w.r.t. ``trainable`` only (``opt_state = optimizer.init(trainable)``);
  ``frozen`` is closed into the loss as an undifferentiated input. ``rng`` may be None (no
  dropout). ``forward(params, batch, rng) -> logits`` overrides the T5 call (e.g. for PaLI).

  ``num_microbatches > 1`` splits the batch along its first axis and accumulates gradients
  with a ``lax.scan`` (one microbatch's activations live at a time). Each microbatch's mean
  loss is re-weighted by its token count, so the update equals the full batch's up to fp32
  round-off: the loss is the token-weighted mean over the whole batch either way.
  """
  loss_fn = make_loss_fn(model, forward)

  def grads_and_metrics(trainable, frozen, batch, rng):
    grad_fn = jax.value_and_grad(lambda t: loss_fn(t, frozen, batch, rng), has_aux=True)
    (_, metrics), grads = grad_fn(trainable)
    return grads, metrics

  def accumulated(trainable, frozen, batch, rng):
    k = num_microbatches
    arrays = {n: v for n, v in batch.items() if hasattr(v, 'shape') and v.ndim}
    size = next(iter(arrays.values())).shape[0]
    if size % k:
      raise ValueError(f'batch of {size} does not split into num_microbatches={k}')
    micro = jax.tree.map(lambda x: x.reshape((k, size // k) + x.shape[1:]), arrays)

    def body(carry, xs):
      i, mb = xs
      g, m = grads_and_metrics(trainable, frozen, mb,
                               None if rng is None else jax.random.fold_in(rng, i))
      n = m['num_tokens']
      # Sums weighted by tokens; divided by the total once every microbatch is in.
      g = jax.tree.map(lambda a: a * n, g)
      acc_g, acc_loss, acc_correct, acc_n = carry
      return (jax.tree.map(jnp.add, acc_g, g), acc_loss + m['loss'] * n,
              acc_correct + m['accuracy'] * n, acc_n + n), None

    zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32), trainable)
    init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
    (g, loss, correct, n), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
    n = jnp.maximum(n, 1e-8)
    grads = jax.tree.map(lambda a, t: (a / n).astype(t.dtype), g, trainable)
    return grads, dict(loss=loss / n, accuracy=correct / n, num_tokens=n)

  def step(trainable, opt_state, frozen, batch, rng):
    if num_microbatches > 1:
      grads, metrics = accumulated(trainable, frozen, batch, rng)
    else:
      grads, metrics = grads_and_metrics(trainable, frozen, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    # Keep every trainable leaf in its own dtype (optax may promote a bf16 leaf to fp32).
    new = jax.tree.map(lambda n, o: n.astype(o.dtype), new, trainable)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return new, opt_state, metrics

  return step
