"""End-to-end training on seqio tasks: VQA and captioning (official-format files), GLUE (TFDS mock)."""
import json
import os

import pytest
import seqio
import tensorflow_datasets as tfds

from adalink_jax import trainer
from tests import test_tasks
from tests.test_train import tiny_config

DIRS = ('coco', 'vqav2', 'okvqa', 'textvqa', 'textcaps', 'stvqa', 'docvqa')


@pytest.fixture(scope='module')
def files(tmp_path_factory, assets):
  root = str(tmp_path_factory.mktemp('task_files'))
  exp = test_tasks._build_files(root)  # pylint: disable=protected-access
  texts = [e['question'] + ' ' + ' '.join(e['answers']) for b in exp.values()
           for rows in b.values() for e in rows]
  vocab = test_tasks._train_vocab(root, texts)  # pylint: disable=protected-access
  yield {'root': root, 'vocab': vocab}


from tests.test_train import assets  # noqa: E402,F401  (module fixture used by `files`)


@pytest.fixture(autouse=True)
def _orbax_cleanup_before_mocked_datasets(monkeypatch):
  """tfds's ``mock_data`` patches the global file system while it builds a dataset, and Orbax
  lists the checkpoint folder for leftovers on a background thread started with its manager:
  when the two overlap, Orbax looks in the mock's folder and fails. Let the run's checkpointer
  finish that listing before the run builds any dataset (only ``save`` waits for it)."""
  from adalink_jax import checkpointing  # pylint: disable=g-import-not-at-top
  init = checkpointing.TrainCheckpointer.__init__

  def init_then_wait(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access
  monkeypatch.setattr(checkpointing.TrainCheckpointer, '__init__', init_then_wait)


def _seqio_config(assets, files, task, family, metric, steps=24, **over):  # noqa: F811
  c = tiny_config(assets, total_steps=steps, **{'optimizer.total_steps': steps,
                                                'optimizer.learning_rate': 3e-3,
                                                'peft.method': 'ft', 'eval.every': steps,
                                                'eval.num_batches': 1, 'eval.metric': metric,
                                                'checkpoint_every': steps, **over})
  c.data = dict(kind='seqio', task=task, eval_task='', train_split='train',
                eval_split='validation', text_len=32, target_len=12, image_size=32,
                tfds_data_dir='', vocab=files['vocab'],
                data_dirs={k: os.path.join(files['root'], k) for k in DIRS})
  c.model.t5.vocab_size = 640  # 420 pieces + 100 sentinel ids fit
  if family == 't5':
    c.model.family, c.model.name = 't5', 't5_1_1_tiny'
    c.peft.modalities = ('text',)
  c.batch_size = 8
  c.eval.decoding.max_decode_len = 12
  return c


def _check(workdir, metric, steps):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  train = [r['loss'] for r in rows if r['kind'] == 'train']
  assert train[-1] < 0.7 * train[0], train
  ev = json.load(open(os.path.join(workdir, 'eval', f'metrics_{steps}.json')))
  assert 0.0 <= ev[metric] <= 100.0
  preds = open(os.path.join(workdir, 'eval', f'predictions_{steps}.jsonl')).read().splitlines()
  assert preds and json.loads(preds[0])['references']
  return ev


@pytest.mark.parametrize('task,metric', [('vqav2_raw', 'vqa_accuracy'),
                                         ('textcaps_mmit', 'cider')])
def test_multimodal_task_trains_and_evaluates(assets, files, tmp_path, task, metric):  # noqa: F811
  c = _seqio_config(assets, files, task, 'pali', metric)
  trainer.train(c, str(tmp_path))
  _check(str(tmp_path), metric, 24)


@pytest.mark.parametrize('pack', [False, True])
def test_glue_task_trains_and_evaluates(assets, files, tmp_path, monkeypatch, pack):  # noqa: F811
  monkeypatch.setattr(seqio.TfdsDataSource, 'num_input_examples', lambda self, split: 4)
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    c = _seqio_config(assets, files, 'glue_rte_v002_raw', 't5', 'accuracy')
    c.data.pack = pack  # packed rows: several examples per row, kept apart by segment ids
    if pack:
      c.data.text_len, c.data.target_len = 256, 24  # room for several examples per row
      from adalink_jax import seqio_source  # pylint: disable=g-import-not-at-top
      first = next(seqio_source.SeqioSource(c).train_batches(0))
      assert first['encoder_segment_ids'].max() >= 2  # really packed
    trainer.train(c, str(tmp_path))
  ev = _check(str(tmp_path), 'accuracy', 24)  # the task's own metric (T5's GLUE RTE: accuracy)
  # ... and by rank classification over RTE's label words (entailment / not_entailment).
  assert 0.0 <= ev['rank_accuracy'] <= 100.0 and 'glue_rte_v002_raw/rank_accuracy' in ev


def test_a_vocabulary_larger_than_the_token_table_is_refused(assets, files, tmp_path):  # noqa: F811
  """Ids beyond the embedding table would be clamped by the lookup: one clear error instead."""
  c = _seqio_config(assets, files, 'vqav2_raw', 'pali', 'vqa_accuracy')
  c.model.t5.vocab_size = 256  # the fixture's vocabulary has 420 pieces + 100 sentinels
  with pytest.raises(ValueError, match=r'task vocabulary \(520 ids.*token table \(256 rows'):
    trainer.Trainer(c, str(tmp_path))


def test_trainer_ranks_gemma_candidates_as_score_targets_does(assets, files, tmp_path,  # noqa: F811
                                                              monkeypatch):
  """The trainer's eval of a batch (the family's ``generate_and_score``: one prefill shared by
  greedy decoding and every label, jitted and sharded over the 8-device mesh) decodes what
  ``generate`` alone decodes and picks, row by row, the label that ``score_targets`` -- one
  full teacher-forced forward per label -- scores highest, on a GLUE eval batch and a tiny
  Gemma."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from adalink_jax import rank_classification  # pylint: disable=g-import-not-at-top
  from adalink_jax.peft import methods as peft  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(seqio.TfdsDataSource, 'num_input_examples', lambda self, split: 8)
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    c = _seqio_config(assets, files, 'glue_rte_v002_raw', 'gemma', 'accuracy',
                      **{'peft.method': 'adalink'})
    c.model = dict(family='gemma', name='gemma3_tiny', gemma=dict(vocab_size=640))
    c.peft.modalities = ('text',)
    t = trainer.Trainer(c, str(tmp_path))
    trainable, frozen = t.init_params()
    trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape,
                                                                    x.dtype), trainable)
    params = peft.merge(trainable, frozen)
    task = t.source.eval_tasks()[0]
    local = next(iter(t.source.eval_batches(1, task.name)))
  inputs = {k: v for k, v in local.items() if k in trainer._ENCODE_KEYS}  # pylint: disable=protected-access
  n = len(local['targets'])
  with t.mesh:
    tokens, got = t.predict_batch(params, t.to_global(inputs), task)
  want, scores = rank_classification.classify(
      lambda batch, targets: t.setup.score_targets(params, batch, targets), inputs,
      task.candidates)
  assert n == 8 and len(task.candidates) == 2
  np.testing.assert_array_equal(np.argmax(got, axis=1), want)
  np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-5)
  assert np.ptp(scores) > 0  # the labels do not score alike
  np.testing.assert_array_equal(
      tokens, t.setup.generate(params, inputs, c.eval.decoding.max_decode_len))
