"""bench.real_gemma at the tiny size: every method times a real step; the full-head row too."""
import json
import math

from bench import real_gemma


def test_tiny_run_writes_a_row_per_method(tmp_path):
  res = real_gemma.main([f'--out={tmp_path}', '--size=tiny', '--steps=1', '--batch=2',
                         '--prompt=6', '--answer=3'])
  rows = res['rows']
  assert [r['method'] for r in rows] == list(real_gemma.PEFT) + ['adalink']
  assert [r['full_head'] for r in rows] == [False] * len(real_gemma.PEFT) + [True]
  assert all(math.isfinite(r['step_s']) and r['step_s'] > 0 for r in rows)
  by = {r['method']: r for r in rows if not r['full_head']}
  assert by['adalink']['trainable'] == 2 * 32 * 16  # rank 16 on the 32-wide tiny Gemma
  # Full FT without the embedding table: fewer trainable params than the model has.
  assert 0 < by['ft']['trainable'] < by['ft']['total'] - 128 * 32 + 1
  saved = json.load(open(tmp_path / 'real_gemma.json'))
  assert saved['tokens'] == 9 and len(saved['rows']) == len(rows)
  assert '| adalink | every slot |' in (tmp_path / 'real_gemma.md').read_text()
  evals = res['evaluation']
  assert [r['way'] for r in evals] == list(real_gemma.EVAL_WAYS)
  assert all(r['candidates'] == 6 and r['eval_s'] > 0 for r in evals)
  assert '| decode + rank, prompt run once |' in (tmp_path / 'real_gemma.md').read_text()
