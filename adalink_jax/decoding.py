"""Batched autoregressive decoding with the KV cache: greedy, sampling, beam search.

Model-agnostic over the encoder-decoder seam used by :class:`adalink_jax.models.t5.T5`
(and the PaLI-style model built on it): the model must expose

* ``encode(text_tokens, image_embeddings=None, task_id=None) -> (encoded, encoder_mask)``
* ``decode(encoded, encoder_mask, decoder_input_tokens, task_id=None, deterministic=True,
  decode=False) -> logits[b, t, vocab]``, writing keys/values to the ``cache`` collection
  when ``decode=True``: a first call with ``[b, max_len]`` tokens creates it, every later
  call feeds one position. Per-layer ``cached_key``/``cached_value`` are
  ``[b, max_len, heads, d_kv]`` (``[layers, b, ...]`` under ``nn.scan``); ``decode_index``
  and ``max_length_marker`` carry no batch axis.

The prefix (image + prompt) is encoded once; every function here takes its result.
All loops are ``jax.lax.while_loop`` with a static ``max_decode_len`` and stop early once
every sequence is finished, so they can be wrapped in ``jax.jit`` (close over ``model``
and the Python ints). Outputs are ``[b, max_decode_len]`` int32 *without* the decoder
start token; positions after the first EOS hold pad (0).

Beam search follows HF transformers' ``GenerationMixin._beam_search`` (v4.50+ vectorised
version) for encoder-decoders with its defaults (``early_stopping=False``, one EOS id):

* each step takes the top ``2 * num_beams`` (beam, token) continuations by accumulated
  log-prob; only those among the first ``num_beams`` of them that end in EOS -- or that
  reach ``max_decode_len`` -- are offered to the per-example set of ``num_beams``
  finished hypotheses, scored ``sum_logprob / num_generated_tokens ** length_penalty``
  (EOS counted); the best ``num_beams`` unfinished continuations keep running;
* beams other than the first start at -1e9 so step 0 does not pick duplicates;
* an example stops accepting hypotheses once its finished set is full and the best
  running beam's score normalised by its *current* length is no better than the worst
  finished score (HF's heuristic for ``early_stopping=False``); the loop ends when no
  example accepts hypotheses or at ``max_decode_len``.

Remaining differences from HF: (1) ties between exactly equal scores are broken toward the
lower (beam, token) index (XLA's ``top_k`` is stable; ``torch.topk`` leaves the order of
equal values unspecified); (2) ``length ** length_penalty`` is computed in float32 here and
in float64 by Python in HF, identical for integer penalties; (3) log-probs come from
different kernels, so two hypotheses whose scores differ by ~1e-6 may swap order; (4) format
only: HF returns the start token first, crops to the longest hypothesis and fills beam outputs
after EOS with the EOS id; we return ``[b, max_decode_len]`` without the start token, pad after
EOS. Not implemented: ``early_stopping=True/'never'``, logits processors (repetition penalty,
min length ...), sampling inside beam search. Note that,
as in HF, ``num_beams=1`` equals greedy only for ``length_penalty=0``: with a positive
penalty a beam that ranks second to EOS may keep running and win after normalisation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

PAD_ID = 0
_NEG = -1.0e9  # same "impossible" score as HF, so duplicate beams at step 0 order alike


def _compiled(*static_argnames: str) -> Callable[[Callable], Callable]:
  """Compiles ``fn(model, ...)`` once per (model, static args, shapes) when ``model`` hashes.

  Flax modules hash by their fields, so eager callers (eval loops, tests) reuse the compiled
  loop instead of retracing it every call; calls from inside a user's ``jax.jit`` simply nest.
  Models with unhashable fields fall back to tracing ``fn`` directly.
  """
  def wrap(fn):
    jitted = jax.jit(fn, static_argnames=('model',) + static_argnames)

    @functools.wraps(fn)
    def call(model, *args, **kw):
      try:
        hash(model)
      except TypeError:
        return fn(model, *args, **kw)
      return jitted(model, *args, **kw)
    return call
  return wrap


# ------------------------------------------------------------------ the stepping contract


class Decoder(NamedTuple):
  """How one family steps: what every loop here runs on (any encoder-decoder or decoder-only).

  state: a pytree (KV cache, encoded prefix, ...); ``step(state, tokens[n], i) -> (logits
  [n, vocab] fp32, state)`` feeds the token chosen at step ``i - 1`` (the start token at
  ``i = 0``; a decoder-only family that prefilled its prompt ignores it there and returns the
  prefill's logits); ``gather(state, rows[n]) -> state`` reorders rows (beam search). ``n`` is
  the batch size times the ``repeat`` the decoder was built with.
  """
  state: Any
  step: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
  gather: Callable[[Any, jax.Array], Any]


DecoderFn = Callable[[int], Decoder]  # repeat -> Decoder over batch * repeat rows


# ------------------------------------------------------------------ cache plumbing


def init_cache(model: Any, params: Any, encoded: jax.Array, encoder_mask: jax.Array,
               max_decode_len: int, task_id: Optional[jax.Array] = None) -> Any:
  """The decoder's KV cache (all zeros) for ``encoded[b, l, d]`` and ``max_decode_len`` steps."""
  b = encoded.shape[0]
  _, variables = model.apply({'params': params}, encoded, encoder_mask,
                             jnp.zeros((b, max_decode_len), jnp.int32), task_id=task_id,
                             decode=True, method=model.decode, mutable=['cache'])
  return variables['cache']


def decode_step(model: Any, params: Any, cache: Any, encoded: jax.Array,
                encoder_mask: jax.Array, tokens: jax.Array,
                task_id: Optional[jax.Array] = None) -> tuple[jax.Array, Any]:
  """Feeds ``tokens[b]`` at the cache's position -> (logits ``[b, vocab]`` fp32, new cache)."""
  logits, variables = model.apply({'params': params, 'cache': cache}, encoded, encoder_mask,
                                  tokens[:, None], task_id=task_id, decode=True,
                                  method=model.decode, mutable=['cache'])
  return logits[:, 0, :].astype(jnp.float32), variables['cache']


def gather_cache(cache: Any, flat_index: jax.Array) -> Any:
  """Reorders every batched cache leaf by ``flat_index[n]`` (rows of the ``[b*beams]`` batch).

  Layout knowledge, not guessing: rank-4 leaves are ``[n, len, heads, kv]`` (batch axis 0),
  rank-5 leaves are the scanned ``[layers, n, len, heads, kv]`` (batch axis 1); scalars
  (``decode_index``) and rank-1 markers have no batch axis and are left alone.
  """
  n = flat_index.shape[0]

  def gather(path, x):
    if x.ndim < 2:
      return x
    if x.ndim not in (4, 5):
      raise ValueError(f'cache leaf {jax.tree_util.keystr(path)} has shape {x.shape}; expected '
                       '[b, len, heads, kv] or scanned [layers, b, len, heads, kv]')
    axis = x.ndim - 4
    if x.shape[axis] != n:
      raise ValueError(f'cache leaf {jax.tree_util.keystr(path)} has batch size '
                       f'{x.shape[axis]} on axis {axis}, expected {n} (batch * beams)')
    return jnp.take(x, flat_index, axis=axis)

  return jax.tree_util.tree_map_with_path(gather, cache)


def encoder_decoder(model: Any, params: Any, encoded: jax.Array, encoder_mask: jax.Array,
                    max_decode_len: int, task_id: Optional[jax.Array] = None,
                    repeat: int = 1) -> Decoder:
  """The :class:`Decoder` of an encoder-decoder over ``encoded[b, l, d]``: rows repeated
  ``repeat`` times (row ``i * repeat + j``), a fresh KV cache for ``max_decode_len`` steps."""
  if repeat > 1:
    encoded = jnp.repeat(encoded, repeat, axis=0)
    encoder_mask = jnp.repeat(encoder_mask, repeat, axis=0)
    task_id = None if task_id is None else jnp.repeat(task_id, repeat, axis=0)
  cache = init_cache(model, params, encoded, encoder_mask, max_decode_len, task_id)

  def step(cache, tokens, i):
    del i
    return decode_step(model, params, cache, encoded, encoder_mask, tokens, task_id)

  return Decoder(cache, step, gather_cache)


def _check_args(encoded: jax.Array, encoder_mask: jax.Array, max_decode_len: int) -> None:
  if encoded.ndim != 3 or encoder_mask.shape != encoded.shape[:2]:
    raise ValueError(f'encoded must be [b, l, d] and encoder_mask [b, l]; got '
                     f'{encoded.shape} and {encoder_mask.shape}')
  if not isinstance(max_decode_len, (int, np.integer)) or max_decode_len < 1:
    raise ValueError(f'max_decode_len must be a positive Python int (static), '
                     f'got {max_decode_len!r}')


# ------------------------------------------------------------------ greedy / sampling


def _autoregressive(model, params, encoded, encoder_mask, max_decode_len, choose, eos_id,
                    start_id, task_id) -> jax.Array:
  """Shared loop over an encoder-decoder: see :func:`autoregressive`."""
  _check_args(encoded, encoder_mask, max_decode_len)
  dec = encoder_decoder(model, params, encoded, encoder_mask, max_decode_len, task_id)
  return autoregressive(dec, encoded.shape[0], max_decode_len, choose, eos_id, start_id)


def autoregressive(dec: Decoder, batch_size: int, max_decode_len: int,
                   choose: Callable[[jax.Array, jax.Array], jax.Array], eos_id: int,
                   start_id: int) -> jax.Array:
  """``choose(logits[b, V], step) -> tokens[b]`` until every row emitted EOS (finished rows
  emit pad) -> ``[b, max_decode_len]``."""
  b = batch_size
  state = (jnp.int32(0), dec.state, jnp.zeros((b, max_decode_len), jnp.int32),
           jnp.full((b,), start_id, jnp.int32), jnp.zeros((b,), bool))

  def cond(state):
    i, _, _, _, done = state
    return (i < max_decode_len) & ~jnp.all(done)

  def body(state):
    i, inner, out, last, done = state
    logits, inner = dec.step(inner, last, i)
    tok = jnp.where(done, PAD_ID, choose(logits, i).astype(jnp.int32))
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    return i + 1, inner, out, tok, done | (tok == eos_id)

  return jax.lax.while_loop(cond, body, state)[2]


def greedy_choice(logits: jax.Array, i: jax.Array) -> jax.Array:
  del i
  return jnp.argmax(logits, axis=-1)


def sampling_choice(rng: jax.Array, temperature: float, top_k: int) -> Callable:
  """``choose`` for :func:`autoregressive`: step ``i`` samples with ``fold_in(rng, i)``."""
  def choose(logits, i):
    logits = logits / temperature
    if top_k:
      kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1)
  return choose


