"""Decoding throughput: greedy and beam search, with the KV cache and without it.

``python -m bench.decoding --spec=spec.json --out=result.json``. The cached runs are
:func:`adalink_jax.decoding.greedy_decode` / :func:`~adalink_jax.decoding.beam_search` as the
evaluator calls them. The uncached runs use the *same* search loops on :class:`NoCache`, a
wrapper whose "cache" is the token buffer itself: every step writes the new token and re-runs
the whole decoder over the full ``[b, max_len]`` buffer (static shapes, as JAX needs), then
reads the logits at the current position. So the two differ only in what one step costs.

EOS is disabled (``eos_id=-1``) so every run decodes exactly ``max_len`` tokens; the encoder
pass is done once beforehand and not timed. Tokens/s counts output tokens: ``batch * max_len``
per call (beam search computes ``num_beams`` times as many rows to produce them).
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from bench import common


class NoCache(nn.Module):
  """Decode-mode ``decode`` without keys/values cached: re-runs the full decoder every step.

  ``cache/tokens`` is ``[b, max_len, 1, 1]`` int32 -- rank 4 on purpose, so
  :func:`adalink_jax.decoding.gather_cache` reorders it with the beams like a real cache.
  Params live under ``model/`` (the wrapped T5).
  """
  model: nn.Module

  def encode(self, *args, **kw):
    return self.model.encode(*args, **kw)

  @nn.compact
  def decode(self, encoded: jax.Array, encoder_mask: jax.Array, decoder_input_tokens: jax.Array,
             task_id=None, deterministic: bool = True, decode: bool = False) -> jax.Array:
    """As ``T5.decode``; with ``decode=True`` one position per call after a creating call."""
    if not decode:
      return self.model.decode(encoded, encoder_mask, decoder_input_tokens, task_id, deterministic)
    b, n = decoder_input_tokens.shape
    initialized = self.has_variable('cache', 'tokens')
    buf = self.variable('cache', 'tokens', jnp.zeros, (b, n, 1, 1), jnp.int32)
    index = self.variable('cache', 'decode_index', lambda: jnp.zeros((), jnp.int32))
    if not initialized:
      # The creating call (init_cache) only wants the cache; its logits are discarded.
      return jnp.zeros((b, n, self.model.config.vocab_size), jnp.float32)
    i = index.value
    buf.value = jax.lax.dynamic_update_slice(buf.value, decoder_input_tokens[:, :, None, None],
                                             (0, i, 0, 0))
    index.value = i + 1
    logits = self.model.decode(encoded, encoder_mask, buf.value[:, :, 0, 0], task_id,
                               deterministic)
    return jax.lax.dynamic_slice_in_dim(logits, i, 1, axis=1)


def run(spec: dict) -> dict:
  """Times greedy and beam search, cached and uncached, at each batch size in the spec."""
  import flax.linen as fnn  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from adalink_jax import decoding, model_builder  # pylint: disable=import-outside-toplevel
  from bench import setups  # pylint: disable=import-outside-toplevel

  setup = model_builder.build(setups.config(spec['model'], 'ft'))
  model = setup.model
  shapes = fnn.unbox(jax.eval_shape(setup.init, jax.random.key(0), setup.init_batch(1, 4, 4)))
  params = common.random_params(shapes)
  uncached = NoCache(model)
  T, L, nb = spec['max_len'], spec['text_len'], spec['beams']
  v = setup.t5_config.vocab_size
  rng = np.random.default_rng(0)
  rows = []
  for b in spec['batches']:
    tokens = jnp.asarray(rng.integers(2, v, (b, L)), jnp.int32)
    encoded, mask = decoding.encode(model, params, tokens)
    jax.block_until_ready(encoded)
    for cache in (True, False):
      m, p = (model, params) if cache else (uncached, {'model': params})
      fns = {
          'greedy': lambda p_, e, k, m=m: decoding.greedy_decode(m, p_, e, k, max_decode_len=T,
                                                                 eos_id=-1),
          f'beam{nb}': lambda p_, e, k, m=m: decoding.beam_search(
              m, p_, e, k, max_decode_len=T, num_beams=nb, eos_id=-1).sequences,
      }
      for name, fn in fns.items():
        jitted = jax.jit(fn)
        t0 = time.perf_counter()
        compiled = jitted.lower(p, encoded, mask).compile()
        compile_s = time.perf_counter() - t0
        out = [None]

        def call():
          out[0] = compiled(p, encoded, mask)
          jax.block_until_ready(out[0])

        warm = common.timed(call, 1)[0]
        # Calls over 2 s (uncached beam search at batch 32) are timed once after the warm-up.
        times = common.timed(call, spec['reps'] if warm < 2.0 else 1)
        med = common.median(times)
        rows.append(dict(search=name, kv_cache=cache, batch=b, max_len=T, text_len=L,
                         compile_s=compile_s, warmup_s=warm, times_s=times, time_s=med,
                         tokens_per_s=b * T / med,
                         out_shape=list(out[0].shape)))
  # Same tokens with and without the cache (a correctness check of the comparison itself).
  return dict(kind='decode', model=spec['model']['name'], backend=jax.default_backend(),
              rows=rows, rss_peak_bytes=common.peak_rss_bytes(),
              cache_matches_nocache=_same_tokens(model, uncached, params, v, L, T))


def _same_tokens(model, uncached, params, vocab: int, text_len: int, max_len: int) -> bool:
  """Greedy tokens with and without the cache agree (so the two loops compute the same thing)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from adalink_jax import decoding  # pylint: disable=import-outside-toplevel
  tokens = jnp.asarray(np.random.default_rng(1).integers(2, vocab, (2, text_len)), jnp.int32)
  encoded, mask = decoding.encode(model, params, tokens)
  a = jax.jit(lambda p, e, k: decoding.greedy_decode(model, p, e, k, max_decode_len=max_len,
                                                     eos_id=-1))(params, encoded, mask)
  b = jax.jit(lambda p, e, k: decoding.greedy_decode(uncached, p, e, k, max_decode_len=max_len,
                                                     eos_id=-1))({'model': params}, encoded, mask)
  return bool(np.array_equal(np.asarray(a), np.asarray(b)))


if __name__ == '__main__':
  common.child_main(run)
