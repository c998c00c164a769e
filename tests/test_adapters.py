"""AdaLink and its baselines as modules: identity at init, modality/task routing, folding,
parameter counts, config errors and adapter artifacts."""
import functools
import hashlib
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from adalink_jax import peft
from adalink_jax.peft import artifacts
from adalink_jax.models import t5

CFG = t5.t5_config('t5_1_1_tiny')
B, L, T, N_IMG = 4, 7, 5, 3


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, CFG.vocab_size, (B, L)).astype(np.int32)
  enc[:, -2:] = 0  # padding, so the masks matter
  dec = rng.integers(2, CFG.vocab_size, (B, T)).astype(np.int32)
  img = rng.normal(size=(B, N_IMG, CFG.d_model)).astype(np.float32)
  return jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(img)


ENC, DEC, IMG = _inputs()
TASKS = jnp.array([0, 2, 1, 2], jnp.int32)


@functools.lru_cache(maxsize=None)
def _base():
  model = t5.T5(CFG)
  return model, nn.unbox(model.init(jax.random.key(0), ENC, DEC, IMG)['params'])


def _built(**peft_cfg):
  built = peft.build(peft_cfg, CFG)
  model = t5.T5(built.model_config, built.encoder_input_adapter, built.decoder_input_adapter)
  return built, model


# Eager (op-by-op) on purpose: for a model this small it is much cheaper than compiling.
def _init(model, task_id=None, seed=1):
  return nn.unbox(model.init(jax.random.key(seed), ENC, DEC, IMG, task_id)['params'])


def _logits(model, params, task_id=None):
  return model.apply({'params': params}, ENC, DEC, image_embeddings=IMG, task_id=task_id)


