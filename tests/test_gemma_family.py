"""The Gemma family through config.model / config.init: an HF checkpoint loads via the
family's ``load``, and greedy / beam decoding on the batch layout equal HF ``generate``."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import linen as nn

from adalink_jax import model_builder
from adalink_jax import partitioning
from adalink_jax.checkpoints import backbone
from adalink_jax.checkpoints import hf_gemma
from adalink_jax.checkpoints.common import CheckpointMismatchError
from tests.test_gemma import KINDS, saved  # noqa: F401  (module fixture)

PROMPTS = [[17, 90, 33, 5, 61], [44, 9], [100, 7, 7]]


def _family(path, method='ft', **model_over):
  cfg, _ = hf_gemma.load_hf_gemma(path)
  over = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if f.name not in ('dtype', 'param_dtype', 'hooks', 'layer_types')}
  over['layer_types'] = tuple(cfg.layer_types)
  over.update(model_over)
  config = ml_collections.ConfigDict(dict(
      model=dict(family='gemma', name='gemma_tiny', gemma=over),
      peft=dict(method=method), mesh=dict(data=1, fsdp=-1, model=1),
      init=dict(native='', gemma=str(path), gemma_format='hf')))
  setup = model_builder.build(config)
  batch = setup.init_batch(3, 5, 4)
  params = nn.unbox(setup.init(jax.random.key(0), batch))
  mesh = partitioning.make_mesh(data=1, fsdp=-1, model=1)
  shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                           params)
  params = backbone.load_into(config.init, params, shardings, setup)
  tokens = np.zeros((3, 5), np.int32)
  for i, p in enumerate(PROMPTS):  # right-padded, as seqio batches are
    tokens[i, :len(p)] = p
  return setup, params, dict(batch, encoder_input_tokens=jnp.asarray(tokens))


def _hf_generate(model, **kw):
  width = max(map(len, PROMPTS)) + 1
  ids = np.zeros((3, width), np.int64)
  mask = np.zeros((3, width), np.int64)
  for i, p in enumerate(PROMPTS):  # <bos> + prompt, left-padded, as HF wants for decoder-only
    ids[i, width - len(p) - 1:], mask[i, width - len(p) - 1:] = [2, *p], 1
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), pad_token_id=0,
                         eos_token_id=1, do_sample=False, **kw)[:, width:].numpy()
  return out


@pytest.mark.parametrize('kind', KINDS)
def test_greedy_and_beam_match_hf_generate(saved, kind):  # noqa: F811
  hf_model, path = saved[kind]
  setup, params, batch = _family(path)
  new = 9  # 6 + 9 slots: past the sliding window of 4
  greedy = np.asarray(setup.generate(params, batch, new))
  ref = _hf_generate(hf_model, max_new_tokens=new)
  np.testing.assert_array_equal(greedy[:, :ref.shape[1]], ref)
  assert not greedy[:, ref.shape[1]:].any()
  beam = np.asarray(setup.generate(params, batch, new, method='beam', num_beams=3,
                                   length_penalty=1.0))
  ref = _hf_generate(hf_model, max_new_tokens=new, num_beams=3, length_penalty=1.0,
                     early_stopping=False)
  np.testing.assert_array_equal(beam[:, :ref.shape[1]], ref)


def test_load_refuses_a_checkpoint_of_another_shape(saved):  # noqa: F811
  _, path = saved['gemma']
  with pytest.raises(CheckpointMismatchError, match=r'num_layers: \(2,\) vs \(3,\)'):
    _family(path, num_layers=2, layer_types=('global', 'global'))


@pytest.mark.parametrize('method', ['lora', 'ia3'])
def test_load_keeps_the_methods_hook_parameters(saved, method):  # noqa: F811
  """An intrusive method's parameters inside the blocks survive the backbone load; with them at
  their identity initialisation the model is exactly the loaded checkpoint."""
  from adalink_jax.checkpoints import common  # pylint: disable=g-import-not-at-top
  _, path = saved['gemma3']
  setup, params, batch = _family(path, method=method)
  plain, plain_params, _ = _family(path, method='ft')
  added = sorted(k for k in common.flatten(params) if k not in common.flatten(plain_params))
  assert added and all(('lora' in k) or ('ia3' in k) for k in added), added
  batch = dict(batch, decoder_target_tokens=jnp.asarray(np.full((3, 4), 11, np.int32)))
  np.testing.assert_array_equal(setup.forward(params, batch, None),
                                plain.forward(plain_params, batch, None))
