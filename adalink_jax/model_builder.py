"""From the ``model`` and ``peft`` config blocks to a backbone family object.

``config.model.family`` names a family (:data:`adalink_jax.families.FAMILIES`: 't5', 'pali',
'gemma', 'paligemma'); the family reads the rest of the block (``name``, ``dtype``,
``frozen_dtype``, its own override sub-blocks). What a family object offers is
:class:`adalink_jax.families.base.BaseModel`.
"""
from __future__ import annotations

from typing import Any

from adalink_jax import families
from adalink_jax.families.base import BaseModel

Setup = BaseModel  # the name the trainer and benchmarks use for "a model ready to train"


def build(config: Any) -> BaseModel:
  """``config.model`` + ``config.peft`` -> the family's model object."""
  return families.build(config)