def _check_sampling(temperature: float, top_k: int) -> None:
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f'temperature must be > 0 (use greedy_decode for argmax), got {temperature}')
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f'top_k must be a non-negative int (0 = no restriction), got {top_k!r}')


@_compiled('max_decode_len', 'eos_id', 'start_id')
def greedy_decode(model: Any, params: Any, encoded: jax.Array, encoder_mask: jax.Array,
                  max_decode_len: int, eos_id: int = 1, start_id: int = 0,
                  task_id: Optional[jax.Array] = None) -> jax.Array:
  """Argmax decoding. ``encoded[b, l, d], encoder_mask[b, l]`` -> tokens ``[b, max_decode_len]``."""
  return _autoregressive(model, params, encoded, encoder_mask, max_decode_len, greedy_choice,
                         eos_id, start_id, task_id)


def sample_decode(model: Any, params: Any, encoded: jax.Array, encoder_mask: jax.Array,
                  max_decode_len: int, rng: jax.Array, temperature: float = 1.0,
                  top_k: int = 0, eos_id: int = 1, start_id: int = 0,
                  task_id: Optional[jax.Array] = None) -> jax.Array:
  """Samples from ``softmax(logits / temperature)``, restricted to the ``top_k`` best if > 0.

  Step ``i`` uses ``fold_in(rng, i)``, so a fixed ``rng`` reproduces the same tokens.
  Tokens tied with the k-th best logit are all kept. Returns ``[b, max_decode_len]``.
  """
  _check_sampling(temperature, top_k)
  return _sample_decode(model, params, encoded, encoder_mask, max_decode_len, rng, temperature,
                        top_k, eos_id, start_id, task_id)


