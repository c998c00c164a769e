"""HF safetensors T5 loader: forward parity with HF PyTorch T5 and clear errors.

Reference: random small ``transformers.T5ForConditionalGeneration`` models (which we did
not write) saved with ``save_pretrained``; we load the files and compare encoder outputs
and logits in fp32, with padded encoder inputs longer than ``relative_attention_max_distance``.
"""
import copy
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

from adalink_jax.checkpoints import common, hf  # pylint: disable=g-import-not-at-top
from adalink_jax.models import t5  # pylint: disable=g-import-not-at-top
from adalink_jax.peft import lora  # pylint: disable=g-import-not-at-top

ENC_LEN, DEC_LEN, PAD_FROM = 40, 30, 27  # row 1 of the batch is padded from PAD_FROM on

_VARIANTS = {
    # FLAN-T5 / T5 1.1 files: gated GELU, unscaled head with its own lm_head.weight.
    'v11': dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False, vocab_size=300,
                d_ff=128, num_layers=3, num_decoder_layers=2,
                relative_attention_num_buckets=16, relative_attention_max_distance=20),
    # What HF 5 builds for tie_word_embeddings=False: unscaled head that *is* the embedding.
    'v11_tied': dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False, vocab_size=300,
                     d_ff=128, num_layers=2, num_decoder_layers=2,
                     relative_attention_num_buckets=16, relative_attention_max_distance=20),
    # T5 1.0: ReLU, head tied to the embedding and scaled by d_model**-0.5.
    'v10': dict(feed_forward_proj='relu', tie_word_embeddings=True, vocab_size=256, d_ff=96,
                num_layers=2, num_decoder_layers=3,
                relative_attention_num_buckets=8, relative_attention_max_distance=12),
}


def _build_hf(name, seed):
  torch.manual_seed(seed)
  cfg = transformers.T5Config(d_model=64, d_kv=16, num_heads=4, dropout_rate=0.0,
                              decoder_start_token_id=0, **_VARIANTS[name])
  model = transformers.T5ForConditionalGeneration(cfg).float().eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      # Non-trivial norms and strong position biases, so any mis-mapping shows in the output.
      if 'layer_norm' in pname:
        p.uniform_(0.5, 1.5)
      elif 'relative_attention_bias' in pname:
        p.normal_(0.0, 1.0)
    if name == 'v11':
      model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))
  return model


def _inputs(vocab, seed):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (2, ENC_LEN))
  enc[1, PAD_FROM:] = 0
  dec = rng.integers(2, vocab, (2, DEC_LEN))
  dec[:, 0] = 0  # decoder_start_id
  return enc, dec


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
  """name -> (checkpoint dir, HF encoder output, HF logits, enc ids, dec ids)."""
  out = {}
  for seed, name in enumerate(_VARIANTS):
    model = _build_hf(name, seed)
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    enc, dec = _inputs(model.config.vocab_size, seed)
    with torch.no_grad():
      res = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                  decoder_input_ids=torch.tensor(dec))
    out[name] = (d, res.encoder_last_hidden_state.numpy(), res.logits.numpy(), enc, dec, model)
  return out


def _forward(cfg, params, enc, dec):
  model = t5.T5(cfg)

  def run(m, e, d):
    encoded, mask = m.encode(e)
    return encoded, m.decode(encoded, mask, d)

  f = jax.jit(lambda p, e, d: model.apply({'params': p}, e, d, method=run))
  encoded, logits = f(params, jnp.asarray(enc, jnp.int32), jnp.asarray(dec, jnp.int32))
  return np.asarray(encoded), np.asarray(logits)


