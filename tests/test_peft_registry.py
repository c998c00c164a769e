"""A PEFT method is one registered object: METHODS everywhere come from the registry, backbone
loading skips exactly the parameters registered methods add, and errors name the registered
methods."""
import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adalink_jax import config_lib
from adalink_jax import peft
from adalink_jax.checkpoints import backbone, common
from adalink_jax.models import intrusive, t5
from adalink_jax.models.axes import param
from adalink_jax.peft import registry
from bench import peer, setups

CFG = t5.t5_config('t5_1_1_tiny', num_encoder_layers=1, num_decoder_layers=1)
TOK = jnp.asarray(np.arange(2, 14, dtype=np.int32).reshape(2, 6))


def test_method_lists_are_the_registry():
  names = registry.names()
  assert names == ('adalink', 'prompt', 'lora', 'adapter', 'ft', 'ia3')
  assert config_lib.METHODS == peft.METHODS == names
  assert set(setups.METHODS) == set(names) and setups.METHODS[0] == 'ft'
  assert set(peer.METHODS) <= set(names)
  assert [registry.get(n).name for n in names] == list(names)
  # Every method's config fields are PeftConfig fields, with the method's defaults.
  cfg = peft.PeftConfig()
  for m in registry.methods():
    for field, default in m.fields:
      assert getattr(cfg, field) == default, (m.name, field)


def test_method_names_need_no_jax():
  # Config files read the names: listing them must not import JAX (or any method module).
  code = ('import sys; from adalink_jax.peft import registry; '
          'print(registry.names(), "jax" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       timeout=120).stdout.strip()
  assert out == "('adalink', 'prompt', 'lora', 'adapter', 'ft', 'ia3') False"


class _Probe(nn.Module):
  """A test method's parameter: ``y + 0 * g`` (identity), ``g [embed]``."""

  @nn.compact
  def __call__(self, y):
    g = param(self, 'g', nn.initializers.ones, (y.shape[-1],), jnp.float32, ('embed',))
    return y + 0.0 * g


@dataclasses.dataclass(frozen=True)
class _ProbeHook(intrusive.Hook):

  def __call__(self, site, y, x=None):
    return _Probe(name='probe_hook')(y)


PROBE = registry.Method(name='probe', summary='test-only method', hooks=lambda cfg: (
    ('attention_out', _ProbeHook()),), adds=('/probe_hook/',))


@pytest.fixture
def probe():
  registry.register(PROBE)
  yield PROBE
  registry.unregister('probe')


def _params(model_config):
  return nn.unbox(t5.T5(model_config).init(jax.random.key(0), TOK, TOK)['params'])


def _load_native(directory, params):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return backbone.load_into({'native': directory}, params,
                            jax.tree.map(lambda _: sharding, params), setup=None)


def test_backbone_loading_skips_what_registered_methods_add(probe, tmp_path):
  base = _params(CFG)
  backbone.save_native(str(tmp_path), base, {'family': 't5', 'name': 'tiny'})
  built = peft.build(dict(method='probe'), CFG)
  assert built.model_config.hooks == (('attention_out', _ProbeHook()),)
  params = _params(built.model_config)
  added = sorted(k for k in common.flatten(params) if '/probe_hook/' in k)
  assert added == ['decoder/layers_0/probe_hook/g', 'encoder/layers_0/probe_hook/g']
  assert all(backbone._is_adapter_path(k) for k in added)
  assert [k for k in common.flatten(params) if built.trainable(k)] == added
  loaded = common.flatten(_load_native(str(tmp_path), params))
  for k, v in common.flatten(base).items():  # every backbone weight read from the file
    np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(v), err_msg=k)
  np.testing.assert_array_equal(np.asarray(loaded[added[0]]), 1.0)  # left as initialised
  # Not registered any more: the same parameters are what the checkpoint is missing.
  registry.unregister('probe')
  assert not backbone._is_adapter_path(added[0])
  with pytest.raises(common.CheckpointMismatchError) as err:
    _load_native(str(tmp_path), params)
  assert sorted(err.value.missing) == added


def test_unknown_method_names_the_registered_ones(probe):
  with pytest.raises(ValueError) as err:
    peft.parse(dict(method='ia4'))
  msg = str(err.value)
  assert msg.startswith("peft.method='ia4'")
  assert all(repr(n) in msg for n in registry.names()) and "'probe'" in msg
  with pytest.raises(ValueError, match=r"unknown peft method 'ia4'; registered methods: .*'ia3'"):
    registry.get('ia4')
  with pytest.raises(ValueError, match=r"bench: unknown peft method\(s\) \['ia4'\]"):
    registry.check(('ft', 'ia4'), 'bench')
  with pytest.raises(ValueError, match=r"config_lib|choose from .*'ia3'"):
    config_lib.peft_block('ia4', 8)


def test_runtime_method_cannot_add_config_fields():
  late = registry.Method(name='late', summary='', fields=(('late_dim', 3),))
  with pytest.raises(ValueError, match=r"'late' declares config field\(s\) \['late_dim'\]"):
    registry.register(late)
  assert 'late' not in registry.names()


def test_hook_table_rejects_unknown_sites_and_banks_follow_the_registry():
  lora = registry.get('lora')
  with pytest.raises(ValueError, match=r"unknown site 'qkv'; sites: \('query'"):
    intrusive.at((('qkv', _ProbeHook()),), 'query')
  assert lora.hooks(peft.parse(dict(method='lora', lora_targets=('query', 'wo'))))[1][0] == 'wo'
  with pytest.raises(ValueError, match='per-task banks exist for adalink and prompt, not .ia3.'):
    peft.parse(dict(method='ia3', num_tasks=2))
