"""Resuming the seqio training input at batch k produces nothing before k, and the same batches.

Data: every JSON dataset in the official formats with real JPEG/PNG images
(tests/test_tasks.py's writers), except VQAv2's train split, rewritten here larger (15
questions) with one corrupt image, so streams cross epochs and hit an unreadable file. A
SentencePiece model is trained on the text. The configs are the real experiment configs
(configs/vqav2_raw.py) read by SeqioSource, the trainer's input pipeline; the mixture is the
registered ``vqa_mmit`` (five tasks, prompts sampled per example).
"""
import os

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from adalink_jax import config_lib
from adalink_jax import data
from adalink_jax import seqio_source
from tests import test_tasks

# pylint: disable=protected-access
_write_image, _dump = test_tasks._write_image, test_tasks._dump
_vqa_answers, _build_files, _train_vocab = (test_tasks._vqa_answers, test_tasks._build_files,
                                            test_tasks._train_vocab)
# pylint: enable=protected-access
DIRS = ('coco', 'vqav2', 'okvqa', 'textvqa', 'textcaps', 'stvqa', 'docvqa')
SUBSET = 'train2014'
N_VQA = 15
BAD = 4  # question index whose image file is corrupt
BATCH = 2


def _write_vqav2_train(root):
  """15 VQAv2 train questions on 15 COCO images; image ``BAD`` is not a complete JPEG."""
  questions, annotations = [], []
  for j in range(N_VQA):
    image_id = 700 + j
    path = os.path.join(root, 'coco', SUBSET, f'COCO_{SUBSET}_{image_id:012d}.jpg')
    if j == BAD:
      with open(path, 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 truncated jpeg')
    else:
      _write_image(path, path)
    qid = image_id * 10
    questions.append({'image_id': image_id, 'question': f'what color is object {j}?',
                      'question_id': qid})
    annotations.append({'question_id': qid, 'image_id': image_id, 'question_type': 'what',
                        'answer_type': 'other', 'multiple_choice_answer': f'color {j}',
                        'answers': _vqa_answers(f'color {j}', 'blue')})
  vqa = os.path.join(root, 'vqav2')
  _dump(os.path.join(vqa, f'v2_OpenEnded_mscoco_{SUBSET}_questions.json'),
        {'questions': questions})
  _dump(os.path.join(vqa, f'v2_mscoco_{SUBSET}_annotations.json'), {'annotations': annotations})
  return [q['question'] + ' color blue' for q in questions]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('resume_o1'))
  exp = _build_files(root)
  texts = [e['question'] + ' ' + ' '.join(e['answers']) for b in exp.values()
           for rows in b.values() for e in rows] + _write_vqav2_train(root)
  vocab = _train_vocab(root, texts)
  yield {'root': root, 'vocab': vocab}
  data.reset_skipped_images()
  data.reset_truncations()


def _source(files, task):
  c = config_lib.multimodal('vqav2', 'raw', 'vqa_accuracy',
                            f'model=tiny,batch={BATCH},image_size=32')
  c.data.task = task
  c.data.vocab = files['vocab']
  for k in DIRS:
    c.data.data_dirs[k] = os.path.join(files['root'], k)
  c.data.text_len, c.data.target_len = 64, 8
  c.model.t5.vocab_size = 640
  return seqio_source.SeqioSource(c)


def _take(source, start, n):
  it = source.train_batches(start)
  return [next(it) for _ in range(n)]


def _assert_same(got, want, where):
  assert len(got) == len(want)
  for i, (a, b) in enumerate(zip(got, want)):
    assert sorted(a) == sorted(b), where
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{where}, batch {i}, {key}')