def _flat_equal(a, b):
  fa, fb = common.flatten(a), common.flatten(b)
  assert sorted(fa) == sorted(fb)
  for n in fa:
    np.testing.assert_array_equal(np.asarray(fa[n]), np.asarray(fb[n]), err_msg=n)


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize('name', list(_VARIANTS))
def test_forward_parity_fp32(ckpts, name):
  d, hf_enc, hf_logits, enc, dec, _ = ckpts[name]
  cfg, params = hf.load_hf_t5(d)
  assert cfg.mlp_activations == (('relu',) if name == 'v10' else ('gelu', 'linear'))
  assert cfg.tie_embeddings == (name == 'v10')
  assert ('logits_dense' in params['decoder']) == (name != 'v10')
  assert cfg.relative_attention_max_distance < ENC_LEN
  encoded, logits = _forward(cfg, params, enc, dec)
  print(name, 'max |enc diff|', np.abs(encoded - hf_enc).max(),
        'max |logit diff|', np.abs(logits - hf_logits).max(),
        'max |logit|', np.abs(hf_logits).max())
  np.testing.assert_allclose(encoded, hf_enc, atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', ['v11', 'v10'])
def test_scan_layers_same_logits(ckpts, name):
  d, hf_enc, hf_logits, enc, dec, _ = ckpts[name]
  base, _ = hf.load_hf_t5(d)
  cfg, params = hf.load_hf_t5(d, config=base.replace(scan_layers=True))
  assert cfg.scan_layers
  q = params['encoder']['layers']['attention']['query']['kernel']
  assert q.shape == (base.num_encoder_layers, 64, 64)
  assert params['decoder']['layers']['mlp']['wo']['kernel'].shape[0] == base.num_decoder_layers
  encoded, logits = _forward(cfg, params, enc, dec)
  np.testing.assert_allclose(encoded, hf_enc, atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0)


def test_relative_buckets_match_hf_beyond_max_distance():
  rel = np.arange(-150, 151)[None, :]
  hf_bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for bidirectional in (True, False):
    for buckets, max_distance in ((8, 12), (16, 20), (32, 128)):
      ours = t5.relative_position_bucket(rel, bidirectional, buckets, max_distance)
      ref = hf_bucket(torch.tensor(rel), bidirectional, buckets, max_distance).numpy()
      np.testing.assert_array_equal(ours, ref)


def test_static_and_traced_offsets_give_the_same_bias():
  """Static positions take the numpy-bucket gather; a traced offset (decoding) the one-hot
  contraction. Both must give the same bias, bit for bit, and the jnp buckets the numpy ones."""
  rel = np.arange(-700, 701, dtype=np.int32)[None, :]
  for bidirectional in (True, False):
    np.testing.assert_array_equal(
        t5.relative_position_bucket(rel, bidirectional, 32, 128),
        np.asarray(t5.relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128)))
    mod = t5.RelativePositionBias(32, 128, 3, bidirectional)
    params = mod.init(jax.random.PRNGKey(0), 5, 600)
    for offset in (0, 7):
      static = mod.apply(params, 5, 600, offset)
      traced = jax.jit(lambda o: mod.apply(params, 5, 600, o))(jnp.int32(offset))
      assert static.shape == (1, 3, 5, 600)
      np.testing.assert_array_equal(static, traced)


def test_far_positions_change_the_output(ckpts):
  """Control: the parity inputs are long enough that the far buckets matter."""
  d, _, hf_logits, enc, dec, _ = ckpts['v11']
  cfg, params = hf.load_hf_t5(d)
  _, logits = _forward(cfg.replace(relative_attention_max_distance=ENC_LEN), params, enc, dec)
  assert np.abs(logits - hf_logits).max() > 1e-2


# ------------------------------------------------------------------ every T5-family config
# What transformers 4.x and 5.x write for each variant, loaded by HF's own from_pretrained
# (the reference) and by us: same logits and loss. transformers 5 writes
# tie_word_embeddings=true for every variant (plus scale_decoder_outputs for T5); 4.x wrote
# nothing (t5-small) or tie_word_embeddings=false (T5 1.1 / FLAN-T5 / mT5).

_TINY = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
             vocab_size=200, relative_attention_num_buckets=8,
             relative_attention_max_distance=12, dropout_rate=0.0, decoder_start_token_id=0)
_GATED = dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False)
# name: (HF class, config kwargs, own lm_head.weight in the file, 4.x config.json or None,
#        HF scales the decoder output)
_FAMILY = {
    't5': ('T5', dict(feed_forward_proj='relu'), False, None, True),
    't5_hf4': ('T5', dict(feed_forward_proj='relu'), False, 't5', True),
    't5_v1_1': ('T5', _GATED, True, None, False),
    'flan_t5_hf4': ('T5', _GATED, True, 'flan_t5', False),
    'mt5': ('MT5', {}, True, None, False),  # google/mt5-* re-saved by transformers 5 (the bug)
    'mt5_tied': ('MT5', {}, False, None, False),  # transformers 5 MT5 built from scratch
    'mt5_hf4': ('MT5', {}, True, 'mt5', False),
}


