"""One config block picks the method; :func:`build` wires it into a model; params split by path.

``peft = dict(method=<one of registry.names()>, rank=64, ...)`` (fields of :class:`PeftConfig`:
the shared ones below plus every registered method's own). Each method is one object in
:mod:`adalink_jax.peft.registry` (its module: ``peft/adalink.py``, ``peft/lora.py`` ...); this
module is the public API over them. ``build(peft, model_config)`` returns the model config with
the method's intrusive hooks, the encoder/decoder input adapters and the predicate on
``'/'``-joined parameter paths that says what trains. Everything else is frozen.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax.models import intrusive
from adalink_jax.peft import adalink as adalink_lib
from adalink_jax.checkpoints import common  # the package's one flatten / unflatten
from adalink_jax.peft import registry

METHODS = registry.names()
Predicate = Callable[[str], bool]

# Fields every method has (each method adds its own, see registry.Method.fields).
_SHARED_FIELDS = (
    ('method', 'adalink'),
    # AdaLink rank (int, or {'text': r, 'image': r}) and LoRA rank (int).
    ('rank', 64),
    ('num_tasks', 1),
    # With num_tasks > 1: the bank's tasks in bank order (task/benchmark names; index i is
    # bank_tasks[i]). Empty: the training data's tasks, ordered by global task id.
    ('bank_tasks', ()),
    # Extra path substrings to train on top of the method (e.g. ('layer_norm',)).
    ('also_train', ()),
    # Path substrings that stay frozen whatever the method says (e.g. ('embedder',): full
    # fine-tuning without the 262k-row embedding table, whose optimizer state dwarfs the rest).
    ('also_freeze', ()),
)


def _config_class() -> type:
  """``PeftConfig``: a frozen dataclass of the shared fields and every method's fields."""
  fields: dict[str, tuple[Any, str]] = {k: (v, 'shared') for k, v in _SHARED_FIELDS}
  for m in registry.methods():
    for k, v in m.fields:
      if k in fields and fields[k][0] != v:
        raise ValueError(f'peft field {k!r}: method {m.name!r} gives default {v!r}, '
                         f'{fields[k][1]!r} gives {fields[k][0]!r}; rename one of them')
      fields.setdefault(k, (v, m.name))
  registry.freeze_fields(fields)
  cls = dataclasses.make_dataclass(
      'PeftConfig', [(k, Any, dataclasses.field(default=v)) for k, (v, _) in fields.items()],
      frozen=True, namespace={'ranks': adalink_lib.ranks, '__module__': __name__,
                              '__doc__': 'Fields of the ``peft`` config block (only those of '
                                         'the chosen method are used); ``ranks()``: AdaLink '
                                         'rank per modality.'})
  return cls


PeftConfig = _config_class()


def parse(peft_cfg: Union[PeftConfig, Mapping[str, Any], None]) -> PeftConfig:
  """Dict (or PeftConfig) -> validated :class:`PeftConfig`; unknown keys/values name the field."""
  if peft_cfg is None:
    peft_cfg = {}
  if isinstance(peft_cfg, PeftConfig):
    cfg = peft_cfg
  else:
    fields = {f.name for f in dataclasses.fields(PeftConfig)}
    unknown = sorted(set(peft_cfg) - fields)
    if unknown:
      raise ValueError(f'unknown peft field(s) {unknown}; known fields: {sorted(fields)}')
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in peft_cfg.items()}
    cfg = PeftConfig(**kw)
  _validate(cfg)
  return cfg


def _validate(cfg: PeftConfig) -> None:
  def bad(field, msg):
    raise ValueError(f'peft.{field}={getattr(cfg, field)!r}: {msg}')

  if cfg.method not in registry.names():
    bad('method', f'unknown method; registered methods: {registry.names()}')
  method = registry.get(cfg.method)
  if cfg.num_tasks < 1:
    bad('num_tasks', 'must be >= 1')
  _validate_bank(cfg, bad)
  method.validate(cfg, bad)
  if cfg.num_tasks > 1 and not method.banks:
    banked = tuple(m.name for m in registry.methods() if m.banks)
    bad('num_tasks', f'per-task banks exist for {" and ".join(banked)}, not {cfg.method!r}')


def _validate_bank(cfg: PeftConfig, bad: Callable[[str, str], None]) -> None:
  """bank_tasks: strings, no repeats, one per adapter of the bank (or empty: derived)."""
  names = cfg.bank_tasks
  if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
    bad('bank_tasks', 'give a tuple of task names, e.g. (\'vqav2\', \'okvqa\')')
  if names and len(names) != cfg.num_tasks:
    bad('bank_tasks', f'lists {len(names)} tasks but peft.num_tasks={cfg.num_tasks}; '
        'give one name per adapter of the bank')
  if len(set(names)) != len(names):
    bad('bank_tasks', 'names a task twice; each task gets one adapter of the bank')


# ------------------------------------------------------------------ what trains


def trainable_predicate(peft_cfg: Union[PeftConfig, Mapping[str, Any]]) -> Predicate:
  """``'/'``-joined param path -> True if it trains under this method (everything for ``ft``)."""
  cfg = parse(peft_cfg)
  method = registry.get(cfg.method)
  freeze = tuple(cfg.also_freeze)
  if method.trains_all:
    return lambda path: not registry.markers_match(freeze, path)
  markers = tuple(method.adds) + tuple(method.trains) + tuple(cfg.also_train)
  return lambda path: (registry.markers_match(markers, path)
                       and not registry.markers_match(freeze, path))


