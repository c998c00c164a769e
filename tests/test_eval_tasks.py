"""Evaluation driven by the tasks, end to end: every GLUE metric and the GLUE average from a
tiny GLUE mixture (TFDS mock data), two multimodal tasks in one run, keep-best by average."""
import json
import os

import numpy as np
import seqio
import tensorflow_datasets as tfds

from adalink_jax import metrics
from adalink_jax import trainer
from tests.test_train import assets  # noqa: F401
from tests.test_train_tasks import _seqio_config, files  # noqa: F401

GLUE_METRICS = {'cola': ['matthews_corrcoef'], 'sst2': ['accuracy'], 'mrpc': ['f1', 'accuracy'],
                'qqp': ['f1', 'accuracy'], 'stsb': ['pearson_corrcoef', 'spearman_corrcoef'],
                'mnli_matched': ['accuracy'], 'mnli_mismatched': ['accuracy'],
                'qnli': ['accuracy'], 'rte': ['accuracy']}


def test_glue_mixture_reports_every_glue_metric_and_the_average(assets, files, tmp_path,  # noqa: F811
                                                                monkeypatch):
  monkeypatch.setattr(seqio.TfdsDataSource, 'num_input_examples', lambda self, split: 4)
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    c = _seqio_config(assets, files, 'glue_v002_proportional_raw', 't5', 'accuracy', steps=4,
                      best_metric='average', keep_checkpoints=1)
    c.eval.tasks = ('glue_v002_proportional_raw',)
    trainer.train(c, str(tmp_path))
  ev = json.loads((tmp_path / 'eval' / 'metrics_4.json').read_text())
  per_task = {}
  for name, wanted in GLUE_METRICS.items():
    task = f'glue_{name}_v002_raw'
    got = {m: ev[f'{task}/{m}'] for m in wanted}
    per_task[task] = got
    assert ev['num_examples_per_task'][task] == 4
    assert os.path.exists(tmp_path / 'eval' / f'predictions_4_{task}.jsonl')
  # The average is T5's GLUE score of exactly these per-task numbers (MNLI m/mm count once).
  np.testing.assert_equal(ev['average'], metrics.glue_average(
      {k[:-len('_raw')]: v for k, v in per_task.items()}))
  assert len(per_task) == 9 and ev['step'] == 4


def test_two_multimodal_tasks_in_one_run(assets, files, tmp_path):  # noqa: F811
  c = _seqio_config(assets, files, 'vqav2_raw', 'pali', 'vqa_accuracy', steps=4)
  c.eval.tasks = ('vqav2_raw', 'okvqa_raw')
  c.best_metric = 'okvqa_raw/vqa_accuracy'  # keep-best by one task's metric
  result = trainer.train(c, str(tmp_path))
  ev = result['eval']
  assert set(ev) == {'vqav2_raw/vqa_accuracy', 'okvqa_raw/vqa_accuracy', 'average'}
  assert ev['average'] == (ev['vqav2_raw/vqa_accuracy'] + ev['okvqa_raw/vqa_accuracy']) / 2
  # Each task's predictions are scored against that task's own references.
  for task, n in (('vqav2_raw', 2), ('okvqa_raw', 3)):  # vqav2 validation has a corrupt image
    lines = (tmp_path / 'eval' / f'predictions_4_{task}.jsonl').read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == n and all(task.split('_')[0] in r['prompt'] for r in rows)
    want = metrics.vqa_accuracy([r['prediction'] for r in rows], [r['references'] for r in rows])
    assert ev[f'{task}/vqa_accuracy'] == want
  meta = json.loads((tmp_path / 'checkpoints' / '4' / 'metrics' / 'metrics').read_text())
  assert meta['okvqa_raw/vqa_accuracy'] == ev['okvqa_raw/vqa_accuracy']