def _randomize(tree, seed, scale=0.3):
  """Non-zero values for every trainable leaf (the zero-init `up` would hide bugs)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), tree)


# ------------------------------------------------------------------ identity at init


@pytest.mark.parametrize('peft_cfg', [
    dict(method='adalink', rank=4),
    dict(method='adalink', rank={'text': 3, 'image': 5}, num_tasks=3, decoder_inputs=True,
         use_bias=True, activation='gelu'),
    dict(method='lora', rank=4, lora_targets=('query', 'key', 'value', 'out', 'wi', 'wo')),
    dict(method='adapter', adapter_dim=8),
], ids=['adalink', 'adalink_bank_bias_gelu_dec', 'lora_attn_mlp', 'bottleneck'])
def test_zero_init_methods_equal_frozen_model(peft_cfg):
  base_model, base = _base()
  built, model = _built(**peft_cfg)
  task_id = TASKS if peft_cfg.get('num_tasks', 1) > 1 else None
  trainable, frozen = peft.split(_init(model, task_id), built.trainable)
  # The frozen part is exactly the base model's tree (names and shapes).
  assert jax.tree.map(jnp.shape, frozen) == jax.tree.map(jnp.shape, base)
  assert jax.tree.leaves(trainable)
  want = _logits(base_model, base)
  got = _logits(model, peft.merge(trainable, base), task_id)
  assert float(jnp.max(jnp.abs(want))) > 0.1
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
  # ... and it is a real adapter: non-zero weights change the output.
  moved = _logits(model, peft.merge(_randomize(trainable, 3), base), task_id)
  assert float(jnp.max(jnp.abs(moved - want))) > 1e-3


# ------------------------------------------------------------------ the AdaLink module


def _np_act(name, h):
  if name == 'gelu':  # tanh approximation, as T5 1.1 and layers.ACTIVATIONS use
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  return {'identity': h, 'relu': np.maximum(h, 0)}[name]


@pytest.mark.parametrize('activation,use_bias', [('identity', False), ('gelu', True),
                                                 ('relu', True)])
def test_adalink_formula_and_modality_routing(activation, use_bias):
  d = 16
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, d)).astype(np.float32)
  modality = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 2, 2]], np.int32)  # 2 = prompt
  inputs = t5.EncoderInputs(jnp.asarray(x), jnp.ones((2, 6), bool), jnp.asarray(modality))
  mod = peft.AdaLink(('text', 'image'), (4, 2), activation=activation, use_bias=use_bias)
  params = _randomize(nn.unbox(mod.init(jax.random.key(0), inputs)['params']), 5)
  out = np.asarray(mod.apply({'params': params}, inputs).embeddings)
  want = x.astype(np.float64).copy()
  for name, mid in (('text', 0), ('image', 1)):
    p = {k: np.asarray(v, np.float64) for k, v in params[name].items()}
    h = x @ p['down'] + (p['down_bias'] if use_bias else 0)
    delta = _np_act(activation, h) @ p['up'] + (p['up_bias'] if use_bias else 0)
    want = np.where((modality == mid)[..., None], want + delta, want)
  np.testing.assert_allclose(out, want, atol=1e-5)
  # Prompt positions (modality 2) are bit-identical, the rest did move.
  np.testing.assert_array_equal(out[1, 4:], x[1, 4:])
  assert np.abs(out[:, :4] - x[:, :4]).min() > 0
  assert params['text']['down'].shape == (d, 4) and params['image']['up'].shape == (2, d)


def test_bank_selection_and_mixed_task_batch():
  built, model = _built(method='adalink', rank=4, num_tasks=3, decoder_inputs=True)
  _, base = _base()
  trainable, _ = peft.split(_init(model, TASKS), built.trainable)
  assert trainable['encoder_input_adapter']['text']['down'].shape == (3, CFG.d_model, 4)
  bank = _randomize(trainable, 7)
  params = peft.merge(bank, base)
  mixed = _logits(model, params, TASKS)
  # One single-task model per task, fed the bank's slice: no reload of the base.
  single_built, single = _built(method='adalink', rank=4, decoder_inputs=True)
  for task in range(3):
    alone = _logits(model, params, jnp.full((B,), task, jnp.int32))
    one = jax.tree.map(lambda p: p[task], bank)
    ref = _logits(single, peft.merge(one, base))
    np.testing.assert_allclose(np.asarray(alone), np.asarray(ref), atol=1e-5)
    rows = np.asarray(TASKS) == task
    np.testing.assert_allclose(np.asarray(mixed)[rows], np.asarray(alone)[rows], atol=1e-5)
  # Different tasks really give different outputs.
  t0 = _logits(model, params, jnp.zeros((B,), jnp.int32))
  t1 = _logits(model, params, jnp.ones((B,), jnp.int32))
  assert float(jnp.max(jnp.abs(t0 - t1))) > 1e-3
  with pytest.raises(ValueError, match='task_id'):
    _logits(model, params, None)


# ------------------------------------------------------------------ folding


@pytest.mark.parametrize('activation', ['identity', 'gelu'])
def test_fold_text_adapter_into_embedding_table(activation):
  base_model, base = _base()
  built, model = _built(method='adalink', rank=6, activation=activation, use_bias=True)
  trainable, _ = peft.split(_init(model), built.trainable)
  trainable = _randomize(trainable, 11)
  params = peft.merge(trainable, base)
  want = _logits(model, params)
  table = peft.fold_text_embedding(base['token_embedder']['embedding'],
                                   trainable['encoder_input_adapter']['text'], activation)
  assert table.shape == base['token_embedder']['embedding'].shape
  # Serve: the image adapter stays an adapter; text needs nothing but the folded table.
  served = t5.T5(CFG, encoder_input_adapter=peft.AdaLink(
      ('image',), (6,), activation=activation, use_bias=True))
  enc_params = peft.folded_encoder_params(params, table)
  assert set(enc_params['encoder_input_adapter']) == {'image'}
  encoded, mask = served.apply({'params': enc_params}, ENC, IMG, method=served.encode)
  got = served.apply({'params': params}, encoded, mask, DEC, method=served.decode)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  # Text-only inputs: a completely plain T5 serves the folded adapter.
  want_text = model.apply({'params': params}, ENC, DEC)
  encoded, mask = base_model.apply({'params': peft.folded_encoder_params(base, table)}, ENC,
                                   method=base_model.encode)
  got_text = base_model.apply({'params': base}, encoded, mask, DEC, method=base_model.decode)
  np.testing.assert_allclose(np.asarray(got_text), np.asarray(want_text), atol=1e-5)
  assert float(jnp.max(jnp.abs(want_text - base_model.apply({'params': base}, ENC, DEC)))) > 1e-3


def test_fold_bank_picks_one_task():
  d = CFG.d_model
  text = _randomize({'down': jnp.zeros((2, d, 3)), 'up': jnp.zeros((2, 3, d))}, 2)
  table = jnp.asarray(np.random.default_rng(0).normal(size=(10, d)), jnp.float32)
  got = peft.fold_text_embedding(table, text, task=1)
  want = np.asarray(table, np.float64)
  down, up = (np.asarray(text[k][1], np.float64) for k in ('down', 'up'))
  want = want + want @ down @ up
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  with pytest.raises(ValueError, match='bank'):
    peft.fold_text_embedding(table, text)


# ------------------------------------------------------------------ prompt tuning


def test_prompt_tuning_prepends_prompt_with_vocab_init():
  _, base = _base()
  table = base['token_embedder']['embedding']
  built = peft.build(dict(method='prompt', prompt_length=5, prompt_init='vocab',
                          prompt_vocab_first_n=50), CFG, embedding_table=table)
  model = t5.T5(built.model_config, built.encoder_input_adapter)
  trainable, _ = peft.split(_init(model), built.trainable)
  prompt = np.asarray(trainable['encoder_input_adapter']['prompt'])
  assert prompt.shape == (5, CFG.d_model)
  # Every prompt row is one of the first 50 vocabulary embeddings.
  dist = np.abs(prompt[:, None, :] - np.asarray(table)[None, :50]).max(-1)
  assert (dist.min(1) == 0).all()
  params = peft.merge(trainable, base)
  inputs = model.apply({'params': params}, ENC, IMG, method=model.embed_inputs)
  out = model.apply({'params': params}, inputs, method=lambda m, x: m.encoder_input_adapter(x))
  assert out.embeddings.shape == (B, 5 + N_IMG + L, CFG.d_model)
  np.testing.assert_array_equal(np.asarray(out.embeddings[:, :5]),
                                np.broadcast_to(prompt, (B, 5, CFG.d_model)))
  np.testing.assert_array_equal(np.asarray(out.embeddings[:, 5:]), np.asarray(inputs.embeddings))
  np.testing.assert_array_equal(np.asarray(out.mask[:, :5]), True)
  np.testing.assert_array_equal(np.asarray(out.mask[:, 5:]), np.asarray(inputs.mask))
  np.testing.assert_array_equal(np.asarray(out.modality[:, :5]), peft.PROMPT)
  _, mask = model.apply({'params': params}, ENC, IMG, method=model.encode)
  assert mask.shape == (B, 5 + N_IMG + L)
  # Without a table (the trainer builds the model before loading the backbone) the method's
  # after_load hook draws the prompt from the loaded table (tests/test_train.py end to end).
  late = peft.build(dict(method='prompt', prompt_length=5, prompt_init='vocab',
                         prompt_vocab_first_n=50), CFG)
  cfg = peft.parse(dict(method='prompt', prompt_length=5, prompt_init='vocab',
                        prompt_vocab_first_n=50))
  from adalink_jax.peft import registry  # pylint: disable=g-import-not-at-top
  drawn, _ = peft.split(_init(t5.T5(late.model_config, late.encoder_input_adapter)), late.trainable)
  drawn = registry.get('prompt').after_load(cfg, drawn, table, jax.random.key(1))
  dist = np.abs(np.asarray(drawn['encoder_input_adapter']['prompt'])[:, None, :] -
                np.asarray(table)[None, :50]).max(-1)
  assert (dist.min(1) == 0).all()


# ------------------------------------------------------------------ counts and config


def test_adalink_param_count_palix_32b_is_1048576():
  cfg = t5.t5_config('palix_32b')
  assert cfg.d_model == 4096
  built = peft.build(dict(method='adalink', rank=64, modalities=('text', 'image'),
                          use_bias=False), cfg)
  x = jax.ShapeDtypeStruct((1, 8, cfg.d_model), jnp.float32)
  inputs = t5.EncoderInputs(x, jax.ShapeDtypeStruct((1, 8), bool),
                            jax.ShapeDtypeStruct((1, 8), jnp.int32))
  shapes = jax.eval_shape(built.encoder_input_adapter.init, jax.random.key(0), inputs)
  counts = peft.param_counts({'encoder_input_adapter': shapes['params']}, built.trainable)
  assert counts['trainable'] == 1_048_576 == 2 * 2 * 4096 * 64
  assert counts['groups']['encoder_input_adapter/text']['params'] == 524_288
  assert counts['groups']['encoder_input_adapter/image']['params'] == 524_288
  # Whole 32B-class model, shapes only (nothing allocated): same trainable count.
  model = t5.T5(built.model_config.replace(scan_layers=True), built.encoder_input_adapter)
  full = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 2), jnp.int32),
      image_embeddings=jnp.ones((1, 2, cfg.d_model)))['params'])
  counts = peft.param_counts(full, built.trainable)
  assert counts['trainable'] == 1_048_576 and counts['frozen'] > 30e9
  table = peft.param_table(counts)
  print('\n' + table)
  assert '1,048,576' in table and 'encoder_input_adapter/image' in table
  # A bank of 3 tasks: 3x the parameters, 1,048,576 per task.
  bank = peft.build(dict(method='adalink', rank=64, num_tasks=3), cfg)
  shapes = jax.eval_shape(bank.encoder_input_adapter.init, jax.random.key(0),
                          inputs._replace(task_id=jax.ShapeDtypeStruct((1,), jnp.int32)))
  counts = peft.param_counts({'encoder_input_adapter': shapes['params']}, bank.trainable, 3)
  assert counts['trainable'] == 3 * 1_048_576 and counts['per_task'] == 1_048_576


@pytest.mark.parametrize('peft_cfg,field', [
    (dict(method='adalnk'), 'method'),
    (dict(method='adalink', ranks=8), 'ranks'),
    (dict(method='adalink', modalities=('text', 'audio')), 'modalities'),
    (dict(method='adalink', activation='swish2'), 'activation'),
    (dict(method='adalink', rank={'text': 4}), 'rank'),
    (dict(method='lora', lora_targets=('qkv',)), 'lora_targets'),
    (dict(method='adapter', adapter_where=('cross',)), 'adapter_where'),
    (dict(method='lora', num_tasks=2), 'num_tasks'),
])
def test_config_errors_name_the_field(peft_cfg, field):
  with pytest.raises(ValueError, match=field):
    peft.build(peft_cfg, CFG)


def test_lora_targets_select_projections():
  """LoRA on 'wi' alone adapts every input projection of the gated MLP and nothing else."""
  built = peft.build(dict(method='lora', rank=2, lora_targets=('query', 'wi')), CFG)
  model = t5.T5(built.model_config)
  tok = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tok, tok)['params']
  lora_paths = sorted(k for k in peft.methods._flat(shapes) if '/lora/' in k)
  layer = [k.split('/', 2)[2] for k in lora_paths if k.startswith('encoder/layers_0/')]
  assert sorted({p.rsplit('/lora/', 1)[0] for p in layer}) == [
      'attention/query', 'mlp/wi_0', 'mlp/wi_1']


def test_trainable_predicates():
  paths = ['encoder_input_adapter/text/down', 'decoder_input_adapter/text/up',
           'encoder/layers_0/attention/query/lora/lora_a',
           'encoder/layers_0/attention/query/kernel',
           'decoder/layers_1/mlp_adapter/up_kernel', 'token_embedder/embedding']
  pick = lambda m: [p for p in paths if peft.trainable_predicate(dict(method=m))(p)]
  assert pick('adalink') == paths[:2]
  assert pick('prompt') == paths[:1]
  assert pick('lora') == paths[2:3]
  assert pick('adapter') == paths[4:5]
  assert pick('ft') == paths


# ------------------------------------------------------------------ artifacts


def test_adapter_artifact_round_trip_switching_and_refusal(tmp_path):
  base_model, base = _base()
  peft_cfg = dict(method='adalink', rank=4)
  built, model = _built(**peft_cfg)
  init, _ = peft.split(_init(model), built.trainable)
  task_a, task_b = _randomize(init, 21), _randomize(init, 22)
  for name, tr in (('a', task_a), ('b', task_b)):
    peft.save_adapter(str(tmp_path / name), tr, base, peft_cfg, 't5_1_1_tiny',
                      extra={'task': name})
  assert sorted(os.listdir(tmp_path / 'a')) == ['adapter.safetensors', 'adapter_card.json']
  # The tensors file is plain safetensors: the reference reader sees our names and values.
  raw = safetensors.numpy.load_file(str(tmp_path / 'a' / 'adapter.safetensors'))
  assert sorted(raw) == ['encoder_input_adapter/image/down', 'encoder_input_adapter/image/up',
                         'encoder_input_adapter/text/down', 'encoder_input_adapter/text/up']
  np.testing.assert_array_equal(raw['encoder_input_adapter/text/up'],
                                np.asarray(task_a['encoder_input_adapter']['text']['up']))
  card = json.loads((tmp_path / 'a' / 'adapter_card.json').read_text())
  assert card['method'] == 'adalink' and card['ranks'] == {'text': 4, 'image': 4}
  assert card['modalities'] == ['text', 'image'] and card['num_tasks'] == 1
  assert card['base_model'] == 't5_1_1_tiny' and card['num_params'] == 2 * 2 * 4 * CFG.d_model
  assert card['base_hash'] == peft.base_hash(base) and len(card['base_hash']) == 64
  # The hash depends on values only, not on the array type holding them (it is computed on
  # device, sharding-invariant: tests/test_fingerprint.py), and the card says which kind it is.
  assert peft.base_hash(jax.tree.map(np.array, base)) == card['base_hash']
  assert card['base_hash_kind'] == artifacts.HASH_KIND
  # Cards written before the kind existed hold the documented sha256 recipe over sorted leaves
  # of 'path|dtype|[shape]|' + little-endian bytes; they are still checked against a base.
  recipe = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(base, sep='/').items()):
    leaf = np.asarray(leaf)
    recipe.update(f'{path}|{leaf.dtype.name}|{list(leaf.shape)}|'.encode() + leaf.tobytes())
  assert recipe.hexdigest() == artifacts.legacy_base_hash(base)
  old = dict(card, base_hash=recipe.hexdigest())
  del old['base_hash_kind']
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'adapter_card.json').write_text(json.dumps(old))
  shutil.copy(tmp_path / 'a' / 'adapter.safetensors', tmp_path / 'old')
  peft.load_adapter(str(tmp_path / 'old'), base, template=init)
  (tmp_path / 'old' / 'adapter_card.json').write_text(json.dumps(dict(old, base_hash='0' * 64)))
  with pytest.raises(ValueError, match='different weights'):
    peft.load_adapter(str(tmp_path / 'old'), base, template=init)

  # Switch tasks on the same base object: nothing about the base is reloaded.
  for name, tr in (('a', task_a), ('b', task_b)):
    loaded, card = peft.load_adapter(str(tmp_path / name), base, template=init)
    assert card['extra'] == {'task': name}
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 loaded, tr)
    np.testing.assert_array_equal(np.asarray(_logits(model, peft.merge(loaded, base))),
                                  np.asarray(_logits(model, peft.merge(tr, base))))
  la = _logits(model, peft.merge(task_a, base))
  lb = _logits(model, peft.merge(task_b, base))
  assert float(jnp.max(jnp.abs(la - lb))) > 1e-3

  # Same shapes, one weight changed -> refused with both hashes; force=True loads.
  other = jax.tree.map(lambda x: x, base)
  norm = other['encoder']['encoder_norm']
  norm['scale'] = norm['scale'].at[0].add(1e-3)
  with pytest.raises(ValueError, match='different weights: base hash'):
    peft.load_adapter(str(tmp_path / 'a'), other)
  loaded, _ = peft.load_adapter(str(tmp_path / 'a'), other, force=True)
  np.testing.assert_array_equal(np.asarray(loaded['encoder_input_adapter']['text']['down']),
                                np.asarray(task_a['encoder_input_adapter']['text']['down']))
  # Different shapes -> the error names the parameter and both shapes.
  wide = t5.T5(CFG.replace(d_ff=96))
  wide_params = jax.eval_shape(lambda: nn.unbox(wide.init(jax.random.key(0), ENC, DEC)['params']))
  wide_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), wide_params)
  with pytest.raises(ValueError, match=r'encoder/layers_0/mlp/wi_0/kernel: adapter\'s base '
                                       r'\[\[32, 64\], \'float32\'\] vs given \[\[32, 96\]'):
    peft.load_adapter(str(tmp_path / 'a'), wide_params)
  # A bf16 copy of the base is a different base, too.
  with pytest.raises(ValueError, match='bfloat16'):
    peft.load_adapter(str(tmp_path / 'a'), peft.cast(base, jnp.bfloat16))
  # Adapter tensors that do not fit the model are refused by name.
  _, wrong = _built(method='adalink', rank=8)
  wrong_init, _ = peft.split(_init(wrong), built.trainable)
  with pytest.raises(ValueError, match=r'encoder_input_adapter/text/down: '
                                       r'file \[32, 4\] vs model \[32, 8\]'):
    peft.load_adapter(str(tmp_path / 'a'), base, template=wrong_init)