class Built(NamedTuple):
  """What :func:`build` returns."""
  model_config: Any  # the backbone's config with the method's hooks (T5Config, GemmaConfig ...)
  encoder_input_adapter: Optional[nn.Module]
  decoder_input_adapter: Optional[nn.Module]
  trainable: Predicate


def build(peft_cfg: Union[PeftConfig, Mapping[str, Any], None], model_config: Any, *,
          embedding_table: Any = None) -> Built:
  """``(peft, model config) -> (config with hooks, encoder adapter, decoder adapter, predicate)``.

  model_config: any frozen dataclass config with ``dtype`` and ``hooks`` fields (T5, Gemma).
  embedding_table: ``[vocab, d]`` frozen embedding, needed only for ``prompt_init='vocab'``.
  Adapters compute in ``model_config.dtype`` and keep fp32 weights whatever the base stores.
  """
  cfg = parse(peft_cfg)
  method = registry.get(cfg.method)
  enc = dec = None
  if method.input_adapters is not None:
    kw = dict(dtype=model_config.dtype, param_dtype=jnp.float32)
    enc, dec = method.input_adapters(cfg, kw, embedding_table)
  hooks = intrusive.check(tuple(method.hooks(cfg))) if method.hooks is not None else ()
  model_cfg = dataclasses.replace(model_config, hooks=hooks)
  return Built(model_cfg, enc, dec, trainable_predicate(cfg))


# ------------------------------------------------------------------ split / merge


def _flat(params: Mapping) -> dict[str, Any]:
  return common.flatten(nn.unbox(dict(params)) if params else {})


def split(params: Mapping, predicate: Predicate) -> tuple[dict, dict]:
  """params -> (trainable, frozen): two disjoint nested dicts holding only their own leaves."""
  flat = _flat(params)
  train = {k: v for k, v in flat.items() if predicate(k)}
  frozen = {k: v for k, v in flat.items() if not predicate(k)}
  return common.unflatten(train), common.unflatten(frozen)


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  """Inverse of :func:`split`; a path present in both is an error."""
  a, b = _flat(trainable), _flat(frozen)
  both = sorted(set(a) & set(b))
  if both:
    raise ValueError(f'merge: paths in both trainable and frozen: {both[:5]}')
  return common.unflatten({**b, **a})


def cast(tree: Mapping, dtype: Any) -> dict:
  """Casts every floating leaf (e.g. the frozen base to bf16 while adapters stay fp32)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, dict(tree))


# ------------------------------------------------------------------ parameter counts


def _group(path: str) -> str:
  parts = path.split('/')
  for m in registry.methods():
    g = m.group(parts) if m.group is not None else None
    if g is not None:
      return g
  return parts[0]


def param_counts(params: Mapping, predicate: Predicate, num_tasks: int = 1) -> dict[str, Any]:
  """Counts (works on real arrays or ``jax.eval_shape`` structs; boxed or unboxed).

  Returns ``{'total', 'trainable', 'frozen', 'trainable_fraction', 'groups':
  {group: {'trainable': bool, 'params': n}}, 'per_task'}``. Groups: a method's own (its
  ``registry.Method.group``: ``encoder_input_adapter/text`` per modality, ``lora/<proj>``,
  ``bottleneck/<where>_adapter``, ``ia3/<site module>``), or the top-level module
  (``token_embedder``, ``encoder``, ``decoder``). ``per_task`` is the trainable count of one
  task of a bank (``trainable / num_tasks``).
  """
  groups: dict[str, dict[str, Any]] = {}
  trainable = frozen = 0
  for path, leaf in _flat(params).items():
    n = int(np.prod(leaf.shape))
    t = bool(predicate(path))
    key = _group(path)
    g = groups.setdefault(key, {'trainable': t, 'params': 0})
    if g['trainable'] != t:  # e.g. 'also_train' picked part of a module: keep groups pure
      key = f'{key} ({"trainable" if t else "frozen"})'
      g = groups.setdefault(key, {'trainable': t, 'params': 0})
    g['params'] += n
    trainable, frozen = trainable + n * t, frozen + n * (not t)
  total = trainable + frozen
  return dict(total=total, trainable=trainable, frozen=frozen,
              trainable_fraction=trainable / max(total, 1), groups=groups,
              num_tasks=num_tasks, per_task=trainable // max(num_tasks, 1))


def param_table(counts: Mapping[str, Any]) -> str:
  """Pretty table of :func:`param_counts` (what the trainer's dry run prints)."""
  rows = sorted(counts['groups'].items(), key=lambda kv: (not kv[1]['trainable'], kv[0]))
  width = max([len(k) for k in counts['groups']] + [len('frozen total')])
  line = lambda name, kind, n: f'{name:<{width}}  {kind:<9}  {n:>16}'
  out = [line('group', 'status', 'params'), '-' * (width + 29)]
  out += [line(k, 'trainable' if g['trainable'] else 'frozen', f'{g["params"]:,}')
          for k, g in rows]
  out += ['-' * (width + 29),
          line('trainable total', '', f'{counts["trainable"]:,}'),
          line('frozen total', '', f'{counts["frozen"]:,}'),
          line('total', '', f'{counts["total"]:,}'),
          f'trainable fraction: {100 * counts["trainable_fraction"]:.6f}%']
  if counts.get('num_tasks', 1) > 1:
    out.append(line(f'per task (of {counts["num_tasks"]})', '', f'{counts["per_task"]:,}'))
  return '\n'.join(out)
