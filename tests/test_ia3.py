"""IA3 end to end (identity at init, trains only its scales, saves/loads as an adapter) and the
intrusive hooks (IA3, LoRA, bottleneck) on the decoder-only Gemma."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import app

from adalink_jax import decoding
from adalink_jax import export
from adalink_jax import peft
from adalink_jax.checkpoints import common
from adalink_jax.models import gemma, t5

CFG = t5.t5_config('t5_1_1_tiny')
B, L, C = 16, 6, 4
WORDS = 100  # class c is answered with token WORDS + c, then EOS


def _batch(seed):
  """Text 'topic' task: 6 tokens from class c's 8-token range -> [WORDS + c, EOS]."""
  rng = np.random.default_rng(seed)
  c = rng.integers(0, C, B)
  x = (2 + 8 * c[:, None] + rng.integers(0, 8, (B, L))).astype(np.int32)
  tgt = np.stack([WORDS + c, np.ones_like(c)], -1).astype(np.int32)
  return dict(encoder_input_tokens=x, decoder_input_tokens=np.asarray(t5.shift_right(tgt)),
              decoder_target_tokens=tgt, decoder_loss_weights=np.ones(tgt.shape, np.float32))


BATCH = _batch(0)


def _init(model_cfg, seed):
  model = t5.T5(model_cfg)
  return model, nn.unbox(model.init(jax.random.key(seed), BATCH['encoder_input_tokens'],
                                    BATCH['decoder_input_tokens'])['params'])


def _logits(model, params):
  return np.asarray(model.apply({'params': params}, BATCH['encoder_input_tokens'],
                                BATCH['decoder_input_tokens']))


def _set(tree, value_fn):
  return jax.tree.map(lambda x: jnp.asarray(value_fn(x.shape), x.dtype), tree)


def _random_scales(tree, seed):
  rng = np.random.default_rng(seed)
  return _set(tree, lambda s: 1 + 0.5 * rng.normal(size=s))


@pytest.fixture(scope='module')
def setup():
  """(base model, base params, ia3 model, trainable at init, frozen = the base's params)."""
  base_model, base = _init(CFG, 0)
  built = peft.build(dict(method='ia3'), CFG)
  model, params = _init(built.model_config, 1)
  trainable, frozen = peft.split(params, built.trainable)
  _, base_frozen = peft.split(base, built.trainable)
  assert jax.tree.map(jnp.shape, frozen) == jax.tree.map(jnp.shape, base_frozen)
  return base_model, base, model, built, trainable


def test_ia3_scales_keys_values_and_mlp_hidden_and_is_identity_at_init(setup):
  base_model, base, model, built, trainable = setup
  paths = sorted(common.flatten(trainable))
  layer0 = [p for p in paths if p.startswith(('encoder/layers_0/', 'decoder/layers_0/'))]
  assert layer0 == [
      'decoder/layers_0/encoder_decoder_attention/key/ia3/scale',
      'decoder/layers_0/encoder_decoder_attention/value/ia3/scale',
      'decoder/layers_0/mlp/ia3_hidden/scale',
      'decoder/layers_0/self_attention/key/ia3/scale',
      'decoder/layers_0/self_attention/value/ia3/scale',
      'encoder/layers_0/attention/key/ia3/scale',
      'encoder/layers_0/attention/value/ia3/scale',
      'encoder/layers_0/mlp/ia3_hidden/scale']
  flat = common.flatten(trainable)
  assert flat['encoder/layers_0/attention/key/ia3/scale'].shape == (CFG.num_heads * CFG.d_kv,)
  assert flat['encoder/layers_0/mlp/ia3_hidden/scale'].shape == (CFG.d_ff,)
  assert all(np.all(np.asarray(v) == 1.0) for v in flat.values())
  # Every IA3 parameter is declared with a logical axis name (for the partitioning rules).
  boxed = model.init(jax.random.key(1), BATCH['encoder_input_tokens'],
                     BATCH['decoder_input_tokens'])['params']
  axes = {k: v.names for k, v in common.flatten(boxed).items() if '/ia3' in k}
  assert axes['encoder/layers_0/attention/value/ia3/scale'] == ('joined_kv',)
  assert axes['decoder/layers_1/mlp/ia3_hidden/scale'] == ('mlp',)
  assert len(axes) == len(paths) == 2 * 3 + 2 * 5
  counts = peft.param_counts(peft.merge(trainable, base), built.trainable)
  assert counts['trainable'] == 2 * (2 * 32 + 64) + 2 * (4 * 32 + 64) == 640
  assert counts['groups']['ia3/key']['params'] == 6 * 32
  assert counts['groups']['ia3/mlp']['params'] == 4 * 64
  # Ones at init: the adapted model is the frozen one, bit for bit.
  want = _logits(base_model, base)
  np.testing.assert_array_equal(_logits(model, peft.merge(trainable, base)), want)
  moved = _logits(model, peft.merge(_random_scales(trainable, 3), base))
  assert np.abs(moved - want).max() > 1e-2


def test_ia3_trains_only_its_scales_and_the_loss_falls(setup):
  _, base, model, built, trainable = setup
  _, frozen = peft.split(base, built.trainable)
  frozen_before = jax.tree.map(lambda x: np.array(x, copy=True), frozen)
  opt = optax.adam(0.1)
  opt_state = opt.init(trainable)
  step = jax.jit(peft.make_train_step(model, opt)).lower(
      trainable, opt_state, frozen, BATCH, None).compile(
          compiler_options={'xla_backend_optimization_level': 0})
  losses = []
  for i in range(30):
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, _batch(i), None)
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  assert all('/ia3' in k for k in common.flatten(trainable))
  moved = [k for k, v in common.flatten(trainable).items() if np.abs(np.asarray(v) - 1).max() > 0]
  assert len(moved) == len(common.flatten(trainable))  # every scale got a gradient
  for k, v in common.flatten(frozen).items():
    np.testing.assert_array_equal(np.asarray(v), common.flatten(frozen_before)[k], err_msg=k)


