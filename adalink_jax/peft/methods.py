"""One config block picks the method; :func:`build` wires it into T5; params split by path.

``peft = dict(method='adalink'|'prompt'|'lora'|'adapter'|'ft', rank=64, ...)`` (fields of
:class:`PeftConfig`). ``build(peft, t5_config)`` returns the T5 config with the intrusive hooks
switched on (LoRA / bottleneck), the encoder/decoder input adapters (AdaLink / prompt) and the
predicate on ``'/'``-joined parameter paths that says what trains. Everything else is frozen.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adalink_jax.models import intrusive
from adalink_jax.models import layers
from adalink_jax.models import t5
from adalink_jax.peft import adalink as adalink_lib
from adalink_jax.peft import prompt as prompt_lib

METHODS = ('adalink', 'prompt', 'lora', 'adapter', 'ft')
LORA_TARGETS = ('query', 'key', 'value', 'out', 'wi', 'wo')
Predicate = Callable[[str], bool]


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Fields of the ``peft`` config block (only those of the chosen method are used)."""
  method: str = 'adalink'
  # AdaLink rank (int, or {'text': r, 'image': r}) and LoRA rank (int).
  rank: Union[int, Mapping[str, int]] = 64
  modalities: tuple[str, ...] = ('text', 'image')
  num_tasks: int = 1
  # With num_tasks > 1: the bank's tasks in bank order (task/benchmark names; index i is
  # bank_tasks[i]). Empty: the training data's tasks, ordered by global task id.
  bank_tasks: tuple[str, ...] = ()
  activation: str = 'identity'
  use_bias: bool = False
  decoder_inputs: bool = False      # AdaLink also on decoder token embeddings
  decoder_rank: Optional[int] = None  # defaults to the text rank
  prompt_length: int = 20
  prompt_init: str = 'uniform'      # 'uniform' | 'vocab' (needs embedding_table in build)
  prompt_init_range: float = 0.5
  prompt_vocab_first_n: Optional[int] = 5000
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ('query', 'key', 'value', 'out')
  adapter_dim: int = 64
  adapter_activation: str = 'relu'
  adapter_where: tuple[str, ...] = ('attention', 'mlp')
  # Extra path substrings to train on top of the method (e.g. ('layer_norm',)).
  also_train: tuple[str, ...] = ()

  def ranks(self) -> dict[str, int]:
    """AdaLink rank per modality."""
    if isinstance(self.rank, Mapping):
      missing = [m for m in self.modalities if m not in self.rank]
      if missing:
        raise ValueError(f'peft.rank has no entry for modalities {missing}: {dict(self.rank)}')
      return {m: int(self.rank[m]) for m in self.modalities}
    return {m: int(self.rank) for m in self.modalities}


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

  if cfg.method not in METHODS:
    bad('method', f'choose from {METHODS}')
  if cfg.method == 'adalink':
    if not cfg.modalities:
      bad('modalities', 'AdaLink needs at least one modality')
    for m in cfg.modalities:
      if m not in adalink_lib.MODALITY_IDS:
        bad('modalities',
            f'unknown modality {m!r}; choose from {sorted(adalink_lib.MODALITY_IDS)}')
    if any(r < 1 for r in cfg.ranks().values()):
      bad('rank', 'ranks must be >= 1')
    if cfg.activation not in layers.ACTIVATIONS:
      bad('activation', f'choose from {sorted(layers.ACTIVATIONS)}')
  if cfg.num_tasks < 1:
    bad('num_tasks', 'must be >= 1')
  _validate_bank(cfg, bad)
  if cfg.method == 'prompt':
    if cfg.prompt_length < 1:
      bad('prompt_length', 'must be >= 1')
    if cfg.prompt_init not in ('uniform', 'vocab'):
      bad('prompt_init', "choose 'uniform' or 'vocab'")
  if cfg.method == 'lora':
    if not isinstance(cfg.rank, int) or cfg.rank < 1:
      bad('rank', 'LoRA needs one integer rank >= 1')
    unknown = [t for t in cfg.lora_targets if t not in LORA_TARGETS]
    if unknown or not cfg.lora_targets:
      bad('lora_targets', f'choose a non-empty subset of {LORA_TARGETS}')
  if cfg.method == 'adapter':
    if cfg.adapter_dim < 1:
      bad('adapter_dim', 'must be >= 1')
    if not set(cfg.adapter_where) <= {'attention', 'mlp'} or not cfg.adapter_where:
      bad('adapter_where', "choose a non-empty subset of ('attention', 'mlp')")
    if cfg.adapter_activation not in intrusive._ACTS:
      bad('adapter_activation', f'choose from {sorted(intrusive._ACTS)}')
  if cfg.num_tasks > 1 and cfg.method not in ('adalink', 'prompt'):
    bad('num_tasks', f'per-task banks exist for adalink and prompt, not {cfg.method!r}')


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

_TRAINABLE_MARKERS = {
    'adalink': ('encoder_input_adapter', 'decoder_input_adapter'),
    'prompt': ('encoder_input_adapter',),
    'lora': ('/lora/',),
    'adapter': ('/attention_adapter/', '/mlp_adapter/'),
}


