"""The peer benchmark (ours vs HF transformers + PEFT) runs end to end at tiny size.

Timings at tiny size mean nothing; checked: one table row per method with positive times and
ratios, the ours/peer interleaving, the load average recorded around every child, and that the
two sides really train the same thing where the peer has the method (LoRA r=8 on q,v gives the
same trainable count on both sides; PEFT's seq2seq prompt tuning allocates 100 decoder-side
virtual tokens besides the 100 encoder-side ones, so it holds twice ours).
"""
import json
import math
import os

import pytest

pytest.importorskip('peft')
from bench import peer  # pylint: disable=wrong-import-position

_D_MODEL = 32  # t5_1_1_tiny


@pytest.fixture(scope='module')
def res(tmp_path_factory):
  out = tmp_path_factory.mktemp('peer')
  # One torch thread: on a loaded 2-core machine two OpenMP threads stall ~1 s per tiny step.
  r = peer.main([f'--out={out}', '--size=tiny', '--steps=1', '--warmup=1', '--rounds=1',
                 '--threads=1', '--peak_n=256'])
  return out, r


def _pos(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_table_has_a_row_per_method_with_times_and_ratios(res):
  out, r = res
  assert not [x['error'] for x in r['rows'] if 'error' in x]
  md = open(os.path.join(out, 'peer.md')).read()
  assert '| ours / peer |' in md and 'Skipped' not in md  # IA3 runs on both sides now
  rows = {l.split('|')[2].strip(): [c.strip() for c in l.split('|')[1:-1]]
          for l in md.splitlines() if l.startswith('| t5_tiny |')}
  assert list(rows) == list(peer.METHODS)
  for method, cells in rows.items():
    ours, peer_s, ratio, ratio_lora = cells[2:6]
    assert float(ours) > 0 and float(ratio_lora) > 0, (method, cells)
    if method in peer.PEER:
      assert float(peer_s) > 0 and float(ratio) > 0, (method, cells)
    else:
      assert peer_s == ratio == '--', (method, cells)
  with open(os.path.join(out, 'peer.json')) as f:
    on_disk = json.load(f)
  assert [s['method'] for s in on_disk['summary']] == list(peer.METHODS)
  assert _pos(on_disk['peak']['flops_per_s']) and 'GFLOP/s; MFU' in md
  for s in on_disk['summary']:
    assert _pos(s['ours_s']) and _pos(s['ours_over_peer_lora'])
    # MFU: our compiled FLOPs over our median time over the peak of the same run.
    assert math.isclose(s['ours_mfu'], s['ours_gflop'] * 1e9 / s['ours_s']
                        / on_disk['peak']['flops_per_s'])
    if s['peer_s'] is not None:
      assert math.isclose(s['ours_over_peer'], s['ours_s'] / s['peer_s'])


def test_interleaved_with_load_and_matched_settings(res):
  _, r = res
  order = [(x['method'], x['side']) for x in r['rows']]
  assert order == [('ft', 'ours'), ('ft', 'peer'), ('adalink', 'ours'), ('lora', 'ours'),
                   ('lora', 'peer'), ('prompt', 'ours'), ('prompt', 'peer'),
                   ('adapter', 'ours'), ('ia3', 'ours'), ('ia3', 'peer')]
  for x in r['rows']:
    assert len(x['load_before']) == 3 and len(x['load_after']) == 3
    assert len(x['step_times_s']) == 1 and math.isfinite(x['loss'])
    # Ours runs with the train command's host allocator (a CPU child); the peer with malloc's.
    assert x['host_memory_reused'] is (x['side'] == 'ours'), x['side']
  assert r['settings']['peer_allocator'] == 'system'
  assert 'malloc: ours reuse, peer system (adalink_jax.env)' in (res[0] / 'peer.md').read_text()
  by = {(x['method'], x['side']): x for x in r['rows']}
  lora = by['lora', 'peer']
  assert lora['peer_settings'] == dict(r=8, lora_alpha=8, lora_dropout=0.0,
                                       target_modules=['q', 'v'])
  assert lora['threads'] == 1 and lora['peft'] == r['versions'].split('peft ')[1]
  assert by['lora', 'ours']['params_trainable'] == lora['params_trainable'] > 0
  assert by['prompt', 'ours']['params_trainable'] == 100 * _D_MODEL
  assert by['prompt', 'peer']['params_trainable'] == 2 * 100 * _D_MODEL
  # IA3 scales the same places on both sides (k, v incl. cross-attention, wo's input).
  assert by['ia3', 'ours']['params_trainable'] == by['ia3', 'peer']['params_trainable'] > 0
  # Same shapes: the full models differ by nothing but the adapters' parameters.
  assert by['ft', 'ours']['params_trainable'] == by['ft', 'peer']['params_trainable']


def test_unknown_method_names_the_choices(tmp_path, capsys):
  with pytest.raises(SystemExit):
    peer.main([f'--out={tmp_path}', '--size=tiny', '--methods=dora'])
  assert "--methods: choose from ('ft', 'adalink', 'lora', 'prompt', 'adapter', 'ia3')" in \
      capsys.readouterr().err
