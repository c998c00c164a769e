"""Packed (seqio ``pack=True``) text batches in T5: every example packed into a shared row gets
the logits, loss and gradients it gets alone. The packed features are checked against seqio's own
EncDecFeatureConverter(pack=True); cross-entropy comes from optax."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adalink_jax.models import t5

ENC_LEN, DEC_LEN = 20, 14


def _examples(vocab: int = 256, seed: int = 0):
  """Three examples of different lengths; tokens >= 2 (no pad 0, no EOS 1)."""
  rng = np.random.default_rng(seed)
  lengths = [(5, 4), (3, 2), (7, 5)]
  return [(rng.integers(2, vocab, n_in).tolist(), rng.integers(2, vocab, n_tgt).tolist())
          for n_in, n_tgt in lengths]


def _pack(rows, examples):
  """Hand-built seqio-style packed batch: ``rows`` lists example indices per row."""
  b = len(rows)
  f = {k: np.zeros((b, ENC_LEN if k.startswith('encoder') else DEC_LEN), np.int32)
       for k in ('encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions',
                 'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
                 'decoder_segment_ids', 'decoder_positions')}
  for r, idx in enumerate(rows):
    i = j = 0
    for seg, e in enumerate(idx, start=1):
      inp, tgt = examples[e]
      f['encoder_input_tokens'][r, i:i + len(inp)] = inp
      f['encoder_segment_ids'][r, i:i + len(inp)] = seg
      f['encoder_positions'][r, i:i + len(inp)] = np.arange(len(inp))
      f['decoder_target_tokens'][r, j:j + len(tgt)] = tgt
      f['decoder_input_tokens'][r, j:j + len(tgt)] = [0] + tgt[:-1]  # shifted per segment
      f['decoder_loss_weights'][r, j:j + len(tgt)] = 1
      f['decoder_segment_ids'][r, j:j + len(tgt)] = seg
      f['decoder_positions'][r, j:j + len(tgt)] = np.arange(len(tgt))
      i, j = i + len(inp), j + len(tgt)
  return f


def _unpacked(examples):
  """One example per row, padded: the ordinary (unpacked) batch."""
  b = len(examples)
  enc = np.zeros((b, ENC_LEN), np.int32)
  dec_in = np.zeros((b, DEC_LEN), np.int32)
  tgt_arr = np.zeros((b, DEC_LEN), np.int32)
  for r, (inp, tgt) in enumerate(examples):
    enc[r, :len(inp)] = inp
    tgt_arr[r, :len(tgt)] = tgt
    dec_in[r, 1:len(tgt)] = tgt[:-1]
  return enc, dec_in, tgt_arr, (tgt_arr > 0).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _model(name: str, scan: bool):
  """A tiny T5 with random numpy weights of sensible scale (shapes from ``eval_shape``: no
  compile of the initialisers); relative-bias tables are O(1) so positions really matter."""
  cfg = t5.t5_config(name, scan_layers=scan)
  model = t5.T5(cfg)
  toks = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(1), toks, toks)['params'])
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    if 'kernel' in name:
      x /= np.sqrt(leaf.shape[-2])  # fan-in scaling keeps activations O(1)
    elif 'scale' in name:
      x = 1.0 + 0.1 * x
    return jnp.asarray(x)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _jit_apply(model):
  """Jitted teacher-forced forward: one compile per shape instead of op-by-op dispatch."""
  return jax.jit(lambda p, enc, dec, kw: model.apply({'params': p}, enc, dec, **kw))


_PACKED_KEYS = ('encoder_segment_ids', 'encoder_positions', 'decoder_segment_ids',
                'decoder_positions')


def _packed_logits(model, params, f, keys=_PACKED_KEYS):
  return np.asarray(_jit_apply(model)(
      params, jnp.asarray(f['encoder_input_tokens']), jnp.asarray(f['decoder_input_tokens']),
      {k: jnp.asarray(f[k]) for k in keys}))


def _segment_slices(f, r):
  """(example-local index -> packed index) per segment of row ``r``, decoder side."""
  seg = f['decoder_segment_ids'][r]
  return [np.flatnonzero(seg == s) for s in range(1, seg.max() + 1)]


ROWS = [[0, 1, 2], [2, 0]]  # two rows: order and batch dimension both matter


@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('name', ['t5_1_1_tiny', 't5_tiny'])
def test_packed_logits_equal_unpacked(name, scan):
  model, params = _model(name, scan)
  ex = _examples()
  f = _pack(ROWS, ex)
  enc, dec_in, _, _ = _unpacked(ex)
  alone = np.asarray(_jit_apply(model)(params, jnp.asarray(enc), jnp.asarray(dec_in), {}))
  packed = _packed_logits(model, params, f)
  no_segments = _packed_logits(model, params, f, keys=())
  worst = worst_unmasked = 0.0
  for r, idx in enumerate(ROWS):
    for e, cols in zip(idx, _segment_slices(f, r)):
      ref = alone[e, :len(cols)]
      worst = max(worst, np.abs(packed[r, cols] - ref).max())
      worst_unmasked = max(worst_unmasked, np.abs(no_segments[r, cols] - ref).max())
  assert worst < 1e-5, worst
  # Without segment ids the examples attend to each other: the comparison can fail.
  assert worst_unmasked > 1e-2, worst_unmasked
  assert np.abs(alone).max() > 1.0  # logits are not trivially small


def test_positions_consistent_and_required_for_segments_only():
  """Positions restart per segment, so in-segment offsets equal index offsets: segment ids with
  the cheap ``arange`` bias give the same logits; positions alone (no segments) do not."""
  model, params = _model('t5_1_1_tiny', False)
  f = _pack(ROWS, _examples())
  full = _packed_logits(model, params, f)
  seg_only = _packed_logits(model, params, f, keys=('encoder_segment_ids',
                                                    'decoder_segment_ids'))
  pos_only = _packed_logits(model, params, f, keys=('encoder_positions', 'decoder_positions'))
  real = f['decoder_loss_weights'] > 0
  np.testing.assert_allclose(seg_only[real], full[real], atol=1e-5)
  assert np.abs(pos_only[real] - full[real]).max() > 1e-2


def _ce(logits, targets, weights):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(ce * weights) / jnp.sum(weights)


def test_packed_loss_and_grads_are_token_weighted_means():
  model, params = _model('t5_1_1_tiny', False)
  ex = _examples()
  f = {k: jnp.asarray(v) for k, v in _pack(ROWS, ex).items()}
  enc, dec_in, tgt, w = map(jnp.asarray, _unpacked(ex))

  @jax.jit
  @jax.value_and_grad
  def packed_loss(p):
    logits = model.apply({'params': p}, f['encoder_input_tokens'], f['decoder_input_tokens'],
                         **{k: f[k] for k in _PACKED_KEYS})
    return _ce(logits, f['decoder_target_tokens'], f['decoder_loss_weights'])

  @jax.jit
  @jax.value_and_grad
  def example_loss(p, enc_row, dec_row, tgt_row, w_row):
    logits = model.apply({'params': p}, enc_row[None], dec_row[None])
    return _ce(logits, tgt_row[None], w_row[None])

  loss, grads = packed_loss(params)
  # Every packed occurrence of an example counts once, weighted by its target tokens.
  occurrences = [e for row in ROWS for e in row]
  n = [len(ex[e][1]) for e in occurrences]
  per = [example_loss(params, enc[e], dec_in[e], tgt[e], w[e]) for e in occurrences]
  want = sum(ni * li for ni, (li, _) in zip(n, per)) / sum(n)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6, atol=1e-6)
  assert abs(float(loss) - float(np.mean([float(l) for l, _ in per]))) > 1e-4  # not a plain mean
  want_g = jax.tree.map(lambda *g: sum(ni * gi for ni, gi in zip(n, g)) / sum(n),
                        *[g for _, g in per])
  for (path, got), exp in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(exp), atol=2e-6, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_seqio_packed_batch_matches_hand_packing_and_unpacked_logits():
  from adalink_jax.env import import_tensorflow  # pylint: disable=g-import-not-at-top
  tf = import_tensorflow()
  import seqio  # pylint: disable=g-import-not-at-top

  ex = _examples()
  ds = tf.data.Dataset.from_generator(
      lambda: ({'inputs': np.array(i, np.int32), 'targets': np.array(t, np.int32)}
               for i, t in ex),
      output_signature={'inputs': tf.TensorSpec([None], tf.int32),
                        'targets': tf.TensorSpec([None], tf.int32)})
  conv = seqio.EncDecFeatureConverter(pack=True)
  rows = list(conv(ds, {'inputs': ENC_LEN, 'targets': DEC_LEN}).as_numpy_iterator())
  assert len(rows) == 1  # all three fit one row
  seqio_batch = {k: v[None] for k, v in rows[0].items()}
  mine = _pack([[0, 1, 2]], ex)
  assert sorted(seqio_batch) == sorted(mine)
  for k in mine:
    np.testing.assert_array_equal(seqio_batch[k], mine[k], err_msg=k)

  model, params = _model('t5_tiny', True)
  enc, dec_in, _, _ = _unpacked(ex)
  alone = np.asarray(_jit_apply(model)(params, jnp.asarray(enc), jnp.asarray(dec_in), {}))
  packed = _packed_logits(model, params, seqio_batch)
  for e, cols in enumerate(_segment_slices(seqio_batch, 0)):
    np.testing.assert_allclose(packed[0, cols], alone[e, :len(cols)], atol=1e-5)


def test_packed_errors_and_decode_mode():
  model, params = _model('t5_1_1_tiny', False)
  f = {k: jnp.asarray(v) for k, v in _pack(ROWS, _examples()).items()}
  enc, dec = f['encoder_input_tokens'], f['decoder_input_tokens']
  # Errors are raised while tracing: eval_shape finds them without compiling anything.
  trace = functools.partial(jax.eval_shape, functools.partial(model.apply, {'params': params}))
  with pytest.raises(ValueError, match='needs both decoder_segment_ids and encoder_segment_ids'):
    trace(enc, dec, encoder_segment_ids=f['encoder_segment_ids'])
  with pytest.raises(ValueError, match=r'decoder_positions must be an integer array of shape'):
    trace(enc, dec, decoder_positions=f['decoder_positions'][:, :5])
  with pytest.raises(ValueError, match='text-only'):
    trace(enc, dec, image_embeddings=jnp.zeros((2, 3, 32)),
          encoder_segment_ids=f['encoder_segment_ids'],
          decoder_segment_ids=f['decoder_segment_ids'])

  @jax.jit
  def run(p):
    apply = functools.partial(model.apply, {'params': p})
    _, packed_mask = apply(enc, encoder_segment_ids=f['encoder_segment_ids'],
                           method=model.encode)
    encoded, mask = apply(enc[:1, :5], method=model.encode)
    kw = dict(decode=True, method=model.decode, mutable=['cache'])
    _, with_seg = apply(encoded, mask, jnp.zeros((1, 6), jnp.int32),
                        decoder_segment_ids=jnp.ones((1, 6), jnp.int32), **kw)
    _, without = apply(encoded, mask, jnp.zeros((1, 6), jnp.int32), **kw)
    return packed_mask, with_seg, without

  packed_mask, with_seg, without = run(params)
  # Packed segment ids set the seam's mask (segment > 0), so the returned encoder mask is it.
  np.testing.assert_array_equal(packed_mask, f['encoder_segment_ids'] > 0)
  # decode=True (KV cache, one example per row) ignores segment ids: the same cache.
  jax.tree.map(np.testing.assert_array_equal, with_seg, without)