def _as_hf4(cfg_json, kind):
  """config.json with the keys transformers 4.x wrote for that kind of checkpoint."""
  out = {k: v for k, v in cfg_json.items()
         if k not in ('scale_decoder_outputs', 'dtype', 'is_decoder', 'bos_token_id')}
  out.update(torch_dtype='float32', transformers_version='4.46.3')
  if kind == 't5':  # t5-small: relu and tied are defaults, so not written
    for k in ('tie_word_embeddings', 'feed_forward_proj', 'dense_act_fn', 'is_gated_act'):
      out.pop(k)
  else:  # FLAN-T5 / T5 1.1 / mT5: untied, unscaled
    out['tie_word_embeddings'] = False
  return out


def _labels(vocab, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(2, vocab, (2, DEC_LEN))
  labels[1, 20:] = -100  # ignored by HF's loss; weight 0 in ours
  return labels


@pytest.fixture(scope='module')
def family(tmp_path_factory):
  """name -> (dir, HF from_pretrained model, enc ids, labels, HF logits, HF loss)."""
  out = {}
  for seed, (name, (kind, kw, own_head, hf4, _)) in enumerate(_FAMILY.items()):
    torch.manual_seed(100 + seed)
    cls = getattr(transformers, f'{kind}ForConditionalGeneration')
    model = cls(getattr(transformers, f'{kind}Config')(**_TINY, **kw)).float().eval()
    with torch.no_grad():
      for pname, p in model.named_parameters():
        if 'layer_norm' in pname:
          p.uniform_(0.5, 1.5)
      if own_head:
        model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(200, 32))
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    if hf4:
      cfg_json = _as_hf4(json.loads((d / 'config.json').read_text()), hf4)
      (d / 'config.json').write_text(json.dumps(cfg_json))
    ref = cls.from_pretrained(d).float().eval()  # the reference: HF's own reading of the files
    enc, _ = _inputs(200, 100 + seed)
    labels = _labels(200, seed)
    with torch.no_grad():
      res = ref(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                labels=torch.tensor(labels))
    out[name] = (d, ref, enc, labels, res.logits.numpy(), float(res.loss))
  return out


@pytest.mark.parametrize('name', list(_FAMILY))
def test_logits_and_loss_match_hf_from_pretrained(family, name):
  from adalink_jax.peft import train  # pylint: disable=g-import-not-at-top
  d, ref, enc, labels, hf_logits, hf_loss = family[name]
  _, kw, own_head, hf4, scaled = _FAMILY[name]
  saved = json.loads((d / 'config.json').read_text())
  # The files are what the issue is about: 5.x says tie=true for all, 4.x as described.
  assert saved.get('tie_word_embeddings', True) is (not hf4 or hf4 == 't5')
  # HF itself scales exactly where this table says (T5 by config, MT5 never).
  assert getattr(ref.config, 'scale_decoder_outputs', False) is scaled
  assert (ref.lm_head.weight.data_ptr() == ref.shared.weight.data_ptr()) is (not own_head)

  cfg, params = hf.load_hf_t5(d)
  assert cfg.mlp_activations == (('relu',) if kw.get('feed_forward_proj') == 'relu'
                                 else ('gelu', 'linear'))
  assert cfg.tie_embeddings is (scaled and not own_head)
  targets = np.where(labels < 0, 0, labels)
  dec = np.asarray(t5.shift_right(jnp.asarray(targets), cfg.decoder_start_id))
  _, logits = _forward(cfg, params, enc, dec)
  loss, _ = train.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                      jnp.asarray(labels >= 0))
  print(name, 'max |logit diff|', np.abs(logits - hf_logits).max(), 'max |logit|',
        np.abs(hf_logits).max(), 'loss', float(loss), hf_loss)
  np.testing.assert_allclose(logits, hf_logits, atol=2e-5, rtol=0)
  np.testing.assert_allclose(float(loss), hf_loss, atol=2e-5, rtol=0)


def test_umt5_files_are_refused_with_the_reason(tmp_path):
  """UMT5 (one relative position bias per layer) is not a T5 block structure: refused."""
  torch.manual_seed(0)
  cfg = transformers.UMT5Config(**{k: v for k, v in _TINY.items()})
  transformers.UMT5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
  with pytest.raises(ValueError) as info:
    hf.load_hf_t5(tmp_path)
  msg = str(info.value)
  assert "model_type='umt5' is not supported" in msg
  assert 'own relative position bias' in msg and 'mT5' in msg


# ------------------------------------------------------------------ formats


