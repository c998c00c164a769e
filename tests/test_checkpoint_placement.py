"""streaming.place: the one routine every checkpoint reader ends in (check once, then stream)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from adalink_jax.checkpoints import common, hf, hf_gemma, paligemma, streaming


class _Recording(hf.SafetensorsSource):
  """The real safetensors reader, recording the index of every read."""

  def __init__(self, base: hf.SafetensorsSource):
    super().__init__(base.file, base.name, base.shape, base.dtype, base.offset)
    self.reads = []

  def read(self, index=()):
    self.reads.append(streaming.normalize_index(index, self.shape))
    return super().read(index)


@pytest.fixture
def stored(tmp_path):
  values = {'w': np.arange(8 * 12, dtype=np.float32).reshape(8, 12) / 7,
            'b': np.linspace(-1, 1, 12).astype(np.float32),
            'ids': np.arange(6, dtype=np.int32)}
  file = tmp_path / 'model.safetensors'
  save_file(values, str(file))
  return values, {n: _Recording(s) for n, s in hf.safetensors_sources([file]).items()}


def _shapes(**shapes):
  return {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}


def test_mismatch_lists_missing_unexpected_and_wrong_shape(stored):
  _, sources = stored
  expected = {'layer': _shapes(w=(8, 12), b=(10,)), 'norm': _shapes(scale=(12,))}
  renamed = {'layer/w': sources['w'], 'layer/b': sources['b'], 'ids': sources['ids']}
  with pytest.raises(common.CheckpointMismatchError) as err:
    streaming.place(renamed, expected, where='test checkpoint', unexpected=['odd.tensor'],
                    notes={'layer/b': 'from b'})
  e = err.value
  assert e.missing == ['norm/scale']
  assert e.unexpected == ['ids', 'odd.tensor']
  assert e.mismatched == [('layer/b', (10,), (12,))]
  msg = str(e)
  assert msg.startswith('test checkpoint does not match the model:')
  assert 'missing from the checkpoint (1):\n  norm/scale' in msg
  assert 'unexpected (not in the model) (2):\n  ids\n  odd.tensor' in msg
  assert 'layer/b  (from b): (10,) vs (12,)' in msg
  assert all(not s.reads for s in sources.values())  # refused before any data was read


def test_sharded_target_gets_its_values_per_shard(stored):
  values, sources = stored
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('x', 'y'))
  expected = {'w': jax.ShapeDtypeStruct((8, 12), jnp.float32),
              'b': jax.ShapeDtypeStruct((12,), jnp.float32),
              'ids': jax.ShapeDtypeStruct((6,), jnp.int32),
              'adapter': np.full((3,), 5.0, np.float32)}
  shardings = {'w': NamedSharding(mesh, P('x', 'y')), 'b': NamedSharding(mesh, P('y')),
               'ids': NamedSharding(mesh, P()), 'adapter': NamedSharding(mesh, P())}
  out = streaming.place({n: sources[n] for n in ('w', 'b', 'ids')}, expected,
                        shardings=shardings, dtype=jnp.bfloat16, skip=lambda n: n == 'adapter')
  w = out['w']
  assert w.dtype == jnp.bfloat16 and w.sharding == shardings['w']
  assert len(w.addressable_shards) == 8
  for shard in w.addressable_shards:
    assert shard.data.shape == (4, 3)
    np.testing.assert_array_equal(np.asarray(shard.data),
                                  values['w'][shard.index].astype(jnp.bfloat16))
  # Each of the 8 distinct [4, 3] blocks was read on its own; never the whole array.
  assert sorted((s[0].start, s[1].start) for s in sources['w'].reads) == [
      (r, c) for r in (0, 4) for c in (0, 3, 6, 9)]
  for shard in out['b'].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data),
                                  values['b'][shard.index].astype(jnp.bfloat16))
  assert len(sources['b'].reads) == 4  # replicated over 'x': one read per distinct slice
  assert out['ids'].dtype == jnp.int32  # integers are not cast
  np.testing.assert_array_equal(np.asarray(out['ids']), values['ids'])
  assert out['adapter'] is expected['adapter']  # skipped leaves come back as given


def test_shardings_tree_and_host_reads(stored):
  values, sources = stored
  expected = _shapes(w=(8, 12), b=(12,))
  mesh = Mesh(np.array(jax.devices()[:8]), ('x',))
  with pytest.raises(ValueError, match=r"no sharding for \['b'\]; pass one Sharding"):
    streaming.place({n: sources[n] for n in expected}, expected,
                    shardings={'w': NamedSharding(mesh, P()), 'c': NamedSharding(mesh, P())})
  assert not sources['w'].reads
  host = streaming.place({n: sources[n] for n in expected}, expected,
                         shardings=streaming.ON_HOST, dtype=jnp.float16)
  assert isinstance(host['w'], np.ndarray) and host['w'].dtype == np.float16
  np.testing.assert_array_equal(host['w'], values['w'].astype(np.float16))


def test_load_hf_gemma_reads_a_paligemma_folder_and_refuses_bidirectional_gemma(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
  config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision,
                                        projection_dim=32, image_token_index=127)
  torch.manual_seed(0)
  transformers.PaliGemmaForConditionalGeneration(config).save_pretrained(tmp_path)
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['text_config']['use_bidirectional_attention'] is True  # what HF writes
  cfg, params = hf_gemma.load_hf_gemma(tmp_path)
  pg_cfg, pg_params = paligemma.load_hf_paligemma(tmp_path, shardings=streaming.ON_HOST)
  assert cfg == pg_cfg.llm and (cfg.d_model, cfg.num_layers, cfg.num_kv_heads) == (32, 2, 1)
  flat, pg_flat = common.flatten(params), common.flatten(pg_params['llm'])
  assert set(flat) == set(pg_flat)
  for name, value in flat.items():
    np.testing.assert_array_equal(value, pg_flat[name], err_msg=name)
  g3 = transformers.Gemma3TextConfig(**text, use_bidirectional_attention=True).to_dict()
  with pytest.raises(ValueError, match='use_bidirectional_attention=true: bidirectional'):
    hf_gemma.config_from_hf(g3)


class _CountingSource(streaming.NumpySource):
  """An in-memory tensor, counting whole-array reads of it."""

  def __init__(self, array, name):
    super().__init__(array, name)
    self.reads = []

  def read(self, index=()):
    index = streaming.normalize_index(index, self.shape)
    self.reads.append(tuple(s.stop - s.start for s in index))
    return super().read(index)


def test_gemma_embedding_is_read_once_and_a_tied_head_only_compared():
  import torch  # pylint: disable=g-import-not-at-top
  config = transformers.GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=8)
  torch.manual_seed(0)
  state = {k: v.numpy() for k, v in transformers.GemmaForCausalLM(config).state_dict().items()}
  cfg = hf_gemma.config_from_hf(config.to_dict())
  embed = 'model.embed_tokens.weight'
  no_head = {k: _CountingSource(v, k) for k, v in state.items() if k != 'lm_head.weight'}
  params = hf_gemma.params_from_sources(no_head, cfg)
  assert no_head[embed].reads == [(64, 16)]  # once, to place it; nothing else reads it
  np.testing.assert_array_equal(params['embedder']['input_embedding'], state[embed])
  with_head = {k: _CountingSource(v, k) for k, v in state.items()}
  with_head['lm_head.weight'] = _CountingSource(state[embed].copy(), 'lm_head.weight')
  hf_gemma.params_from_sources(with_head, cfg)
  # The head is compared (hf.same_values, in row blocks: one here) and never placed.
  assert with_head['lm_head.weight'].reads == [(64, 16)]
  assert with_head[embed].reads == [(64, 16), (64, 16)]
