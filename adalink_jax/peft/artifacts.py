"""Adapter artifacts: the trained params alone (safetensors) + a JSON card. No pickle.

A directory holds ``adapter.safetensors`` (tensor names are ``'/'``-joined param paths) and
``adapter_card.json`` (method, ranks, modalities, tasks -- ``bank_tasks``: the task of each
adapter of a bank, in bank order --, base model name, the base weights' hash and shapes).
:func:`load_adapter` refuses a base whose hash or shapes differ unless ``force=True``, and says
exactly what differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.flax import load_file, save_file

from adalink_jax.checkpoints import common
from adalink_jax.checkpoints import fingerprint
from adalink_jax.peft import methods
from adalink_jax.peft import registry

FORMAT = 'adalink_jax.adapter/v1'
TENSORS, CARD = 'adapter.safetensors', 'adapter_card.json'


def _flat(tree: Mapping) -> dict[str, Any]:
  return methods._flat(tree)


HASH_KIND = 'fingerprint/v1'  # cards without 'base_hash_kind' hold legacy_base_hash


def base_hash(frozen: Mapping) -> str:
  """Content hash of the frozen params, computed where they live: the same on any mesh and
  any number of processes, with no host copy (see :mod:`adalink_jax.checkpoints.fingerprint`).
  Dtype is part of the hash: a bf16 copy of a base is a different base."""
  return fingerprint.fingerprint(frozen)


def legacy_base_hash(frozen: Mapping) -> str:
  """The sha256 of gathered values that checkpoints and cards recorded before ``HASH_KIND``;
  kept to check those against a base (needs every array addressable by this process)."""
  h = hashlib.sha256()
  for name, leaf in sorted(_flat(frozen).items()):
    a = np.asarray(jax.device_get(leaf))
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder('<')))
    h.update(f'{name}|{a.dtype.name}|{list(a.shape)}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def base_shapes(frozen: Mapping) -> dict[str, list]:
  """``{path: [shape, dtype]}`` of the frozen params (stored in the card for diagnostics)."""
  return {k: [list(v.shape), np.dtype(v.dtype).name] for k, v in sorted(_flat(frozen).items())}


def _bank_tasks(cfg: methods.PeftConfig, bank_tasks: Optional[Sequence[str]]) -> tuple:
  """The card's task names, bank order; a bank without them would be unusable by name."""
  names = tuple(cfg.bank_tasks if bank_tasks is None else bank_tasks)
  if cfg.num_tasks > 1 and len(names) != cfg.num_tasks:
    raise ValueError(f'save_adapter: a bank of num_tasks={cfg.num_tasks} needs one task name per '
                     f'adapter, got bank_tasks={names}; pass bank_tasks= or set peft.bank_tasks')
  return names


def save_adapter(directory: str, trainable: Mapping, frozen: Mapping, peft_cfg: Any,
                 base_model: str, extra: Optional[Mapping[str, Any]] = None,
                 bank_tasks: Optional[Sequence[str]] = None) -> dict:
  """Writes ``<directory>/adapter.safetensors`` + ``adapter_card.json``; returns the card.

  bank_tasks: the bank's task names in bank order (default ``peft.bank_tasks``); required for
  ``num_tasks > 1``, recorded as the card's ``bank_tasks``.
  """
  cfg = methods.parse(peft_cfg)
  names = _bank_tasks(cfg, bank_tasks)
  cfg = methods.parse(dataclasses.replace(cfg, bank_tasks=names))
  flat = {k: jnp.asarray(v) for k, v in _flat(trainable).items()}
  if not flat:
    raise ValueError('save_adapter: no trainable params to save')
  os.makedirs(directory, exist_ok=True)
  save_file(flat, os.path.join(directory, TENSORS), metadata={'format': FORMAT})
  counts = methods.param_counts(trainable, lambda _: True, cfg.num_tasks)
  card = dict(
      format=FORMAT, method=cfg.method, base_model=base_model,
      base_hash=base_hash(frozen), base_hash_kind=HASH_KIND, base_shapes=base_shapes(frozen),
      # ranks / modalities: empty unless the method fills them (with its own card fields).
      **{'ranks': {}, 'modalities': [], **registry.get(cfg.method).card(cfg)},
      num_tasks=cfg.num_tasks, bank_tasks=list(names), num_params=counts['trainable'],
      tensors={k: [list(v.shape), np.dtype(v.dtype).name] for k, v in sorted(flat.items())},
      peft=_jsonable(dataclasses.asdict(cfg)), extra=_jsonable(dict(extra or {})))
  with open(os.path.join(directory, CARD), 'w') as f:
    json.dump(card, f, indent=2, sort_keys=True)
  return card


def read_card(directory: str) -> dict:
  """Reads and checks ``adapter_card.json``."""
  path = os.path.join(directory, CARD)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no adapter card at {path}')
  with open(path) as f:
    card = json.load(f)
  if card.get('format') != FORMAT:
    raise ValueError(f'{path}: format {card.get("format")!r}, expected {FORMAT!r}')
  return card


def load_adapter(directory: str, frozen: Mapping, *, template: Optional[Mapping] = None,
                 force: bool = False) -> tuple[dict, dict]:
  """Loads adapter params for the base ``frozen``; returns ``(trainable, card)``.

  Refuses (ValueError naming the differing params/shapes or the two hashes) when the base
  differs from the one the adapter was trained on, unless ``force=True``. ``template``
  (e.g. freshly initialised trainable params) additionally checks adapter names and shapes.
  """
  card = read_card(directory)
  problems = _base_diff(card, frozen)
  if problems and not force:
    raise ValueError(f'adapter {directory} was trained on base {card["base_model"]!r} and does '
                     'not match the given base (pass force=True to load anyway):\n  ' +
                     '\n  '.join(problems))
  flat = load_file(os.path.join(directory, TENSORS))
  if template is not None:
    want = {k: list(v.shape) for k, v in _flat(template).items()}
    got = {k: list(v.shape) for k, v in flat.items()}
    diff = [f'{k}: file {got.get(k)} vs model {want.get(k)}'
            for k in sorted(set(want) | set(got)) if got.get(k) != want.get(k)]
    if diff:
      raise ValueError(f'adapter {directory} does not fit the model:\n  ' + '\n  '.join(diff))
  return common.unflatten(dict(flat)), card


def _base_diff(card: Mapping, frozen: Mapping) -> list[str]:
  """Human-readable differences between the card's base and ``frozen`` (empty if identical)."""
  have, want = base_shapes(frozen), card['base_shapes']
  out = [f'missing in given base: {k} {want[k]}' for k in sorted(set(want) - set(have))]
  out += [f'not in adapter\'s base: {k} {have[k]}' for k in sorted(set(have) - set(want))]
  out += [f'{k}: adapter\'s base {want[k]} vs given {have[k]}'
          for k in sorted(set(have) & set(want)) if have[k] != want[k]]
  if not out:
    got = (base_hash if card.get('base_hash_kind') == HASH_KIND else legacy_base_hash)(frozen)
    if got != card['base_hash']:
      out.append(f'same names and shapes but different weights: base hash '
                 f'{card["base_hash"][:16]}... (adapter) vs {got[:16]}... (given)')
  return out


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)
