"""The benchmarks keep working: every stage at tiny size writes sane JSON, markdown and a PNG.

Timings here are meaningless (tiny models on a shared machine); only structure and physics are
checked: positive times and sizes, AdaLink compiles to fewer FLOPs and a smaller memory plan
than full fine-tuning, decoding with and without the KV cache yields the same tokens, the
simulated mesh really has the requested devices and shards the frozen weights.
"""
import json
import math
import os

import pytest

from bench import report
from bench import run_all
from bench import setups


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench')
  res = run_all.main([f'--out={out}', '--size=tiny', '--steps=2',
                      '--models=t5_tiny,pali_tiny:ft+adalink', '--scale_variants=no'])
  return out, res


def _pos(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_files_written(results):
  out, res = results
  for name in ('results.json', 'results.md', 'train.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, 'train.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(out, 'results.json')) as f:
    on_disk = json.load(f)
  assert on_disk['size'] == 'tiny' and len(on_disk['load_before']) == 3
  md = open(os.path.join(out, 'results.md')).read()
  assert '| t5_tiny | adalink |' in md and '## Decoding' in md and '## Scale' in md
  assert len(on_disk['train']) == len(res['train']) == len(setups.METHODS) + 2


def test_train_rows_sane(results):
  _, res = results
  rows = res['train']
  assert not [r['error'] for r in rows if 'error' in r]
  assert _pos(res['peak']['flops_per_s'])
  for r in rows:
    for k in ('step_s', 'compile_s', 'tokens_per_s', 'flops', 'flops_per_s', 'rss_peak_bytes',
              'opt_state_bytes', 'checkpoint_bytes', 'params_trainable'):
      assert _pos(r[k]), (r['model'], r['method'], k, r[k])
    assert len(r['step_times_s']) == 2 and r['finite']
    assert _pos(r['xla_memory']['total']) and r['xla_memory']['alias'] > 0  # donation aliases
    # AdamW keeps two fp32 moments per trainable parameter (+ a step counter).
    n = r['params_trainable']
    assert 2 * 4 * n <= r['opt_state_bytes'] <= 2 * 4 * n + 64
  for model in ('t5_tiny', 'pali_tiny'):
    by = {r['method']: r for r in rows if r['model'] == model}
    ft, ada = by['ft'], by['adalink']
    # No weight gradients through the frozen stack: strictly fewer FLOPs and a smaller plan.
    assert ada['flops'] < ft['flops']
    assert ada['xla_memory']['total'] < ft['xla_memory']['total']
    assert ft['params_trainable'] == ft['params_total'] and ft['frozen_bytes'] == 0
    for m in set(by) - {'ft'}:
      assert by[m]['params_trainable'] < ft['params_trainable'] / 2 and by[m]['frozen_bytes'] > 0
      # The safetensors file holds the trainable fp32 params plus a small header.
      assert 4 * by[m]['params_trainable'] < by[m]['checkpoint_bytes'] < \
          4 * by[m]['params_trainable'] + 4096
  t5 = {r['method']: r for r in rows if r['model'] == 't5_tiny'}
  assert t5['adalink']['params_trainable'] == 2 * 64 * 32  # rank 64, d_model 32: down + up


def test_decode_and_scale_sane(results):
  _, res = results
  dec = res['decode']
  assert 'error' not in dec, dec.get('error')
  assert dec['cache_matches_nocache'] is True
  kinds = {(r['search'], r['kv_cache'], r['batch']) for r in dec['rows']}
  assert kinds == {(s, c, b) for s in ('greedy', 'beam2') for c in (True, False) for b in (2,)}
  for r in dec['rows']:
    assert _pos(r['tokens_per_s']) and _pos(r['time_s'])
    assert r['out_shape'] == [r['batch'], r['max_len']]
  # One row per tiny scale model (PaLI and PaliGemma), in SCALE's order.
  rows = res['scale']
  assert [r['family'] for r in rows] == ['pali', 'paligemma']
  for scale in rows:
    assert 'error' not in scale, scale.get('error')
    assert scale['num_devices'] == 8 and scale['primary']
    assert _pos(scale['xla_memory']['total']) and _pos(scale['compile_s'])
    # Frozen weights are sharded: one device holds well under the whole frozen model.
    assert scale['frozen_bytes_per_device'] < scale['frozen_bytes_total'] / 2
  assert (rows[0]['t5_encoder_layers'], rows[1]['gemma_layers']) == (2, 4)


def test_targets_reported_with_misses_quantified(results):
  _, res = results
  names = [t['name'] for t in res['targets']]
  assert any('AdaLink step / FT step' in n for n in names)
  assert any('MFU' in n for n in names)
  assert sum('scale sim' in n for n in names) == len(setups.SCALE['tiny'])
  for t in res['targets']:
    assert t['met'] in (True, False)
    assert (t['miss_by'] == 0) == t['met'] and ('MISSED' in t['text']) == (not t['met'])
  # The helper itself: a miss says by how much.
  t = report._target('x', 0.8, 0.7, True, 'x')  # pylint: disable=protected-access
  assert not t['met'] and abs(t['miss_by'] - 0.1) < 1e-12 and 'MISSED by 0.1x' in t['text']


def test_depth_extrapolation_is_linear():
  a = dict(layer_fraction=0.125, xla_memory=dict(argument=100, temp=1000, total=1100))
  b = dict(layer_fraction=0.25, xla_memory=dict(argument=200, temp=1500, total=1700))
  # Through (1/8, x) and (1/4, y): x + (y - x) * (1 - 1/8) / (1/8) = x + 7 (y - x).
  assert run_all._extrapolate(a, b) == dict(argument=800, temp=4500, total=5300)  # pylint: disable=protected-access
