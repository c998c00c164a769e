"""Prompt tuning (Lester et al., 2021): a learned soft prompt prepended to the encoder input.

Where it applies: at the same seam as AdaLink. ``[image; text]`` becomes
``[prompt; image; text]``; the prompt positions get ``mask=True`` and modality
:data:`~adalink_jax.peft.adalink.PROMPT` (2), so ``T5.encode`` returns the longer mask and the
decoder's cross-attention sees the prompt. Relative position buckets make the shift harmless.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax.models import seam
from adalink_jax.models.axes import param
from adalink_jax.peft import registry
from adalink_jax.peft import task_bank
from adalink_jax.peft.adalink import PROMPT, seam_group

Dtype = Any
Initializer = Callable[..., jax.Array]


def vocab_init(table: Any, first_n: Optional[int] = None) -> Initializer:
  """Initializer that fills a ``[..., length, d]`` prompt with randomly sampled rows of ``table``.

  table: the (frozen) ``[vocab, d]`` token embedding; first_n: sample only from the first
  ``first_n`` rows (Lester et al. sample from the 5,000 most common tokens; in sentencepiece
  vocabularies low ids are the frequent ones).
  """
  table = np.asarray(table)
  n = table.shape[0] if first_n is None else min(first_n, table.shape[0])

  def init(key, shape, dtype=jnp.float32):
    if shape[-1] != table.shape[1]:
      raise ValueError(f'prompt width {shape[-1]} != embedding width {table.shape[1]}')
    rows = jax.random.randint(key, shape[:-1], 0, n)
    return jnp.take(jnp.asarray(table), rows, axis=0).astype(dtype)

  return init


class PromptTuning(nn.Module):
  """``EncoderInputs[b, l] -> EncoderInputs[b, length + l]`` with a learned prompt in front.

  Param ``prompt [length, d]`` (axes pos, embed), or ``[tasks, length, d]`` for a bank chosen
  per example by ``task_id`` (bank indices 0..num_tasks-1; others raise, under jit too). ``prompt_init`` defaults to uniform(-init_range, init_range);
  pass :func:`vocab_init` to start from vocabulary embeddings.
  """
  length: int
  num_tasks: int = 1
  init_range: float = 0.5
  prompt_init: Optional[Initializer] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: seam.EncoderInputs) -> seam.EncoderInputs:
    x = inputs.embeddings
    b, d = x.shape[0], x.shape[-1]
    init = self.prompt_init
    if init is None:
      r = self.init_range
      init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -r, r)
    if self.num_tasks == 1:
      prompt = param(self, 'prompt', init, (self.length, d), self.param_dtype, ('pos', 'embed'))
      prompt = jnp.broadcast_to(prompt[None], (b, self.length, d))
    else:
      prompt = param(self, 'prompt', init, (self.num_tasks, self.length, d), self.param_dtype,
                     ('tasks', 'pos', 'embed'))
      ids = task_bank.bank_indices(inputs.task_id, self.num_tasks, 'PromptTuning bank')
      prompt = task_bank.gather(prompt, ids)
    prompt = prompt.astype(self.dtype).astype(x.dtype)
    return inputs._replace(
        embeddings=jnp.concatenate([prompt, x], axis=1),
        mask=jnp.concatenate([jnp.ones((b, self.length), bool), inputs.mask], axis=1),
        modality=jnp.concatenate([jnp.full((b, self.length), PROMPT, jnp.int32),
                                  inputs.modality], axis=1))


# ------------------------------------------------------------------ the registered method


def _validate(cfg, bad) -> None:
  if cfg.prompt_length < 1:
    bad('prompt_length', 'must be >= 1')
  if cfg.prompt_init not in ('uniform', 'vocab'):
    bad('prompt_init', "choose 'uniform' or 'vocab'")


def _input_adapters(cfg, kw: dict, embedding_table: Any = None):
  # prompt_init='vocab' without a table (the trainer builds the model before it loads the
  # backbone): a uniform placeholder, replaced from the loaded table by _after_load.
  init = None
  if cfg.prompt_init == 'vocab' and embedding_table is not None:
    init = vocab_init(embedding_table, cfg.prompt_vocab_first_n)
  return PromptTuning(cfg.prompt_length, cfg.num_tasks, cfg.prompt_init_range, init, **kw), None


def _after_load(cfg, trainable: dict, embedding_table: Any, rng: jax.Array) -> dict:
  """``prompt_init='vocab'``: the prompt re-drawn from rows of the loaded token table."""
  if cfg.prompt_init != 'vocab':
    return trainable
  old = trainable['encoder_input_adapter']['prompt']
  new = vocab_init(embedding_table, cfg.prompt_vocab_first_n)(rng, old.shape, old.dtype)
  if hasattr(old, 'sharding'):
    new = jax.device_put(new, old.sharding)
  adapter = dict(trainable['encoder_input_adapter'], prompt=new)
  return dict(trainable, encoder_input_adapter=adapter)


METHOD = registry.Method(
    name='prompt',
    summary='prompt tuning: a learned soft prompt in front of the encoder input',
    fields=(('prompt_length', 20),
            ('prompt_init', 'uniform'),      # 'uniform' | 'vocab' (rows of the loaded table)
            ('prompt_init_range', 0.5), ('prompt_vocab_first_n', 5000)),
    validate=_validate,
    banks=True,
    input_adapters=_input_adapters,
    adds=('encoder_input_adapter',),
    group=seam_group,
    size_field='prompt_length',
    after_load=_after_load,
)