def test_config_from_hf_variants():
  base = dict(vocab_size=100, d_model=8, d_kv=2, d_ff=16, num_layers=3, num_heads=4)
  c = hf.t5_config_from_hf({**base, 'feed_forward_proj': 'gated-gelu',
                            'tie_word_embeddings': False})  # HF 4 FLAN-T5 config.json
  assert (c.mlp_activations, c.tie_embeddings, c.num_decoder_layers) == (
      ('gelu', 'linear'), False, 3)
  c = hf.t5_config_from_hf({**base, 'tie_word_embeddings': True,
                            'scale_decoder_outputs': False})  # HF 5 writes both
  assert (c.mlp_activations, c.tie_embeddings) == (('relu',), False)
  assert hf.t5_config_from_hf(base).tie_embeddings  # T5 1.0 default
  assert hf.t5_config_from_hf({**base, 'feed_forward_proj': 'gated-silu'}).mlp_activations == (
      'silu', 'linear')
  assert hf.t5_config_from_hf({**base, 'feed_forward_proj': 'gelu'}).mlp_activations == (
      'gelu_exact',)
  c = hf.t5_config_from_hf({**base, 'num_decoder_layers': 5, 'eos_token_id': [1, 7],
                            'pad_token_id': 3, 'relative_attention_max_distance': 64})
  assert (c.num_decoder_layers, c.eos_id, c.pad_id, c.decoder_start_id,
          c.relative_attention_max_distance) == (5, 1, 3, 3, 64)
  with pytest.raises(ValueError, match='umt5'):
    hf.t5_config_from_hf({**base, 'model_type': 'umt5'})
  # mT5: HF's MT5 never scales, whatever tie_word_embeddings / scale_decoder_outputs say, and
  # its feed_forward_proj default is gated-gelu.
  mt5 = {**base, 'model_type': 'mt5'}
  for extra in ({}, {'tie_word_embeddings': True}, {'tie_word_embeddings': False},
                {'scale_decoder_outputs': True, 'tie_word_embeddings': True}):
    c = hf.t5_config_from_hf({**mt5, **extra})
    assert (c.tie_embeddings, c.mlp_activations) == (False, ('gelu', 'linear')), extra
  with pytest.raises(ValueError, match='feed_forward_proj'):
    hf.t5_config_from_hf({**base, 'feed_forward_proj': 'gated-weird'})


def test_mt5_tied_in_hf4_warns_that_hf4_scaled(caplog):
  """HF 4's MT5 scaled when tie_word_embeddings was true; HF 5 does not, nor do we: said."""
  base = dict(vocab_size=100, d_model=8, d_kv=2, d_ff=16, num_layers=3, num_heads=4,
              model_type='mt5', tie_word_embeddings=True)
  with caplog.at_level(logging.WARNING, logger='adalink_jax.checkpoints.hf'):
    assert not hf.scales_decoder_output({**base, 'transformers_version': '5.24.0'})
    assert not caplog.records
    assert not hf.scales_decoder_output({**base, 'transformers_version': '4.46.3'})
  assert len(caplog.records) == 1
  assert 'transformers 4.46.3, which scaled the decoder output' in caplog.text


def test_legacy_hf4_files_load_identically(ckpts, tmp_path):
  """HF 4 style: tie_word_embeddings=False instead of scale_decoder_outputs, embedding copies."""
  d = ckpts['v11'][0]
  cfg_json = json.loads((d / 'config.json').read_text())
  cfg_json.pop('scale_decoder_outputs')
  cfg_json['tie_word_embeddings'] = False
  (tmp_path / 'config.json').write_text(json.dumps(cfg_json))
  tensors = load_file(d / 'model.safetensors')
  tensors['encoder.embed_tokens.weight'] = tensors['decoder.embed_tokens.weight'] = (
      tensors['shared.weight'])
  save_file(tensors, tmp_path / 'model.safetensors')
  _flat_equal(hf.load_hf_t5(tmp_path)[1], hf.load_hf_t5(d)[1])