@_compiled('max_decode_len', 'top_k', 'eos_id', 'start_id')
def _sample_decode(model, params, encoded, encoder_mask, max_decode_len, rng, temperature, top_k,
                   eos_id, start_id, task_id):
  return _autoregressive(model, params, encoded, encoder_mask, max_decode_len,
                         sampling_choice(rng, temperature, top_k), eos_id, start_id, task_id)


# ------------------------------------------------------------------ beam search


class BeamSearchOutput(NamedTuple):
  """Best hypothesis: ``sequences[b, T]``, ``scores[b]``. All ``num_beams`` finished ones, best
  first: ``all_sequences[b, beams, T]``, ``all_scores[b, beams]`` (-inf marks an empty slot)."""
  sequences: jax.Array
  scores: jax.Array
  all_sequences: jax.Array
  all_scores: jax.Array


def _take_beams(x: jax.Array, index: jax.Array) -> jax.Array:
  """``x[b, n, ...]``, ``index[b, k]`` -> ``x[b, index, ...]`` of shape ``[b, k, ...]``."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


@_compiled('max_decode_len', 'num_beams', 'eos_id', 'start_id')
def beam_search(model: Any, params: Any, encoded: jax.Array, encoder_mask: jax.Array,
                max_decode_len: int, num_beams: int = 4, length_penalty: float = 1.0,
                eos_id: int = 1, start_id: int = 0,
                task_id: Optional[jax.Array] = None) -> BeamSearchOutput:
  """HF-style beam search (see the module docstring) over ``encoded[b, l, d]``.

  The encoded prefix, mask, task ids and KV cache are repeated ``num_beams`` times (row
  ``i * num_beams + j`` is beam ``j`` of example ``i``) and the cache is re-gathered by the
  source beam every step.
  """
  _check_args(encoded, encoder_mask, max_decode_len)
  _check_beams(num_beams)
  dec = encoder_decoder(model, params, encoded, encoder_mask, max_decode_len, task_id,
                        repeat=num_beams)
  return beam_loop(dec, encoded.shape[0], max_decode_len, num_beams, length_penalty, eos_id,
                   start_id)


def _check_beams(num_beams: int) -> None:
  if not isinstance(num_beams, int) or num_beams < 1:
    raise ValueError(f'num_beams must be a positive int, got {num_beams!r}')


def beam_loop(dec: Decoder, batch_size: int, max_decode_len: int, num_beams: int,
              length_penalty: float, eos_id: int, start_id: int) -> BeamSearchOutput:
  """The beam search of :func:`beam_search` over any :class:`Decoder` built with
  ``repeat=num_beams`` (row ``i * num_beams + j`` is beam ``j`` of example ``i``)."""
  b, nb, T = batch_size, num_beams, max_decode_len
  k = 2 * nb  # as HF with one EOS id: enough candidates that nb of them can keep running
  row_offset = (jnp.arange(b, dtype=jnp.int32) * nb)[:, None]

  state = dict(
      i=jnp.int32(0), cache=dec.state,
      run_seqs=jnp.zeros((b, nb, T), jnp.int32),
      run_scores=jnp.tile(jnp.array([0.0] + [_NEG] * (nb - 1), jnp.float32), (b, 1)),
      fin_seqs=jnp.zeros((b, nb, T), jnp.int32),
      fin_scores=jnp.full((b, nb), -jnp.inf, jnp.float32),
      fin_flags=jnp.zeros((b, nb), bool),
      open=jnp.ones((b,), bool))  # HF's is_early_stop_heuristic_unsatisfied

  def cond(s):
    return (s['i'] < T) & jnp.any(s['open'])

  def body(s):
    i = s['i']
    last = jnp.where(i == 0, start_id,
                     jax.lax.dynamic_index_in_dim(s['run_seqs'], jnp.maximum(i - 1, 0), 2, False))
    logits, cache = dec.step(s['cache'], last.reshape(b * nb), i)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits).reshape(b, nb, vocab)
    acc = (log_probs + s['run_scores'][:, :, None]).reshape(b, nb * vocab)

    # Top 2*nb continuations over all beams of each example.
    cand_scores, cand_index = jax.lax.top_k(acc, k)
    cand_beam, cand_tok = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
    cand_seqs = _take_beams(s['run_seqs'], cand_beam)
    cand_seqs = jax.lax.dynamic_update_slice(cand_seqs, cand_tok[:, :, None], (0, 0, i))
    # Reaching max length finishes a hypothesis too (HF's MaxLengthCriteria).
    stops = (cand_tok == eos_id) | (i == T - 1)

    # The nb best continuations that did not stop keep running.
    run_index = jax.lax.top_k(cand_scores + stops.astype(jnp.float32) * _NEG, nb)[1]
    run_seqs = _take_beams(cand_seqs, run_index)
    run_scores = _take_beams(cand_scores + stops.astype(jnp.float32) * _NEG, run_index)
    cache = dec.gather(cache, (row_offset + _take_beams(cand_beam, run_index)).reshape(-1))

    # Only the first nb candidates may enter the finished set, while the example is open.
    gen_len = (i + 1).astype(jnp.float32)
    offered = stops & (jnp.arange(k) < nb)[None, :] & s['open'][:, None]
    offer_scores = jnp.where(offered, cand_scores / gen_len ** length_penalty, -jnp.inf)
    merged_scores = jnp.concatenate([s['fin_scores'], offer_scores], axis=1)
    fin_scores, keep = jax.lax.top_k(merged_scores, nb)
    fin_seqs = _take_beams(jnp.concatenate([s['fin_seqs'], cand_seqs], axis=1), keep)
    fin_flags = _take_beams(jnp.concatenate([s['fin_flags'], offered], axis=1), keep)

    # HF's early-stop heuristic: can the best running beam, at its current length, still beat
    # the worst finished hypothesis?
    best_running = run_scores[:, 0] / gen_len ** length_penalty
    improvable = ~jnp.all(fin_flags, axis=1) | (best_running > jnp.min(fin_scores, axis=1))
    return dict(i=i + 1, cache=cache, run_seqs=run_seqs, run_scores=run_scores,
                fin_seqs=fin_seqs, fin_scores=fin_scores, fin_flags=fin_flags,
                open=s['open'] & improvable)

  s = jax.lax.while_loop(cond, body, state)
  all_seqs = _pad_after_eos(s['fin_seqs'], eos_id)
  return BeamSearchOutput(all_seqs[:, 0], s['fin_scores'][:, 0], all_seqs, s['fin_scores'])


def _pad_after_eos(tokens: jax.Array, eos_id: int) -> jax.Array:
  """Sets every position after the first EOS (on the last axis) to pad."""
  is_eos = tokens == eos_id
  after = (jnp.cumsum(is_eos, axis=-1) - is_eos) > 0
  return jnp.where(after, PAD_ID, tokens)


# ------------------------------------------------------------------ scoring / entry point


@_compiled('eos_id', 'start_id')
def score_sequences(model: Any, params: Any, encoded: jax.Array, encoder_mask: jax.Array,
                    targets: jax.Array, eos_id: int = 1, start_id: int = 0,
                    task_id: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced ``(sum of log-probs [b], number of tokens [b])`` of ``targets[b, t]``.

  Counts tokens up to and including the first EOS (all ``t`` if there is none), so the
  beam score is ``sums / lengths ** length_penalty``. Token id 0 before the EOS counts as a
  real token: decoders may emit it.
  """
  decoder_inputs = jnp.concatenate(
      [jnp.full((targets.shape[0], 1), start_id, targets.dtype), targets[:, :-1]], axis=1)
  logits = model.apply({'params': params}, encoded, encoder_mask, decoder_inputs,
                       task_id=task_id, method=model.decode)
  return summed_to_eos(token_log_probs(logits, targets), targets, eos_id)


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``logits[..., vocab]`` and ``targets[...]`` -> fp32 log-prob of each target ``[...]``."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def summed_to_eos(token_lp: jax.Array, targets: jax.Array, eos_id: int
                  ) -> tuple[jax.Array, jax.Array]:
  """``(sum of token_lp[b, t] [b], number of tokens [b])``, counting tokens up to and including
  the first EOS of ``targets[b, t]`` (all ``t`` if there is none)."""
  is_eos = targets == eos_id
  counted = (jnp.cumsum(is_eos, axis=-1) - is_eos) == 0  # at or before the first EOS
  return jnp.sum(jnp.where(counted, token_lp, 0.0), axis=-1), jnp.sum(counted, axis=-1)


