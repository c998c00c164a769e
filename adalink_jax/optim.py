"""Optimizers and learning-rate schedules from a config block (optax).

``config.optimizer = dict(name='adafactor'|'adamw', learning_rate=..., schedule='constant'|
'warmup_cosine'|'rsqrt', warmup_steps=..., weight_decay=..., grad_clip_norm=...)``.
Adafactor with factored second moments is the T5X default.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import optax

_KNOWN = {'name', 'learning_rate', 'schedule', 'warmup_steps', 'total_steps', 'end_value',
          'weight_decay', 'grad_clip_norm', 'b1', 'b2', 'eps', 'decay_rate', 'momentum'}


def _check(cfg: Mapping[str, Any]):
  unknown = set(cfg) - _KNOWN
  if unknown:
    raise ValueError(f'config.optimizer: unknown field(s) {sorted(unknown)}; known: {sorted(_KNOWN)}')


def make_schedule(cfg: Mapping[str, Any]) -> optax.Schedule:
  """constant | warmup_cosine (to ``end_value``) | rsqrt (``lr / sqrt(max(step, warmup))``, T5 style)."""
  lr = float(cfg.get('learning_rate', 1e-3))
  kind = cfg.get('schedule', 'constant')
  warmup = int(cfg.get('warmup_steps', 0))
  if kind == 'constant':
    if not warmup:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  if kind == 'warmup_cosine':
    total = int(cfg.get('total_steps', 0))
    if total <= warmup:
      raise ValueError(f'warmup_cosine needs optimizer.total_steps > warmup_steps, got {total}')
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), total,
                                              float(cfg.get('end_value', 0.0)))
  if kind == 'rsqrt':
    w = float(max(warmup, 1))

    def rsqrt(step):
      return lr * jnp.sqrt(w / jnp.maximum(jnp.asarray(step, jnp.float32) + 1.0, w))
    return rsqrt
  raise ValueError(f'config.optimizer.schedule={kind!r}; choose constant, warmup_cosine, rsqrt')


def make_optimizer(cfg: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optax chain (optional global-norm clip, then the optimizer) and its schedule."""
  cfg = dict(cfg)
  _check(cfg)
  schedule = make_schedule(cfg)
  name = cfg.get('name', 'adafactor')
  if name == 'adafactor':
    opt = optax.adafactor(schedule, decay_rate=float(cfg.get('decay_rate', 0.8)),
                          weight_decay_rate=cfg.get('weight_decay') or None,
                          momentum=cfg.get('momentum'))
  elif name == 'adamw':
    opt = optax.adamw(schedule, b1=float(cfg.get('b1', 0.9)), b2=float(cfg.get('b2', 0.999)),
                      eps=float(cfg.get('eps', 1e-8)),
                      weight_decay=float(cfg.get('weight_decay', 0.0)))
  elif name == 'sgd':
    opt = optax.sgd(schedule, momentum=cfg.get('momentum'))
  else:
    raise ValueError(f'config.optimizer.name={name!r}; choose adafactor, adamw, sgd')
  parts = []
  if cfg.get('grad_clip_norm'):
    parts.append(optax.clip_by_global_norm(float(cfg['grad_clip_norm'])))
  parts.append(opt)
  return optax.chain(*parts), schedule