def test_ia3_adapter_saves_loads_and_does_not_fold(setup, tmp_path):
  _, base, model, built, trainable = setup
  _, frozen = peft.split(base, built.trainable)
  trained = _random_scales(trainable, 7)  # what training leaves: scales away from 1
  card = peft.save_adapter(str(tmp_path), trained, frozen, dict(method='ia3'), 't5:t5_1_1_tiny')
  assert card['method'] == 'ia3' and card['num_params'] == 640
  assert card['ia3_targets'] == ['key', 'value', 'mlp_hidden'] and card['ranks'] == {}
  loaded, card2 = peft.load_adapter(str(tmp_path), frozen, template=trainable)
  assert card2 == card
  for k, v in common.flatten(trained).items():
    np.testing.assert_array_equal(np.asarray(common.flatten(loaded)[k]), np.asarray(v), err_msg=k)
  np.testing.assert_array_equal(_logits(model, peft.merge(loaded, frozen)),
                                _logits(model, peft.merge(trained, frozen)))
  with pytest.raises(ValueError, match='different weights'):
    peft.load_adapter(str(tmp_path), jax.tree.map(lambda x: x + 1, frozen))
  # export --fold asks the method: IA3 has no folded form, AdaLink does.
  with pytest.raises(app.UsageError, match='peft.method=ia3 has no folded form .*adalink'):
    export.folder(dict(method='ia3'), fold=True)
  assert export.folder(dict(method='ia3'), fold=False) is None
  assert callable(export.folder(dict(method='adalink', modalities=('text',)), fold=True))
  with pytest.raises(app.UsageError, match='needs a text AdaLink'):
    export.folder(dict(method='adalink', modalities=('image',)), fold=True)


def test_ia3_kv_cache_decoding_matches_the_full_decoder(setup):
  """Scaled keys/values go into the cache: step-by-step decoding equals one full pass."""
  _, base, model, built, trainable = setup
  params = peft.merge(_random_scales(trainable, 11), peft.split(base, built.trainable)[1])
  encoded, mask = decoding.encode(model, params, jnp.asarray(BATCH['encoder_input_tokens']))
  dec = jnp.asarray(np.random.default_rng(2).integers(2, 200, (B, 5)).astype(np.int32))
  full = np.asarray(model.apply({'params': params}, encoded, mask, dec, method=model.decode))
  cache = decoding.init_cache(model, params, encoded, mask, dec.shape[1])
  for i in range(dec.shape[1]):
    step, cache = decoding.decode_step(model, params, cache, encoded, mask, dec[:, i])
    np.testing.assert_allclose(np.asarray(step), full[:, i], atol=2e-5, err_msg=f'step {i}')


# ------------------------------------------------------------------ hooks on Gemma

GEMMA_TOK = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 9)).astype(np.int32))


def _gemma(cfg, seed):
  model = gemma.Gemma(cfg)
  return model, nn.unbox(model.init(jax.random.key(seed), GEMMA_TOK)['params'])


@pytest.mark.parametrize('size', ['gemma_tiny', 'gemma2_tiny'])
@pytest.mark.parametrize('peft_cfg,expected', [
    (dict(method='ia3'), ['attn/k_proj/ia3/scale', 'attn/v_proj/ia3/scale',
                          'mlp/ia3_hidden/scale']),
    (dict(method='lora', rank=2, lora_targets=('query', 'key', 'value', 'out', 'wi', 'wo')),
     [f'{m}/lora/lora_{w}' for m in ('attn/k_proj', 'attn/o_proj', 'attn/q_proj', 'attn/v_proj',
                                     'mlp/down_proj', 'mlp/gate_proj', 'mlp/up_proj')
      for w in 'ab']),
    (dict(method='adapter', adapter_dim=4),
     [f'{w}_adapter/{p}' for w in ('attention', 'mlp')
      for p in ('down_bias', 'down_kernel', 'up_bias', 'up_kernel')]),
], ids=['ia3', 'lora', 'bottleneck'])
def test_hooks_on_gemma_are_identity_at_init(size, peft_cfg, expected):
  cfg = gemma.gemma_config(size)
  base_model, base = _gemma(cfg, 0)
  built = peft.build(peft_cfg, cfg)
  assert built.encoder_input_adapter is None and built.model_config.hooks
  model, params = _gemma(built.model_config, 1)
  trainable, frozen = peft.split(params, built.trainable)
  assert jax.tree.map(jnp.shape, frozen) == jax.tree.map(jnp.shape, base)
  paths = sorted(common.flatten(trainable))
  assert [p.split('/', 1)[1] for p in paths if p.startswith('layers_0/')] == expected
  assert {p.split('/', 1)[0] for p in paths} == {f'layers_{i}' for i in range(cfg.num_layers)}
  want = np.asarray(base_model.apply({'params': base}, GEMMA_TOK))
  got = np.asarray(model.apply({'params': peft.merge(trainable, base)}, GEMMA_TOK))
  np.testing.assert_array_equal(got, want)
  # A real adapter: other values move the logits.
  rng = np.random.default_rng(5)
  moved = _set(trainable, lambda s: 1 + 0.3 * rng.normal(size=s))
  got = np.asarray(model.apply({'params': peft.merge(moved, base)}, GEMMA_TOK))
  assert np.abs(got - want).max() > 1e-3
