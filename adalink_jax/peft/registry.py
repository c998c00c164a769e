"""The PEFT methods: one :class:`Method` object per method, found here by name.

A method lives in its own module under ``adalink_jax/peft/`` (``adalink.py``, ``lora.py``,
``ia3.py`` ...) as ``METHOD = registry.Method(...)``: its config fields and their checks, how it
changes the model (input adapters at the embedding seam and/or intrusive hooks, see
:mod:`adalink_jax.models.intrusive`), which parameters it adds and trains, its adapter-card
fields and whether it folds. Everything else -- ``peft.methods`` (parse / build / split /
counts), ``config_lib``, backbone loading, export, the benchmarks -- asks this module.

Adding a method: write its module and add one line to :data:`BUILTIN`. :func:`register` adds one
at run time (e.g. from a user's package). This module imports nothing heavy: :func:`names` is
cheap (config files use it); a method's module is imported on first :func:`get`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Sequence

# name -> module holding ``METHOD``. Order: how methods are listed (errors, docs, benchmarks).
BUILTIN: dict[str, str] = {
    'adalink': 'adalink_jax.peft.adalink',
    'prompt': 'adalink_jax.peft.prompt',
    'lora': 'adalink_jax.peft.lora',
    'adapter': 'adalink_jax.peft.bottleneck',
    'ft': 'adalink_jax.peft.ft',
    'ia3': 'adalink_jax.peft.ia3',
}

Bad = Callable[[str, str], None]  # bad(field, message) raises ValueError naming peft.<field>


def _no_checks(cfg: Any, bad: Bad) -> None:
  del cfg, bad


def _no_card(cfg: Any) -> dict:
  del cfg
  return {}


@dataclasses.dataclass(frozen=True)
class Method:
  """One PEFT method. ``cfg`` below is the parsed ``PeftConfig`` (all methods' fields).

  name: the ``peft.method`` value.
  fields: ``(field, default)`` pairs this method adds to the ``peft`` block.
  validate: ``(cfg, bad)`` raises through ``bad(field, message)`` on a wrong value.
  banks: supports ``num_tasks > 1`` (one adapter per task, picked by ``task_id``).
  input_adapters: ``(cfg, kw, embedding_table) -> (encoder adapter, decoder adapter)`` flax
    modules at the embedding seam (None: none); ``kw`` holds ``dtype`` / ``param_dtype``.
  hooks: ``cfg -> ((site, hook), ...)`` intrusive hooks (``models.intrusive``; None: none).
  adds: path markers of the parameters the method adds (substrings of ``'/' + path + '/'``):
    they train, and no backbone checkpoint holds them (loaders skip them).
  trains: markers of *existing* backbone parameters that also train.
  trains_all: every parameter trains (full fine-tuning).
  group: ``path components -> group name`` for the parameter table, or None if not its own.
  card: ``cfg -> dict`` of adapter-card fields (``ranks``, ``modalities`` ...).
  size_field: the field that sizes it in a sweep's labels (``adalink r=16``), or None.
  fold: ``cfg -> (merged params, bank index or None) -> {tensor name: array}``, the adapter
    folded into base weights; ``fold(cfg)`` raises ValueError when this config cannot fold.
    None: the method has no folded form.
  after_load: ``(cfg, trainable, embedding_table, rng) -> trainable``, run by the trainer once
    the backbone is loaded (e.g. a prompt initialised from the *loaded* token table), or None.
  """
  name: str
  summary: str
  fields: tuple[tuple[str, Any], ...] = ()
  validate: Callable[[Any, Bad], None] = _no_checks
  banks: bool = False
  input_adapters: Optional[Callable[..., tuple[Any, Any]]] = None
  hooks: Optional[Callable[[Any], tuple]] = None
  adds: tuple[str, ...] = ()
  trains: tuple[str, ...] = ()
  trains_all: bool = False
  group: Optional[Callable[[Sequence[str]], Optional[str]]] = None
  card: Callable[[Any], dict] = _no_card
  size_field: Optional[str] = None
  fold: Optional[Callable[[Any], Callable[[Mapping, Optional[int]], dict]]] = None
  after_load: Optional[Callable[[Any, dict, Any, Any], dict]] = None


_REGISTERED: dict[str, Method] = {}  # methods loaded from BUILTIN or given to register()
_EXTRA_NAMES: list[str] = []          # register() order of methods not in BUILTIN


def names() -> tuple[str, ...]:
  """Every method name: :data:`BUILTIN` in order, then registered ones. Imports nothing."""
  return tuple(BUILTIN) + tuple(_EXTRA_NAMES)


def _unknown(name: Any) -> ValueError:
  return ValueError(f'unknown peft method {name!r}; registered methods: {names()} '
                    '(add one with adalink_jax.peft.registry.register)')


def get(name: str) -> Method:
  """The method called ``name``; ValueError naming the registered ones otherwise."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in BUILTIN:
    raise _unknown(name)
  method = importlib.import_module(BUILTIN[name]).METHOD
  if method.name != name:
    raise ValueError(f'{BUILTIN[name]}.METHOD is named {method.name!r}, registered as {name!r}')
  _REGISTERED[name] = method
  return method


def methods() -> tuple[Method, ...]:
  """Every method object, in :func:`names` order (imports the built-in modules)."""
  return tuple(get(n) for n in names())


def check(wanted: Sequence[str], where: str) -> tuple[str, ...]:
  """``wanted`` as a tuple if every name is registered; else ValueError naming ``where``."""
  unknown = [n for n in wanted if n not in names()]
  if unknown:
    raise ValueError(f'{where}: unknown peft method(s) {unknown}; registered: {names()}')
  return tuple(wanted)


_frozen_fields: Optional[frozenset] = None  # set once PeftConfig is built (see freeze_fields)


def freeze_fields(field_names: Sequence[str]) -> None:
  """Called by ``peft.methods`` when it builds ``PeftConfig`` from every method's fields."""
  global _frozen_fields
  _frozen_fields = frozenset(field_names)


def register(method: Method) -> Method:
  """Adds (or replaces) a method; returns it. Its config fields must already exist once
  ``PeftConfig`` is built (importing ``adalink_jax.peft.methods``): new fields need the method's
  module in :data:`BUILTIN`."""
  if not isinstance(method, Method):
    raise TypeError(f'register() takes a registry.Method, got {type(method).__name__}')
  new = sorted({f for f, _ in method.fields} - (_frozen_fields or frozenset()))
  if _frozen_fields is not None and new:
    raise ValueError(f'peft method {method.name!r} declares config field(s) {new} that '
                     'PeftConfig (already built) does not have; list its module in '
                     'adalink_jax.peft.registry.BUILTIN instead of registering it at run time')
  if method.name not in BUILTIN and method.name not in _EXTRA_NAMES:
    _EXTRA_NAMES.append(method.name)
  _REGISTERED[method.name] = method
  return method


def unregister(name: str) -> None:
  """Removes a method added with :func:`register` (built-in ones are reloaded on next get)."""
  _REGISTERED.pop(name, None)
  if name in _EXTRA_NAMES:
    _EXTRA_NAMES.remove(name)


def markers_match(markers: Sequence[str], path: str) -> bool:
  """True if a marker occurs in ``'/' + path + '/'`` (so ``'/lora/'`` matches a whole component,
  even first or last)."""
  p = f'/{path}/'
  return any(m in p for m in markers)


def is_added_path(path: str) -> bool:
  """True for a parameter some method adds (never in a backbone checkpoint)."""
  return any(markers_match(m.adds, path) for m in methods())