@pytest.mark.parametrize('task', ['vqav2_raw', 'vqa_mmit'])
def test_resumed_batches_equal_uninterrupted(files, task):
  source = _source(files, task)
  assert source.index_addressable()
  data.reset_skipped_images()
  ref = _take(source, 0, 16)  # 32 stream positions: two epochs of VQAv2's 15 questions
  assert ref[0]['image'].shape == (BATCH, 32, 32, 3)
  for k in (1, 4, 7, 9, 12):
    _assert_same(_take(source, k, 4), ref[k:k + 4], f'{task} resumed at {k}')
  if task == 'vqav2_raw':
    assert data.skipped_images() == {'vqav2': 1}
    # Where the corrupt image's slot was filled by the next window's first example, that
    # example is also the next batch's first row (the slot borrows; nothing shifts).
    firsts = [b['encoder_input_tokens'][0] for b in ref[1:]]
    lasts = [b['encoder_input_tokens'][-1] for b in ref[:-1]]
    assert any((a == b).all() for a, b in zip(lasts, firsts))
  else:  # five tasks mixed, prompts drawn per example (several mmit paraphrases)
    ids = np.concatenate([b['task_id'] for b in ref])
    assert len(set(ids.tolist())) >= 3
    prompts = {source.decode_text(b['encoder_input_tokens'][i]).split(' ')[0]
               for b in ref for i in range(BATCH)}
    assert len(prompts) >= 2, prompts


def test_tfds_task_resumes_bit_exact(files):
  """TFDS (GLUE, tfds's mock records): skips records before preprocessing, same batches."""
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    source = _source(files, 'glue_rte_v002_mmit')
    assert 'image' not in source.train_task.output_features and source.index_addressable()
    ref = _take(source, 0, 10)  # 20 positions: five passes over the 4 mock examples
    assert len({b['encoder_input_tokens'].tobytes() for b in ref}) > 2
    for k in (1, 3, 6):
      _assert_same(_take(source, k, 4), ref[k:k + 4], f'glue resumed at {k}')


def test_starting_at_k_generates_nothing_before_it(files):
  source = _source(files, 'vqav2_raw')
  json_source = seqio.get_mixture_or_task('vqav2_raw').source
  k = 500
  json_source.reset_read_stats()
  first = next(source.train_batches(k))
  stats = json_source.read_stats('train')
  assert stats['lowest_position'] == k * BATCH  # the first position it ever generated
  assert 0 < stats['examples'] < 200  # a prefetch's worth, not k * BATCH = 1000
  assert first['image'].shape == (BATCH, 32, 32, 3)
  # The old resume path (still used for packed batches) generates every earlier example.
  json_source.reset_read_stats()
  next(source.train_batches_by_skip(20))
  assert json_source.read_stats('train')['lowest_position'] is None  # epoch datasets
  assert json_source.read_stats('train')['examples'] >= N_VQA  # at least one whole epoch


def test_mixture_starting_at_k_generates_nothing_before_it(files):
  source = _source(files, 'vqa_mmit')
  mixture = seqio.get_mixture_or_task('vqa_mmit')
  tasks = list(mixture.tasks)
  counts = seqio_source.mixture_counts([mixture.get_rate(t) for t in tasks])
  k = 3000  # position 6000: inside the first block, so offsets are partial counts
  _, offsets = seqio_source.mixture_schedule(source.config.seed, counts, k * BATCH)
  assert offsets.sum() == k * BATCH
  for t in tasks:
    t.source.reset_read_stats()
  next(source.train_batches(k))
  read = 0
  for t, offset in zip(tasks, offsets):
    stats = t.source.read_stats('train')
    read += stats['examples']
    assert stats['lowest_position'] in (None, offset), t.name  # None: no turn yet
  assert 0 < read < 300  # vs 6000 positions before batch k


def test_mixture_schedule_is_index_addressable():
  counts = seqio_source.mixture_counts([3.0, 1.0, 0.5, 0.0], block=50)
  assert counts.tolist() == [33, 11, 6, 0] and counts.sum() == 50
  seed, n = 7, 400
  choices, offsets = seqio_source.mixture_schedule(seed, counts, 0)
  full = np.array(list(choices.take(n).as_numpy_iterator()))
  assert offsets.tolist() == [0, 0, 0, 0]
  for block in range(n // 50):  # every block holds each task's exact share
    assert np.bincount(full[block * 50:(block + 1) * 50], minlength=4).tolist() == [33, 11, 6, 0]
  assert (full[:50] != full[50:100]).any()  # the order within a block is reshuffled
  for first in (1, 49, 50, 137, 333):
    tail, offs = seqio_source.mixture_schedule(seed, counts, first)
    np.testing.assert_array_equal(np.array(list(tail.take(n - first).as_numpy_iterator())),
                                  full[first:])
    np.testing.assert_array_equal(offs, np.bincount(full[:first], minlength=4))
  with pytest.raises(ValueError, match='mixture rates'):
    seqio_source.mixture_counts([0.0, 0.0])