@_compiled()
def encode(model: Any, params: Any, text_tokens: jax.Array,
           image_embeddings: Optional[jax.Array] = None,
           task_id: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """The once-per-prefix encoder pass: -> (``encoded[b, n + l, d]``, ``encoder_mask[b, n + l]``)."""
  return model.apply({'params': params}, text_tokens, image_embeddings, task_id,
                     method=model.encode)


def generate(model: Any, params: Any, text_tokens: jax.Array,
             image_embeddings: Optional[jax.Array] = None, task_id: Optional[jax.Array] = None,
             method: str = 'greedy', **kw) -> jax.Array:
  """Encodes ``[image; text]`` once, then decodes -> tokens ``[b, max_decode_len]``.

  ``method``: 'greedy', 'sample' (needs ``rng``; ``temperature``, ``top_k``) or 'beam'
  (``num_beams``, ``length_penalty``; returns the best hypothesis -- call
  :func:`beam_search` for scores). ``max_decode_len`` is required in ``kw``.
  """
  fns = {'greedy': greedy_decode, 'sample': sample_decode, 'beam': beam_search}
  if method not in fns:
    raise ValueError(f'unknown decoding method {method!r}; choose from {sorted(fns)}')
  if 'max_decode_len' not in kw:
    raise ValueError('generate needs max_decode_len=<int>')
  encoded, encoder_mask = encode(model, params, text_tokens, image_embeddings, task_id)
  out = fns[method](model, params, encoded, encoder_mask, task_id=task_id, **kw)
  return out.sequences if method == 'beam' else out


def run(decoder_fn: DecoderFn, batch_size: int, max_decode_len: int, method: str = 'greedy', *,
        eos_id: int, start_id: int, rng: Optional[jax.Array] = None, temperature: float = 1.0,
        top_k: int = 0, num_beams: int = 4, length_penalty: float = 1.0) -> jax.Array:
  """Any family's decoding: ``decoder_fn(repeat) -> Decoder`` -> tokens ``[b, max_decode_len]``
  (beam search: the best hypothesis). What a family's ``generate`` and the trainer call."""
  if not isinstance(max_decode_len, (int, np.integer)) or max_decode_len < 1:
    raise ValueError(f'max_decode_len must be a positive Python int (static), '
                     f'got {max_decode_len!r}')
  if method == 'greedy':
    return autoregressive(decoder_fn(1), batch_size, max_decode_len, greedy_choice, eos_id,
                          start_id)
  if method == 'sample':
    _check_sampling(temperature, top_k)
    if rng is None:
      raise ValueError("decoding method 'sample' needs rng")
    return autoregressive(decoder_fn(1), batch_size, max_decode_len,
                          sampling_choice(rng, temperature, top_k), eos_id, start_id)
  if method == 'beam':
    _check_beams(num_beams)
    return beam_loop(decoder_fn(num_beams), batch_size, max_decode_len, num_beams,
                     length_penalty, eos_id, start_id).sequences
  raise ValueError(f"unknown decoding method {method!r}; choose 'greedy', 'sample' or 'beam'")