def trainable_predicate(peft_cfg: Union[PeftConfig, Mapping[str, Any]]) -> Predicate:
  """``'/'``-joined param path -> True if it trains under this method (everything for ``ft``)."""
  cfg = parse(peft_cfg)
  if cfg.method == 'ft':
    return lambda path: True
  markers = _TRAINABLE_MARKERS[cfg.method] + tuple(cfg.also_train)
  # Surround with '/' so '/lora/' matches a full path component anywhere, even at the ends.
  return lambda path: any(m in f'/{path}/' for m in markers)


class Built(NamedTuple):
  """What :func:`build` returns."""
  t5_config: t5.T5Config
  encoder_input_adapter: Optional[nn.Module]
  decoder_input_adapter: Optional[nn.Module]
  trainable: Predicate


def build(peft_cfg: Union[PeftConfig, Mapping[str, Any], None], t5_config: t5.T5Config, *,
          embedding_table: Any = None) -> Built:
  """``(peft, T5Config) -> (T5Config with hooks, encoder adapter, decoder adapter, predicate)``.

  embedding_table: ``[vocab, d]`` frozen embedding, needed only for ``prompt_init='vocab'``.
  Adapters compute in ``t5_config.dtype`` and keep fp32 weights whatever the base stores.
  """
  cfg = parse(peft_cfg)
  kw = dict(dtype=t5_config.dtype, param_dtype=jnp.float32)
  enc = dec = None
  model_cfg = t5_config.replace(lora=None, bottleneck=None)
  if cfg.method == 'adalink':
    ranks = cfg.ranks()
    enc = adalink_lib.AdaLink(tuple(ranks), tuple(ranks.values()), cfg.num_tasks,
                              cfg.activation, cfg.use_bias, **kw)
    if cfg.decoder_inputs:
      r = cfg.decoder_rank or ranks.get('text') or max(ranks.values())
      dec = adalink_lib.AdaLink(('text',), (r,), cfg.num_tasks, cfg.activation, cfg.use_bias,
                                **kw)
  elif cfg.method == 'prompt':
    init = None
    if cfg.prompt_init == 'vocab':
      if embedding_table is None:
        raise ValueError("peft.prompt_init='vocab' needs build(..., embedding_table=<[vocab, d]>)")
      init = prompt_lib.vocab_init(embedding_table, cfg.prompt_vocab_first_n)
    enc = prompt_lib.PromptTuning(cfg.prompt_length, cfg.num_tasks, cfg.prompt_init_range,
                                  init, **kw)
  elif cfg.method == 'lora':
    model_cfg = model_cfg.replace(lora=intrusive.LoRAConfig(
        rank=cfg.rank, alpha=float(cfg.lora_alpha), targets=tuple(cfg.lora_targets)))
  elif cfg.method == 'adapter':
    model_cfg = model_cfg.replace(bottleneck=intrusive.BottleneckConfig(
        dim=cfg.adapter_dim, activation=cfg.adapter_activation, where=tuple(cfg.adapter_where)))
  return Built(model_cfg, enc, dec, trainable_predicate(cfg))


# ------------------------------------------------------------------ split / merge


def _flat(params: Mapping) -> dict[str, Any]:
  return traverse_util.flatten_dict(nn.unbox(dict(params)) if params else {}, sep='/')


def split(params: Mapping, predicate: Predicate) -> tuple[dict, dict]:
  """params -> (trainable, frozen): two disjoint nested dicts holding only their own leaves."""
  flat = _flat(params)
  train = {k: v for k, v in flat.items() if predicate(k)}
  frozen = {k: v for k, v in flat.items() if not predicate(k)}
  return (traverse_util.unflatten_dict(train, sep='/'),
          traverse_util.unflatten_dict(frozen, sep='/'))


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  """Inverse of :func:`split`; a path present in both is an error."""
  a, b = _flat(trainable), _flat(frozen)
  both = sorted(set(a) & set(b))
  if both:
    raise ValueError(f'merge: paths in both trainable and frozen: {both[:5]}')
  return traverse_util.unflatten_dict({**b, **a}, sep='/')


def cast(tree: Mapping, dtype: Any) -> dict:
  """Casts every floating leaf (e.g. the frozen base to bf16 while adapters stay fp32)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, dict(tree))


# ------------------------------------------------------------------ parameter counts


def _group(path: str) -> str:
  parts = path.split('/')
  for i, p in enumerate(parts):
    if p in ('encoder_input_adapter', 'decoder_input_adapter'):
      return '/'.join(parts[i:i + 2])  # e.g. encoder_input_adapter/text
    if p == 'lora' and i > 0:
      return f'lora/{parts[i - 1]}'      # e.g. lora/query
    if p.endswith('_adapter'):
      return f'bottleneck/{p}'
  return parts[0]


def param_counts(params: Mapping, predicate: Predicate, num_tasks: int = 1) -> dict[str, Any]:
  """Counts (works on real arrays or ``jax.eval_shape`` structs; boxed or unboxed).

  Returns ``{'total', 'trainable', 'frozen', 'trainable_fraction', 'groups':
  {group: {'trainable': bool, 'params': n}}, 'per_task'}``. Groups: ``encoder_input_adapter/text``,
  ``encoder_input_adapter/image`` (per modality), ``lora/<proj>``, ``bottleneck/<where>_adapter``,
  or the top-level module (``token_embedder``, ``encoder``, ``decoder``). ``per_task`` is the
  trainable count of one task of a bank (``trainable / num_tasks``).
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
