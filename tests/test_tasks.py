"""seqio tasks and mixtures, end to end on tiny data written in the official formats.

The JSON datasets (TextCaps, VQAv2, OK-VQA, TextVQA, ST-VQA, DocVQA) are written here with
the official field names plus solid-colour JPEG/PNG images, so every batch row can be checked
against the file it came from: the decoded target is the caption / most frequent answer, the
prompt is the template filled with the question, and the image is the colour of *its* file.
TFDS datasets (coco_captions, glue) come from ``tfds.testing.mock_data``. The vocabulary is a
SentencePiece model trained here. References: T5's published GLUE rates and STS-B rule,
TFDS's label words, and numpy.
"""
import collections
import hashlib
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from adalink_jax import data
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position
from tasks import glue as glue_tasks  # pylint: disable=g-import-not-at-top,wrong-import-position
from tasks import prompts  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZE = 32
LENGTHS = {'inputs': 64, 'targets': 24}
MOCK_N = 4


def _color(key: str) -> tuple[int, int, int]:
  h = hashlib.sha1(key.encode()).digest()
  return tuple(30 + b % 200 for b in h[:3])


def _write_image(path, key, fmt='JPEG', mode='RGB', size=(40, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  c = _color(key)
  img = Image.new('RGB', size, c)
  if mode == 'L':
    img = img.convert('L')
  img.save(path, format=fmt, quality=95)
  # What the decoder should give back (grayscale is replicated to 3 channels).
  return (np.asarray(img.convert('RGB'), np.float32)[0, 0] / 127.5 - 1.0)


def _dump(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def _vqa_answers(main, other):
  # 10 official-style answer dicts: `main` 6 times, `other` 4 times.
  words = [main] * 6 + [other] * 4
  return [{'answer': w, 'answer_confidence': 'yes', 'answer_id': i + 1}
          for i, w in enumerate(words)]


def _build_files(root):
  """Writes every JSON dataset; returns {task benchmark: {split: [expected examples]}}."""
  exp = collections.defaultdict(lambda: collections.defaultdict(list))
  coco = os.path.join(root, 'coco')
  # ----------------------------------------------------------------- VQAv2 and OK-VQA
  for key, qfmt, afmt in (('vqav2', 'v2_OpenEnded_mscoco_{}_questions.json',
                           'v2_mscoco_{}_annotations.json'),
                          ('okvqa', 'OpenEnded_mscoco_{}_questions.json',
                           'mscoco_{}_annotations.json')):
    for split, subset in (('train', 'train2014'), ('validation', 'val2014')):
      questions, annotations = [], []
      for j in range(3):
        image_id = 100 + j + (0 if key == 'vqav2' else 50) + (0 if split == 'train' else 20)
        qid = image_id * 10 + j
        q = f'what color is object {j} in {key} {split}?'
        main, other = f'color {j}', 'blue'
        path = os.path.join(coco, subset, f'COCO_{subset}_{image_id:012d}.jpg')
        if key == 'vqav2' and split == 'validation' and j == 1:
          os.makedirs(os.path.dirname(path), exist_ok=True)
          with open(path, 'wb') as f:  # corrupt: must be skipped and counted
            f.write(b'\xff\xd8\xff\xe0 definitely not a complete jpeg')
        else:
          pix = _write_image(path, path)
          exp[key][split].append(dict(id=str(qid), question=q, target=main, pixel=pix,
                                      answers=[main] * 6 + [other] * 4))
        questions.append({'image_id': image_id, 'question': q, 'question_id': qid})
        annotations.append({'question_type': 'what color', 'multiple_choice_answer': main,
                            'answers': _vqa_answers(main, other), 'image_id': image_id,
                            'answer_type': 'other', 'question_id': qid})
      _dump(os.path.join(root, key, qfmt.format(subset)),
            {'info': {}, 'task_type': 'Open-Ended', 'data_type': 'mscoco',
             'data_subtype': subset, 'questions': questions, 'license': {}})
      _dump(os.path.join(root, key, afmt.format(subset)),
            {'info': {}, 'license': {}, 'data_subtype': subset, 'data_type': 'mscoco',
             'annotations': annotations})
  # ------------------------------------------------------------------------- TextVQA
  for split, fname in (('train', 'TextVQA_0.5.1_train.json'),
                       ('validation', 'TextVQA_0.5.1_val.json')):
    entries = []
    for j in range(3):
      image_id = f'{split[:2]}{j:014x}'
      q = f'what does sign {j} say?'
      answers = [f'word {j}'] * 7 + ['other'] * 3
      pix = _write_image(os.path.join(root, 'textvqa', 'train_images', f'{image_id}.jpg'),
                         image_id)
      entries.append({'question': q, 'image_id': image_id, 'image_classes': ['Sign'],
                      'flickr_original_url': '', 'flickr_300k_url': '', 'image_width': 40,
                      'image_height': 30, 'answers': answers, 'question_tokens': q.split(),
                      'question_id': 500 + j + (0 if split == 'train' else 10),
                      'set_name': 'train' if split == 'train' else 'val'})
      exp['textvqa'][split].append(dict(id=str(entries[-1]['question_id']), question=q,
                                        target=f'word {j}', pixel=pix, answers=answers))
    _dump(os.path.join(root, 'textvqa', fname),
          {'dataset_type': split, 'dataset_name': 'textvqa', 'dataset_version': '0.5.1',
           'data': entries})
  # ------------------------------------------------------------------------ TextCaps
  for split, fname in (('train', 'TextCaps_0.1_train.json'),
                       ('validation', 'TextCaps_0.1_val.json')):
    entries = []
    for j in range(2):
      image_id = f'tc{split[:2]}{j:012x}'
      caps = [f'a sign that says hello {j}', f'a board with the word hello {j}']
      pix = _write_image(os.path.join(root, 'textcaps', 'train_images', f'{image_id}.jpg'),
                         image_id)
      for k, cap in enumerate(caps):
        entries.append({'image_id': image_id, 'image_classes': [], 'flickr_original_url': '',
                        'flickr_300k_url': '', 'image_width': 40, 'image_height': 30,
                        'set_name': split[:5], 'image_name': image_id,
                        'image_path': f'train/{image_id}.jpg', 'caption_id': j * 10 + k,
                        'caption_str': cap, 'caption_tokens': cap.split(),
                        'reference_strs': caps, 'reference_tokens': [c.split() for c in caps]})
        if split == 'train':
          exp['textcaps'][split].append(dict(id=image_id, question='', target=cap, pixel=pix,
                                             answers=caps))
      if split != 'train':
        exp['textcaps'][split].append(dict(id=image_id, question='', target=caps[0],
                                           pixel=pix, answers=caps))
    _dump(os.path.join(root, 'textcaps', fname),
          {'dataset_type': split, 'dataset_name': 'textcaps', 'dataset_version': '0.1',
           'data': entries})
  # -------------------------------------------------------------------------- ST-VQA
  entries = []
  for j in range(14):
    file_path = f'coco-text/COCO_train2014_{900 + j:012d}.jpg'
    q = f'what is written on the shirt {j}?'
    answers = [f'name {j}', f'name {j}']
    pix = _write_image(os.path.join(root, 'stvqa', 'train_images', file_path), file_path)
    entries.append({'dataset': 'coco-text', 'question_id': 7000 + j, 'file_name':
                    os.path.basename(file_path), 'file_path': file_path, 'question': q,
                    'answers': answers, 'set_name': 'train'})
    holdout = int(hashlib.md5(file_path.encode()).hexdigest(), 16) % 10 == 0
    exp['stvqa']['validation' if holdout else 'train'].append(
        dict(id=str(7000 + j), question=q, target=f'name {j}', pixel=pix, answers=answers))
  _dump(os.path.join(root, 'stvqa', 'train_task_3.json'),
        {'dataset_name': 'ST-VQA', 'dataset_version': '1.0', 'dataset_split': 'train',
         'data': entries})
  # -------------------------------------------------------------------------- DocVQA
  for split, sub, jpath in (('train', 'train', 'train_v1.0_withQT.json'),
                            ('validation', 'val', 'val/val_v1.0.json')):
    entries = []
    for j in range(2):
      image = f'documents/doc{sub}{j}_1.png'
      q = f'what is the date on page {j}?'
      answers = [f'june {j + 1}', f'{j + 1} june']
      pix = _write_image(os.path.join(root, 'docvqa', sub, image), image, fmt='PNG', mode='L')
      entries.append({'questionId': 300 + j + (0 if split == 'train' else 10), 'question': q,
                      'question_types': ['form'], 'image': image, 'docId': j,
                      'ucsf_document_id': f'x{j}', 'ucsf_document_page_no': '1',
                      'answers': answers, 'data_split': sub})
      exp['docvqa'][split].append(dict(id=str(entries[-1]['questionId']), question=q,
                                       target=answers[0], pixel=pix, answers=answers))
    _dump(os.path.join(root, 'docvqa', jpath),
          {'dataset_name': 'docvqa', 'dataset_split': sub, 'dataset_version': '1.0',
           'data': entries})
  return exp


def _train_vocab(root, extra_text):
  corpus = list(extra_text) + [t for pair in prompts.IMAGE_TEMPLATES.values()
                               for group in pair for t in group]
  corpus += [t for g in list(prompts.GLUE_RAW.values()) + list(prompts.GLUE_MMIT.values())
             for t in g]
  corpus += ['abcdefghij ' * 3, 'acceptable unacceptable entailment 0.0 1.2 3.4 5.0']
  prefix = os.path.join(root, 'spm')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=420,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
      character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
      minloglevel=2)
  return prefix + '.model'


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('adalink_data'))
  exp = _build_files(root)
  texts = [e['question'] + ' ' + ' '.join(e['answers']) for b in exp.values()
           for rows in b.values() for e in rows]
  vocab_path = _train_vocab(root, texts)
  dirs = {k: os.path.join(root, k) for k in
          ('coco', 'vqav2', 'okvqa', 'textvqa', 'textcaps', 'stvqa', 'docvqa')}
  config = data.DataConfig(vocab_path=vocab_path, extra_ids=0, image_size=SIZE, data_dirs=dirs)
  tasks.register_all(config)
  data.reset_skipped_images()
  yield {'root': root, 'exp': exp, 'vocab': data.get_vocabulary(config), 'dirs': dirs,
         'config': config}


def _decode(vocab, row):
  row = [int(t) for t in row]
  if 1 in row:
    row = row[:row.index(1)]
  return vocab.decode([t for t in row if t != 0])


def _batches(name, split, **kw):
  conv = data.PaLIFeatureConverter(image_size=SIZE)
  ds = seqio.get_dataset(name, LENGTHS, conv, dataset_split=split, shuffle=False, **kw)
  return [{k: v.numpy() for k, v in b.items()} for b in ds.batch(8)]


JSON_TASKS = ('textcaps', 'vqav2', 'okvqa', 'textvqa', 'stvqa', 'docvqa')


@pytest.mark.parametrize('bench', JSON_TASKS)
@pytest.mark.parametrize('split', ['train', 'validation'])
def test_json_task_batches_match_files(env, bench, split):
  expected = env['exp'][bench][split]
  assert expected, 'fixture must produce examples for every split'
  batches = _batches(tasks.task_name(bench, 'raw'), split)
  b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
  n = len(expected)
  assert b['image'].shape == (n, SIZE, SIZE, 3) and b['image'].dtype == np.float32
  assert b['encoder_input_tokens'].shape == (n, LENGTHS['inputs'])
  for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights'):
    assert b[k].shape == (n, LENGTHS['targets']) and b[k].dtype == np.int32
  assert b['task_id'].shape == (n,) and (b['task_id'] == tasks.TASK_IDS[bench]).all()
  assert b['image'].min() >= -1.0 and b['image'].max() <= 1.0
  vocab = env['vocab']
  for i, e in enumerate(expected):  # no shuffling: file order
    assert _decode(vocab, b['decoder_target_tokens'][i]) == e['target']
    prompt = 'caption en' if bench == 'textcaps' else f'answer en {e["question"]}'
    assert _decode(vocab, b['encoder_input_tokens'][i]) == prompt
    # The image is the one written for this example (solid colour, JPEG/PNG round trip).
    np.testing.assert_allclose(b['image'][i], np.broadcast_to(e['pixel'], (SIZE, SIZE, 3)),
                               atol=3 / 127.5)
    tgt = b['decoder_target_tokens'][i]
    n_tok = int((tgt != 0).sum())
    assert tgt[n_tok - 1] == 1  # EOS ends the target
    np.testing.assert_array_equal(b['decoder_loss_weights'][i], (tgt != 0).astype(np.int32))
    np.testing.assert_array_equal(b['decoder_input_tokens'][i][1:n_tok], tgt[:n_tok - 1])
    assert b['decoder_input_tokens'][i][0] == 0


def test_eval_examples_keep_all_references(env):
  task = seqio.get_mixture_or_task('vqav2_raw')
  ds = task.get_dataset(LENGTHS, split='validation', shuffle=False)
  got = [(ex['id'].decode(), task.postprocess_fn(ex['targets_pretokenized'].decode(),
                                                 example=ex, is_target=True))
         for ex in tfds.as_numpy(ds)]
  want = [(e['id'], e['answers']) for e in env['exp']['vqav2']['validation']]
  assert got == want
  assert task.postprocess_fn(' color 0 ', example=None, is_target=False) == 'color 0'
  caps = seqio.get_mixture_or_task('textcaps_raw')
  refs = [caps.postprocess_fn(None, example=ex, is_target=True)
          for ex in tfds.as_numpy(caps.get_dataset(LENGTHS, split='validation',
                                                   shuffle=False))]
  assert refs == [e['answers'] for e in env['exp']['textcaps']['validation']]


def test_corrupt_image_skipped_and_counted(env):
  data.reset_skipped_images()
  rows = _batches('vqav2_raw', 'validation')
  assert sum(len(r['task_id']) for r in rows) == 2  # 3 questions, 1 unreadable image
  assert data.skipped_images() == {'vqav2': 1}
  (bad,) = data.skipped_image_paths('vqav2')
  assert bad.endswith('COCO_val2014_000000000121.jpg')
  assert 'vqav2: 1 unreadable image file(s) skipped' in data.skipped_images_report()


def test_missing_data_errors_name_files_and_sources(env, tmp_path):
  tasks.register_all(env['config'].set_data_dirs({'okvqa': None}))
  try:
    with pytest.raises(data.DataNotFoundError) as e:
      seqio.get_mixture_or_task('okvqa_raw').get_dataset(LENGTHS, split='train')
    msg = str(e.value)
    assert 'ADALINK_DATA_OKVQA' in msg and 'OpenEnded_mscoco_train2014_questions.json' in msg
    assert 'https://okvqa.allenai.org' in msg
    tasks.register_all(env['config'].set_data_dirs({'okvqa': str(tmp_path)}))  # but empty
    with pytest.raises(data.DataNotFoundError) as e:
      seqio.get_mixture_or_task('okvqa_raw').get_dataset(LENGTHS, split='validation')
    msg = str(e.value)
    assert str(tmp_path) in msg and 'mscoco_val2014_annotations.json' in msg
  finally:
    tasks.register_all(env['config'])
  # TFDS datasets are never downloaded implicitly: an unprepared one names the build command.
  with_tfds = env['config'].configure(tfds_data_dir=str(tmp_path / 'tfds'))
  tasks.register_all(with_tfds)
  try:
    with pytest.raises(data.DataNotFoundError) as e:
      seqio.get_mixture_or_task('glue_rte_v002_raw').get_dataset(LENGTHS, split='train')
    msg = str(e.value)
    assert str(tmp_path / 'tfds') in msg and 'tfds build glue' in msg
    assert 'https://gluebenchmark.com' in msg
  finally:
    tasks.register_all(env['config'])
  assert with_tfds.configure(tfds_data_dir='').tfds_data_dir is None  # '': TFDS's default


def _mmit_prompts(split, seed):
  task = seqio.get_mixture_or_task('stvqa_mmit')
  ds = task.get_dataset(LENGTHS, split=split, shuffle=False, seed=seed)
  return [(int(ex['prompt_index']), ex['inputs_pretokenized'].decode(),
           ex['question'].decode()) for ex in tfds.as_numpy(ds)]


def test_mmit_sampling_deterministic_varied_and_fixed_in_eval(env):
  a, b, c = _mmit_prompts('train', 1), _mmit_prompts('train', 1), _mmit_prompts('train', 2)
  assert len(a) == len(env['exp']['stvqa']['train']) >= 8
  assert a == b
  assert [x[0] for x in a] != [x[0] for x in c]
  assert len({x[0] for x in a}) >= 3  # several paraphrases in use
  for idx, text, q in a:
    assert text == prompts.MMIT_TEXT_VQA[idx].format(question=q)
  ev = _mmit_prompts('validation', 1)
  assert ev and all(i == 0 for i, _, _ in ev)
  assert [t for _, t, _ in ev] == [prompts.MMIT_TEXT_VQA[0].format(question=q) for _, _, q in ev]


def test_json_source_shards_and_seeded_epoch_shuffle(env):
  task = seqio.get_mixture_or_task('stvqa_raw')
  ids = [e['id'] for e in env['exp']['stvqa']['train']]
  shards = [[x['id'].decode() for x in tfds.as_numpy(task.source.get_dataset(
      'train', shuffle=False, shard_info=seqio.ShardInfo(i, 3)))] for i in range(3)]
  assert sorted(sum(shards, [])) == sorted(ids) and all(shards)
  assert shards[1] == ids[1::3]

  def two_epochs(seed):
    ds = task.source.get_dataset('train', shuffle=True, seed=seed).repeat(2)
    return [x['id'].decode() for x in tfds.as_numpy(ds)]
  a = two_epochs(5)
  assert a == two_epochs(5) and a != two_epochs(6)
  n = len(ids)
  assert sorted(a[:n]) == sorted(a[n:]) == sorted(ids) and a[:n] != a[n:]
  # The converter's default image size is the configured one.
  assert data.PaLIFeatureConverter.for_config(env['config']).image_size == SIZE


def test_mixtures(env):
  vqa = seqio.get_mixture_or_task('vqa_raw')
  assert sorted(t.name for t in vqa.tasks) == sorted(
      f'{b}_raw' for b in ('vqav2', 'okvqa', 'textvqa', 'stvqa', 'docvqa'))
  caps = seqio.get_mixture_or_task('captioning_mmit')
  assert sorted(t.name for t in caps.tasks) == ['coco_captions_mmit', 'textcaps_mmit']
  mmit = seqio.get_mixture_or_task('mmit')
  rates = {t.name: mmit.get_rate(t) for t in mmit.tasks}
  assert len(rates) == 7 and all(n.endswith('_mmit') for n in rates)
  assert rates['okvqa_mmit'] == 9009.0 and rates['vqav2_mmit'] == 30000.0
  # JSON-only sub-mixture, sampled end to end: each row's task id belongs to a VQA task.
  ids = {tasks.TASK_IDS[b] for b in ('okvqa', 'textvqa')}
  seqio.MixtureRegistry.remove('_test_small_vqa')
  seqio.MixtureRegistry.add('_test_small_vqa', [('okvqa_raw', 1.0), ('textvqa_raw', 1.0)])
  ds = seqio.get_dataset('_test_small_vqa', LENGTHS, data.PaLIFeatureConverter(SIZE),
                         dataset_split='train', shuffle=True, seed=0, num_epochs=None)
  got = [int(x['task_id']) for x in tfds.as_numpy(ds.take(12))]
  assert set(got) == ids
  seqio.MixtureRegistry.remove('_test_small_vqa')


def test_names_styles_and_task_ids(env):
  assert tasks.task_name('vqav2', 'mmit') == 'vqav2_mmit'
  assert tasks.task_name('glue_cola', 'raw') == 'glue_cola_v002_raw'
  mmit = env['config'].configure(prompt_style='mmit')
  assert tasks.task_name('textcaps', config=mmit) == 'textcaps_mmit'  # style from the config
  assert tasks.task_name('textcaps') == 'textcaps_raw'
  for style in ('raw', 'mmit'):
    for b in tasks.BENCHMARKS:
      name = tasks.task_name(b, style)
      assert seqio.get_mixture_or_task(name).name == name
      assert tasks.task_id(name) == tasks.TASK_IDS[b]
  assert len(set(tasks.TASK_IDS.values())) == len(tasks.BENCHMARKS)
  assert tasks.task_id('glue_mnli_mismatched_v002_mmit') == tasks.TASK_IDS['glue_mnli']
  with pytest.raises(KeyError, match='known'):
    tasks.task_id('squad_raw')


def test_vocabulary_change_reregisters(env, tmp_path):
  task = seqio.get_mixture_or_task('docvqa_raw')
  assert task.output_features['inputs'].vocabulary is env['vocab']
  assert task.output_features['inputs'].vocabulary.vocab_size == spm.SentencePieceProcessor(
      model_file=env['config'].vocab_path).get_piece_size()


# ----------------------------------------------------------------------------- TFDS tasks


@pytest.fixture
def tfds_mock(monkeypatch):
  # Mocked TFDS builders have no split metadata, so seqio's size lookup would fail: give it
  # the mock's example count (the source itself is unchanged).
  monkeypatch.setattr(seqio.TfdsDataSource, 'num_input_examples',
                      lambda self, split: MOCK_N)
  with tfds.testing.mock_data(num_examples=MOCK_N, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _norm(s):
  return ' '.join(s.split())


COCO_FAKE = {  # split -> [(image id, captions)]; the image with no caption is dropped
    'train+restval': [(11, ['a dog on a sofa', 'a brown dog', 'dog resting']),
                      (12, ['two cats', 'cats on a bed'])],
    'val': [(21, ['a red bus', 'a bus on the street']), (22, []), (23, ['a kite'])],
}


def _coco_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
  """Stands in for the prepared TFDS coco_captions: JPEG bytes, as with SkipDecoding."""
  del self, read_config, kwargs
  assert isinstance(decoders['image'], tfds.decode.SkipDecoding)  # the source asks for bytes
  rows = COCO_FAKE[str(split)]
  enc = [tf.io.encode_jpeg(tf.fill([20 + i, 30, 3], tf.constant(_color(str(i))[0], tf.uint8)),
                           quality=95).numpy() for i, _ in rows]
  return tf.data.Dataset.from_generator(
      lambda: ({'image': e, 'image/id': np.int64(i),
                'captions': {'text': np.array(c, dtype=object), 'id': np.arange(len(c))}}
               for e, (i, c) in zip(enc, rows)),
      output_signature={'image': tf.TensorSpec([], tf.string),
                        'image/id': tf.TensorSpec([], tf.int64),
                        'captions': {'text': tf.TensorSpec([None], tf.string),
                                     'id': tf.TensorSpec([None], tf.int64)}})


def test_coco_captions_train_per_caption_eval_per_image(env, monkeypatch):
  monkeypatch.setattr(seqio.TfdsDataSource, 'num_input_examples', lambda self, split: 3)
  vocab = env['vocab']
  with tfds.testing.mock_data(as_dataset_fn=_coco_as_dataset,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    train = _batches('coco_captions_raw', 'train')
    task = seqio.get_mixture_or_task('coco_captions_mmit')
    ev = list(tfds.as_numpy(task.get_dataset(LENGTHS, split='validation', shuffle=False)))
  # Training: one example per (image, caption), Karpathy train + restval.
  b = {k: np.concatenate([x[k] for x in train]) for k in train[0]}
  want = [(i, c) for i, cs in COCO_FAKE['train+restval'] for c in cs]
  assert [_decode(vocab, r) for r in b['decoder_target_tokens']] == [c for _, c in want]
  assert all(_decode(vocab, r) == 'caption en' for r in b['encoder_input_tokens'])
  assert b['image'].shape == (len(want), SIZE, SIZE, 3)
  for row, (i, _) in zip(b['image'], want):
    np.testing.assert_allclose(row, _color(str(i))[0] / 127.5 - 1, atol=3 / 127.5)
  assert (b['task_id'] == tasks.TASK_IDS['coco_captions']).all()
  # Evaluation: one example per captioned image, all references kept, fixed mmit prompt.
  want = [(i, c) for i, c in COCO_FAKE['val'] if c]
  assert [(int(ex['id']), task.postprocess_fn(None, example=ex, is_target=True))
          for ex in ev] == want
  for ex in ev:
    assert ex['image'].shape == (SIZE, SIZE, 3) and ex['image'].dtype == np.float32
    assert ex['inputs_pretokenized'].decode() == prompts.MMIT_CAPTION[0]
    assert ex['targets_pretokenized'].decode() == dict(want)[int(ex['id'])][0]


def test_glue_t5_format_and_labels(env, tfds_mock):
  vocab = env['vocab']
  for name, fields in (('cola', ['sentence']), ('mnli', ['hypothesis', 'premise']),
                       ('qnli', ['question', 'sentence'])):
    split = 'validation_matched' if name == 'mnli' else 'validation'
    raw = list(tfds.as_numpy(tfds.load(f'glue/{name}', split=split)))
    task = seqio.get_mixture_or_task(f'glue_{name}_v002_raw')
    got = list(tfds.as_numpy(task.get_dataset(LENGTHS, split=split, shuffle=False)))
    classes = tfds.text.glue.Glue.builder_configs[name].label_classes
    assert len(got) == len(raw) == MOCK_N
    for ex, r in zip(got, raw):
      want_in = ' '.join([name] + [f'{f}: {r[f].decode()}' for f in fields])
      assert ex['inputs_pretokenized'].decode() == want_in
      assert _decode(vocab, ex['inputs']) == _norm(want_in)
      assert ex['targets_pretokenized'].decode() == classes[r['label']]
      assert int(ex['task_id']) == tasks.TASK_IDS[f'glue_{name}']
      assert task.postprocess_fn(classes[r['label']]) == r['label']
  assert glue_tasks.label_classes('cola') == ['unacceptable', 'acceptable']
  mm = seqio.get_mixture_or_task('glue_mnli_mismatched_v002_mmit')
  ex = next(iter(tfds.as_numpy(mm.get_dataset(LENGTHS, split='validation',
                                               shuffle=False))))
  assert ex['inputs_pretokenized'].decode() == prompts.GLUE_MMIT['mnli'][0].format(
      premise=ex['premise'].decode(), hypothesis=ex['hypothesis'].decode())
  assert int(ex['task_id']) == tasks.TASK_IDS['glue_mnli']


def test_stsb_rounding_matches_t5_rule(env):
  labels = np.array([0.0, 0.1, 0.29, 0.3, 1.5, 2.5, 2.7, 3.75, 4.9, 4.95, 5.0], np.float32)

  def as_dataset(self, split, *args, **kwargs):
    del self, split, args, kwargs
    return tf.data.Dataset.from_tensor_slices({
        'sentence1': [f'first {i}' for i in range(len(labels))],
        'sentence2': [f'second {i}' for i in range(len(labels))],
        'label': labels, 'idx': np.arange(len(labels), dtype=np.int32)})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    task = seqio.get_mixture_or_task('glue_stsb_v002_raw')
    source = task.source
    source.num_input_examples = lambda split: len(labels)  # mock has no split sizes
    got = [ex['targets_pretokenized'].decode() for ex in
           tfds.as_numpy(task.get_dataset(LENGTHS, split='train', shuffle=False))]
  # T5: tf.as_string(tf.round(label * 5) / 5, precision=1); numpy's round is also half-even.
  want = ['%.1f' % (np.round(np.float32(y) * np.float32(5)) / np.float32(5)) for y in labels]
  assert got == want
  # float32 0.1 * 5 == 0.5 and 2.5 * 5 == 12.5 round half to even; 3.75 -> 18.75 -> 3.8.
  assert (want[1], want[3], want[5], want[7], want[-2]) == ('0.0', '0.4', '2.4', '3.8', '5.0')
  assert task.postprocess_fn('3.8') == 3.8 and task.postprocess_fn('x') == -1.0


def test_glue_mixture_has_t5_rates(env, tfds_mock):
  # t5/data/glue_utils.py GLUE_WEIGHT_MAPPING (training-set sizes, uncapped).
  t5 = {'cola': 8551., 'sst2': 67349., 'mrpc': 3668., 'qqp': 363849., 'stsb': 5749.,
        'mnli': 392702., 'qnli': 104743., 'rte': 2490., 'mnli_mismatched': 0.,
        'mnli_matched': 0.}
  for style in ('raw', 'mmit'):
    mix = seqio.get_mixture_or_task(f'glue_v002_proportional_{style}')
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    assert rates == {f'glue_{k}_v002_{style}': v for k, v in t5.items()}
    assert mix.total_rate == sum(t5.values())
  mix = seqio.get_mixture_or_task('glue_v002_proportional_raw')
  # Eval-only tasks have no train split, so training mixes the 8 weighted tasks.
  assert sorted(t.name for t in mix.tasks if 'train' in t.splits) == sorted(
      f'glue_{k}_v002_raw' for k, v in t5.items() if v > 0)
  ds = seqio.get_dataset(mix, LENGTHS, data.PaLIFeatureConverter(image_size=None),
                         dataset_split='train', shuffle=False, seed=3, num_epochs=None)
  ex = next(iter(tfds.as_numpy(ds.batch(16))))
  assert ex['encoder_input_tokens'].shape == (16, LENGTHS['inputs'])
  assert set(ex['task_id']) <= {tasks.TASK_IDS[f'glue_{k}'] for k, v in t5.items() if v > 0}
  assert 'image' not in ex


def test_glue_packing(env, tfds_mock):
  conv = data.PaLIFeatureConverter(image_size=None, with_task_id=False, pack=True)
  ds = seqio.get_dataset('glue_sst2_v002_raw', {'inputs': 128, 'targets': 32}, conv,
                         dataset_split='validation', shuffle=False)
  rows = list(tfds.as_numpy(ds))
  # Each mock example is short, so several are packed per row (segment ids count them).
  seg = np.concatenate([r['encoder_segment_ids'] for r in rows])
  assert len(rows) < MOCK_N and seg.max() >= 2
  n_examples = sum(int(r['encoder_segment_ids'].max()) for r in rows)
  assert n_examples == MOCK_N
  for r in rows:
    assert r['encoder_input_tokens'].shape == (128,)
    assert r['decoder_target_tokens'].shape == (32,)
    # Positions restart at 0 in every segment.
    for s in range(1, int(r['encoder_segment_ids'].max()) + 1):
      pos = r['encoder_positions'][r['encoder_segment_ids'] == s]
      np.testing.assert_array_equal(pos, np.arange(len(pos)))
