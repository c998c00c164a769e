"""The interface every backbone family implements (t5x's ``BaseModel`` / ``EncoderDecoderModel``
/ ``DecoderOnlyModel``; big_vision's model module with its own ``load()``).

A family object is built from the ``model`` and ``peft`` config blocks and holds the flax
module (with the method's seam adapters and hooks), the predicate of what trains, and:

* ``init_batch`` / ``init``: shapes for ``init`` and ``eval_shape``;
* ``forward(params, batch, rng) -> logits [b, target_len, vocab]``, aligned with the batch's
  ``decoder_target_tokens`` (the loss is the same for every family);
* ``prefix(params, batch, room)``: the prompt (and image) run once -- encoded, or prefilled
  into a cache with ``room`` slots -- for ``decoder`` and ``score_candidates`` to share;
* ``decoder(params, batch, max_decode_len, repeat, prefix)``: a cached step over the prefix
  (:class:`adalink_jax.decoding.Decoder`); ``generate`` runs greedy, sampling or beam search
  on it;
* ``score_targets`` / ``score_candidates``: teacher-forced scores for rank classification
  (the latter runs the prefix once for all candidates where the family can);
  ``generate_and_score`` both on one run of the prefix (what evaluation calls);
* special ids (``pad_id``, ``eos_id``, ``decoder_start_id``), ``vocab_size``, where the token
  table lives (``embedding_path``, for folding and prompt-tuning init);
* ``init_towers``: the ``config.init`` keys ``load`` fills, and ``load`` itself.

Batches are the encoder-decoder layout for every family: ``encoder_input_tokens`` (prompt),
``decoder_input_tokens``, ``decoder_target_tokens``, ``decoder_loss_weights``, optional
``image`` and ``task_id``.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adalink_jax import decoding

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype(name: str) -> Any:
  """'bfloat16' -> jnp.bfloat16 with an error naming the choices."""
  if name not in DTYPES:
    raise ValueError(f'unknown dtype {name!r}; choose from {sorted(DTYPES)}')
  return DTYPES[name]


def overrides(block: Any) -> dict:
  """A config sub-block (ConfigDict, dict or None) -> a plain dict of overrides."""
  return dict(block) if block else {}


class BaseModel:
  """One backbone family: build, init, forward, decode, load (see the module docstring)."""
  family: ClassVar[str] = ''
  init_towers: ClassVar[tuple[str, ...]] = ()
  embedding_path: ClassVar[tuple[str, ...]] = ()

  model: nn.Module
  model_config: Any
  trainable: Callable[[str], bool]

  def __init__(self, config: Any):
    m = config.model
    self.config = config
    self.activation_dtype = dtype(m.get('dtype', 'float32'))
    self.frozen_dtype = dtype(m.get('frozen_dtype', 'float32'))
    self.peft_config = dict(config.get('peft') or {})
    self.build(m)

  # ---------------------------------------------------------------- what a family defines

  def build(self, model_block: Any) -> None:
    """Sets ``self.model``, ``self.model_config`` and ``self.trainable``."""
    raise NotImplementedError

  def init_batch(self, batch_size: int, text_len: int, target_len: int) -> dict:
    """Zeros with the shapes of a batch, for ``init`` and ``eval_shape``."""
    b = dict(encoder_input_tokens=jnp.zeros((batch_size, text_len), jnp.int32),
             decoder_input_tokens=jnp.zeros((batch_size, target_len), jnp.int32),
             task_id=jnp.zeros((batch_size,), jnp.int32))
    image = self.image_shape
    if image is not None:
      b['image'] = jnp.zeros((batch_size,) + image, jnp.float32)
    return b

  @property
  def image_shape(self) -> Optional[tuple[int, int, int]]:
    """``(H, W, C)`` of the batch's ``image``, or None for a text-only family."""
    return None

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    """Boxed parameters (``nn.LogicallyPartitioned`` leaves)."""
    raise NotImplementedError

  def forward(self, params: Any, batch: Mapping[str, jax.Array],
              rng: Optional[jax.Array]) -> jax.Array:
    """Teacher-forced logits ``[b, target_len, vocab]``; dropout on when ``rng`` is given."""
    raise NotImplementedError

  def prefix(self, params: Any, batch: Mapping[str, jax.Array], room: int) -> Any:
    """The prompt run once, for :meth:`decoder` and :meth:`score_candidates` to share; ``room``:
    the most tokens either will append. None where the family has nothing to share."""
    del params, batch, room
    return None

  def decoder(self, params: Any, batch: Mapping[str, jax.Array], max_decode_len: int,
              repeat: int = 1, prefix: Any = None) -> decoding.Decoder:
    """Rows repeated ``repeat`` times; ``prefix``: :meth:`prefix` of ``batch`` with room for
    ``max_decode_len`` (default: run here)."""
    raise NotImplementedError

  def load(self, init: Mapping[str, Any], params: dict, shardings: Any) -> dict:
    """Fills the towers named in ``config.init`` (not ``native``) into ``params``."""
    raise NotImplementedError

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def eos_id(self) -> int:
    return self.model_config.eos_id

  @property
  def decoder_start_id(self) -> int:
    return 0

  @property
  def vocab_size(self) -> int:
    return self.model_config.vocab_size

  # ---------------------------------------------------------------- shared

  def embedding_table(self, params: Mapping) -> jax.Array:
    """The frozen token table ``[vocab, d]`` (for folding and ``prompt_init='vocab'``)."""
    node = nn.unbox(params)
    for key in self.embedding_path:
      node = node[key]
    return node

  def score_targets(self, params: Any, batch: Mapping[str, jax.Array],
                    targets: jax.Array) -> jax.Array:
    """Teacher-forced sum of the log-probs of ``targets[b, t]``, counted up to and including
    the first EOS -> ``[b]`` fp32 (rank classification's score; padding after EOS is free)."""
    start = jnp.full((targets.shape[0], 1), self.decoder_start_id, targets.dtype)
    forced = dict(batch, decoder_target_tokens=targets,
                  decoder_input_tokens=jnp.concatenate([start, targets[:, :-1]], axis=1))
    token_lp = decoding.token_log_probs(self.forward(params, forced, None), targets)
    return decoding.summed_to_eos(token_lp, targets, self.eos_id)[0]

  def score_candidates(self, params: Any, batch: Mapping[str, jax.Array],
                       candidates: jax.Array, prefix: Any = None) -> jax.Array:
    """Every candidate's :meth:`score_targets` for every example: ``candidates[c, t]`` (shared
    by the batch) -> ``[b, c]`` fp32. Here one teacher-forced forward per candidate, one at a
    time (the memory of one); families with a prefix cache override it to run the prefix once
    (``prefix``: :meth:`prefix` with room for ``t``, default run here).
    """
    del prefix
    b = batch['encoder_input_tokens'].shape[0]
    one = lambda cand: self.score_targets(params, batch, jnp.broadcast_to(cand, (b,) + cand.shape))
    return jax.lax.map(one, candidates).T

  def generate(self, params: Any, batch: Mapping[str, jax.Array], max_decode_len: int,
               method: str = 'greedy', prefix: Any = None, **kw) -> jax.Array:
    """Greedy / sample (``rng``, ``temperature``, ``top_k``) / beam (``num_beams``,
    ``length_penalty``) decoding -> tokens ``[b, max_decode_len]``, pad after EOS."""
    b = batch['encoder_input_tokens'].shape[0]
    return decoding.run(lambda repeat: self.decoder(params, batch, max_decode_len, repeat, prefix),
                        b, max_decode_len, method, eos_id=self.eos_id,
                        start_id=self.decoder_start_id, **kw)

  def generate_and_score(self, params: Any, batch: Mapping[str, jax.Array], max_decode_len: int,
                         candidates: jax.Array, method: str = 'greedy', **kw
                         ) -> tuple[jax.Array, jax.Array]:
    """:meth:`generate` and :meth:`score_candidates` on one run of the prompt -> (tokens
    ``[b, max_decode_len]``, scores ``[b, c]``): evaluation with rank classification would
    otherwise run the prompt twice per batch."""
    prefix = self.prefix(params, batch, max(max_decode_len, candidates.shape[1]))
    return (self.generate(params, batch, max_decode_len, method, prefix, **kw),
            self.score_candidates(params, batch, candidates, prefix))


def repeat_rows(x: Optional[jax.Array], repeat: int) -> Optional[jax.Array]:
  """Each row ``repeat`` times (row ``i * repeat + j``), as beam search lays out beams."""
  return x if x is None or repeat == 1 else jnp.repeat(x, repeat, axis=0)


def overlay(params: Mapping, loaded: Mapping) -> dict:
  """``params`` with every leaf ``loaded`` has replaced; leaves only ``params`` has (a method's
  hook parameters inside the blocks, e.g. LoRA / IA3) keep their initialisation."""
  from adalink_jax.checkpoints import common  # pylint: disable=g-import-not-at-top
  have, new = common.flatten(params), common.flatten(loaded)
  extra = sorted(set(new) - set(have))
  if extra:
    raise ValueError(f'the checkpoint holds parameters the model lacks: {extra[:5]}')
  return common.unflatten({**have, **new})