def test_sharded_and_bf16_files(ckpts, tmp_path):
  d, *_, model = ckpts['v11']
  cfg, ref = hf.load_hf_t5(d)
  model.save_pretrained(tmp_path / 'sharded', max_shard_size='40KB')
  assert (tmp_path / 'sharded' / hf.INDEX_FILE).is_file()
  assert len(list((tmp_path / 'sharded').glob('*.safetensors'))) > 1
  _flat_equal(hf.load_hf_t5(tmp_path / 'sharded')[1], ref)

  # dtype= casts every tensor; a bf16 file (read without torch) gives the same values.
  _, cast = hf.load_hf_t5(d, dtype=jnp.bfloat16)
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / 'bf16')
  _, from_bf16 = hf.load_hf_t5(tmp_path / 'bf16')
  for tree in (cast, from_bf16):
    assert {v.dtype for v in common.flatten(tree).values()} == {jnp.dtype(jnp.bfloat16)}
  _flat_equal(cast, from_bf16)
  _flat_equal(cast, jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), ref))

  # Intrusive baselines: the backbone loads unchanged, LoRA params are the caller's to init.
  _, with_lora = hf.load_hf_t5(d, config=cfg.replace(hooks=lora.hooks(rank=2)))
  _flat_equal(with_lora, ref)


# ------------------------------------------------------------------ errors


def test_wrong_d_ff_lists_every_mlp_kernel(ckpts):
  d = ckpts['v11'][0]
  cfg, _ = hf.load_hf_t5(d)
  with pytest.raises(common.CheckpointMismatchError) as info:
    hf.load_hf_t5(d, config=cfg.replace(d_ff=256))
  err = info.value
  assert not err.missing and not err.unexpected
  assert len(err.mismatched) == 3 * (cfg.num_encoder_layers + cfg.num_decoder_layers)
  assert ('encoder/layers_0/mlp/wi_0/kernel', (64, 256), (64, 128)) in err.mismatched
  assert ('decoder/layers_1/mlp/wo/kernel', (256, 64), (128, 64)) in err.mismatched
  assert ('encoder/layers_0/mlp/wi_0/kernel  (HF encoder.block.0.layer.1.DenseReluDense.wi_0.'
          'weight): (64, 256) vs (64, 128)') in str(err)


def test_deleted_and_extra_tensors_are_named(ckpts, tmp_path):
  d = ckpts['v11'][0]
  shutil.copy(d / 'config.json', tmp_path / 'config.json')
  tensors = load_file(d / 'model.safetensors')
  del tensors['encoder.block.1.layer.1.DenseReluDense.wo.weight']
  tensors['encoder.block.3.layer.0.layer_norm.weight'] = np.ones(64, np.float32)
  save_file(tensors, tmp_path / 'model.safetensors')
  with pytest.raises(common.CheckpointMismatchError) as info:
    hf.load_hf_t5(tmp_path)
  err = info.value
  assert err.missing == ['encoder/layers_1/mlp/wo/kernel']
  assert len(err.unexpected) == 1
  assert 'encoder.block.3.layer.0.layer_norm.weight' in err.unexpected[0]
  assert 'HF encoder.block.1.layer.1.DenseReluDense.wo.weight' in str(err)


def test_semantic_config_mismatch_is_rejected(ckpts):
  d = ckpts['v11'][0]
  cfg, _ = hf.load_hf_t5(d)
  with pytest.raises(ValueError, match='mlp_activations'):
    hf.load_hf_t5(d, config=cfg.replace(mlp_activations=('silu', 'linear')))
  with pytest.raises(ValueError, match='separate lm_head'):
    hf.load_hf_t5(d, config=cfg.replace(tie_embeddings=True))


def test_missing_files_say_what_and_how(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    hf.load_hf_t5(tmp_path / 'nope')
  msg = str(info.value)
  for word in ('config.json', 'model.safetensors', 'save_pretrained', 'huggingface-cli', 'nope'):
    assert word in msg
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match=r'model\.safetensors(.|\n)*pytorch_model\.bin'):
    hf.load_hf_t5(tmp_path)


def test_common_helpers():
  tree = {'a': {'b': np.zeros((2, 3)), 'c': {'d': np.ones(4)}}, 'e': np.zeros(())}
  flat = common.flatten(tree)
  assert sorted(flat) == ['a/b', 'a/c/d', 'e']
  _flat_equal(common.unflatten(flat), tree)
  expected = {f'w{i:03d}': jax.ShapeDtypeStruct((i + 1,), jnp.float32) for i in range(100)}
  with pytest.raises(common.CheckpointMismatchError) as info:
    common.check_tree(expected, {'w000': np.zeros(2), 'zzz': np.zeros(1)})
  err = info.value
  assert len(err.missing) == 99 and err.unexpected == ['zzz']
  assert err.mismatched == [('w000', (1,), (2,))]
  assert '... and 74 more' in str(err) and 'w000: (1,) vs (2,)' in str(err)
  common.check_tree(expected, {k: np.zeros(v.shape) for k, v in expected.items()})  # no raise
