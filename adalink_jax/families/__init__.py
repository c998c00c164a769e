"""Backbone families behind one interface (:class:`base.BaseModel`); ``config.model.family``
names one. Adding a family: one module here with a :class:`base.BaseModel` subclass, one line
in :data:`FAMILIES`, its reader(s) under ``adalink_jax/checkpoints/`` and its tests."""
from __future__ import annotations

import importlib
from typing import Any

# family name -> 'module:class' (imported on use: a T5 run never imports the Gemma code).
FAMILIES = {
    't5': 'adalink_jax.families.t5:T5Model',
    'pali': 'adalink_jax.families.pali:PaLIModel',
    'gemma': 'adalink_jax.families.gemma:GemmaModel',
    'paligemma': 'adalink_jax.families.paligemma:PaliGemmaModel',
}


def get(name: str) -> Any:
  """``'gemma'`` -> the family class, with an error naming the known ones."""
  if name not in FAMILIES:
    raise ValueError(f'config.model.family={name!r}; choose from {sorted(FAMILIES)}')
  module, cls = FAMILIES[name].split(':')
  return getattr(importlib.import_module(module), cls)


def build(config: Any) -> Any:
  """``config.model`` + ``config.peft`` -> the family's model object (a :class:`BaseModel`)."""
  return get(config.model.get('family', 't5'))(config)

