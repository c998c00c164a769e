"""`python -m bench.resume` (the README's resume-cost command) runs and measures what it says:
the index-addressable stream decodes about one batch whatever the step, the skip path decodes
everything before it. Timings are not asserted (shared machine); counts are."""
import json
import subprocess
import sys

from tests.test_train import ROOT


def test_resume_bench_counts_decoded_images(tmp_path):
  out = tmp_path / 'resume.json'
  subprocess.run([sys.executable, '-m', 'bench.resume', '--starts=1,3', '--reps=1', '--batch=2',
                  f'--data_dir={tmp_path / "data"}', f'--out={out}'], check=True, cwd=ROOT,
                 capture_output=True, timeout=600)
  rows = {(r['mode'], r['start']): r for r in json.loads(out.read_text())['rows']}
  for start in (1, 3):
    index, skip = rows[('index', start)], rows[('skip', start)]
    assert index['seconds'] > 0 and skip['seconds'] > 0
    # One batch plus prefetch, against every earlier example plus seqio's shuffle buffer.
    assert index['decoded'] <= 16 < 1000 <= skip['decoded'], (index, skip)
