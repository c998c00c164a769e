"""The scale simulation covers PaliGemma (SigLIP + Gemma 2) next to PaLI-X: the tiny spec compiles
on 8 fake devices through the benchmark's CLI and reports Gemma layer counts; reduced depths keep
Gemma 2's local/global pattern; the extrapolated row's counts match a real full-depth compile.
"""
import os

import pytest

from adalink_jax.models import gemma as gemma_lib
from bench import run_all
from bench import scale_sim
from bench import setups

TINY = 'paligemma2_tiny'


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench_scale')
  res = run_all.main([f'--out={out}', '--size=tiny', '--only=scale', f'--scale_models={TINY}',
                      '--scale_variants=no'])
  return out, res


def test_paligemma_tiny_compiles_with_its_fields(results):
  out, res = results
  (row,) = res['scale']
  assert 'error' not in row, row.get('error')
  assert row['model'] == TINY and row['family'] == 'paligemma' and row['primary']
  # paligemma2_tiny: ViT tiny (2 blocks, 16 patches) + gemma2_tiny (4 layers, every 2nd global).
  assert (row['vit_depth'], row['gemma_layers'], row['gemma_local_layers']) == (2, 4, 2)
  assert 't5_encoder_layers' not in row
  assert row['num_devices'] == 8 and row['global_batch'] == 8 and row['image_tokens'] == 16
  # AdaLink rank 64 on text and image tokens, both entering Gemma at d_model 32: 2 x (down + up).
  assert row['params_trainable'] == 2 * 2 * 64 * 32
  assert row['params_total'] > row['params_trainable']
  assert row['xla_memory']['total'] > 0 and row['compile_s'] > 0
  assert row['frozen_bytes_per_device'] < row['frozen_bytes_total'] / 2  # FSDP-sharded
  md = open(os.path.join(out, 'results.md')).read()
  assert f'| {TINY} | full depth | ViT 2 / Gemma 4 (2 local) | data=2xfsdp=4xmodel=1 |' in md
  (target,) = [t for t in res['targets'] if 'scale sim' in t['name']]
  assert TINY in target['name'] and target['met'] is True


def test_extrapolated_fields_match_a_full_depth_compile(results):
  _, res = results
  (row,) = res['scale']
  model = setups.SCALE['tiny'][TINY]['model']
  fields = run_all._full_depth_fields(model, row['params_trainable'])  # pylint: disable=protected-access
  assert fields == dict(vit_depth=2, gemma_layers=4, gemma_local_layers=2,
                        params_total=row['params_total'])


def test_reduced_depth_keeps_the_gemma2_pattern():
  model = setups.SCALE['full']['paligemma2_10b']['model']
  scaled = scale_sim._scaled_model(model, 0.125)  # pylint: disable=protected-access
  # Gemma 2 9B: 42 layers -> round(5.25) = 5, alternating local / global from a local one;
  # So400m/14: 27 blocks -> round(3.375) = 3.
  assert scaled['llm']['num_layers'] == 5 and scaled['vit']['depth'] == 3
  assert tuple(scaled['llm']['layer_types']) == gemma_lib.layer_pattern(5, 2)
  setup = scale_sim.build(scaled)  # a consistent GemmaConfig (else it raises)
  assert scale_sim.layer_counts(setup) == dict(vit_depth=3, gemma_layers=5,
                                               gemma_local_layers=3)
  assert scale_sim._scaled_model(model, 1.0) is model  # pylint: disable=protected-access


def test_reduced_depth_tiny_compiles():
  spec = dict(setups.SCALE['tiny'][TINY], layer_fraction=0.5)
  spec.pop('timeout_s')
  row = scale_sim.run(spec)  # in-process: conftest gives the 8 devices of the 2 x 4 mesh
  assert (row['vit_depth'], row['gemma_layers'], row['gemma_local_layers']) == (1, 2, 1)
  assert row['layer_fraction'] == 0.5 and row['xla_memory']['total'] > 0


def test_unknown_scale_model_is_a_clear_error(tmp_path, capsys):
  with pytest.raises(SystemExit):
    run_all.main([f'--out={tmp_path}', '--size=tiny', '--only=scale', '--scale_models=palix'])
  assert "--scale_models: ['palix'] not in ['pali_tiny', 'paligemma2_tiny']" in \
      capsys.readouterr().err


def test_unsupported_family_is_a_clear_error():
  with pytest.raises(ValueError, match=r"family 't5' is not supported; choose from "
                                       r"\['pali', 'paligemma'\]"):
    scale_sim.build(dict(family='t5', name='t5_1_1_tiny'))
