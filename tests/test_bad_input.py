"""Bad input, reported: over-long text (fitted by config.data.truncate and counted), a dataset
whose images are all unreadable, a vocabulary that cannot be read, and the README's
``--config.data.data_dirs.<key>=DIR`` override.

The data is a VQAv2-layout dataset in the official JSON format with real JPEGs (written with
tests/test_tasks.py's helpers), a SentencePiece model trained on it, and the real experiment
config (configs/vqav2_raw.py) read by SeqioSource, the trainer's input pipeline.
"""
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from adalink_jax import config_lib
from adalink_jax import data
from adalink_jax import seqio_source
import tasks
from tests import test_tasks

# tests/test_tasks.py's writers of official-format files, real images and the vocabulary.
# pylint: disable=protected-access
_write_image, _dump = test_tasks._write_image, test_tasks._dump
_vqa_answers, _train_vocab = test_tasks._vqa_answers, test_tasks._train_vocab
# pylint: enable=protected-access

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
FILLER, END = 'the', 'so what color is the big bus on the left?'
LONG_Q = ' '.join([FILLER] * 150 + [f'word{i}' for i in range(148)] + [END])  # 307 words
LONG_A = 'a very long answer about a red double decker bus with many windows'
# question_id -> (question, most frequent answer); 1230 is the over-long question.
QUESTIONS = {1230: (LONG_Q, 'red'), 1231: ('what is this?', 'bus'), 1232: ('which bus?', LONG_A)}


def _write_split(root, coco, subset, corrupt=False):
  questions, annotations = [], []
  for j, (qid, (q, a)) in enumerate(QUESTIONS.items()):
    path = os.path.join(coco, subset, f'COCO_{subset}_{j + 1:012d}.jpg')
    if corrupt:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      pathlib.Path(path).write_bytes(b'\xff\xd8\xff\xe0 not a complete jpeg')
    else:
      _write_image(path, path)
    questions.append({'image_id': j + 1, 'question': q, 'question_id': qid})
    annotations.append({'question_id': qid, 'image_id': j + 1, 'question_type': 'what',
                        'answer_type': 'other', 'multiple_choice_answer': a,
                        'answers': _vqa_answers(a, 'blue')})
  vqav2 = os.path.join(root, 'vqav2')
  _dump(os.path.join(vqav2, f'v2_OpenEnded_mscoco_{subset}_questions.json'),
        {'questions': questions})
  _dump(os.path.join(vqav2, f'v2_mscoco_{subset}_annotations.json'), {'annotations': annotations})


@pytest.fixture(scope='module')
def vqa(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('bad_input'))
  for subset in ('train2014', 'val2014'):
    _write_split(root, os.path.join(root, 'coco'), subset)
    _write_split(root, os.path.join(root, 'bad_coco'), subset, corrupt=True)
  vocab = _train_vocab(root, [LONG_Q, LONG_A, 'what is this which bus'])
  yield {'root': root, 'vocab_path': vocab}
  data.reset_truncations()
  data.reset_skipped_images()


def _config(vqa, coco='coco', **data_over):
  """configs/vqav2_raw.py (tiny model, batch 2) pointed at the fixture's files."""
  c = config_lib.multimodal('vqav2', 'raw', 'vqa_accuracy',
                            f'model=tiny,batch=2,image_size={SIZE}')
  c.data.vocab = vqa['vocab_path']
  c.data.data_dirs.vqav2 = os.path.join(vqa['root'], 'vqav2')
  c.data.data_dirs.coco = os.path.join(vqa['root'], coco)
  c.data.text_len, c.data.target_len = 16, 8
  with c.data.unlocked():
    c.data.extra_ids = 0  # the model is small; no sentinel ids needed
  for k, v in data_over.items():
    c.data[k] = v
  return c


def _eval_rows(source):
  """Every eval row of the split (encoder tokens, target tokens, decoded prompt), file order."""
  rows = []
  for b in source.eval_batches(0, source.eval_tasks()[0].name):
    for i in range(int(b['valid'].sum())):
      rows.append((b['encoder_input_tokens'][i].tolist(),
                   b['decoder_target_tokens'][i].tolist(), b['prompts'][i]))
  return rows


def _padded(tokens, length):
  return tokens + [0] * (length - len(tokens))


# ------------------------------------------------------------------------------ truncation


def test_question_start_keeps_prompt_and_question_end_and_counts(vqa):
  data.reset_truncations()
  source = seqio_source.SeqioSource(_config(vqa))
  vocab = source.vocab
  rows = _eval_rows(source)
  assert len(rows) == 3
  full = vocab.encode('answer en ' + LONG_Q)
  assert len(full) > 300 and vocab.encode('answer en') == full[:2]
  # Room for 15 tokens before EOS: 'answer en' (2) + the last 13, from the first word start.
  tail = full[-13:]
  while not vocab.tokenizer.id_to_piece(tail[0]).startswith('\u2581'):
    tail = tail[1:]
  want = full[:2] + tail + [1]
  assert rows[0][0] == _padded(want, 16)
  kept = rows[0][2][len('answer en '):]
  assert rows[0][2].startswith('answer en ') and LONG_Q.endswith(' ' + kept)  # whole words
  assert kept.endswith('bus on the left?')
  assert FILLER + ' ' + FILLER not in rows[0][2]  # the old cut kept only 'the the the ...'
  # Short examples are untouched: exactly seqio's tokens plus EOS.
  assert rows[1][0] == _padded(vocab.encode('answer en what is this?') + [1], 16)
  # Targets keep their start (7 tokens + EOS).
  assert rows[2][1] == vocab.encode(LONG_A)[:7] + [1]
  assert rows[1][1] == _padded(vocab.encode('bus') + [1], 8)
  counts = {'vqav2_raw': {'inputs': 1, 'targets': 1}}
  assert data.truncations() == counts
  _eval_rows(source)  # a second pass over the same examples counts nothing new
  report = data.data_report()
  assert report['truncated'] == counts and set(report) == {'truncated', 'skipped_images'}
  assert data.truncations_report() == (
      'vqav2_raw: 1 example(s) with truncated inputs, 1 with truncated targets')
  # Training examples are counted too (as distinct ' (train)' examples).
  batch = next(source.train_batches(0))
  assert batch['encoder_input_tokens'].shape == (2, 16)
  assert sum(data.truncations()['vqav2_raw'].values()) >= 3


def test_end_mode_cuts_the_tail(vqa):
  data.reset_truncations()
  source = seqio_source.SeqioSource(_config(vqa, truncate='end'))
  rows = _eval_rows(source)
  full = source.vocab.encode('answer en ' + LONG_Q)
  assert rows[0][0] == full[:15] + [1]
  assert rows[0][2] == 'answer en ' + ' '.join([FILLER] * 13)
  assert data.truncations() == {'vqav2_raw': {'inputs': 1, 'targets': 1}}


def test_error_mode_refuses_with_task_id_and_lengths(vqa):
  source = seqio_source.SeqioSource(_config(vqa, truncate='error'))
  n = len(source.vocab.encode('answer en ' + LONG_Q))
  with pytest.raises(data.TruncationError) as e:
    _eval_rows(source)
  msg = str(e.value)
  assert '\n' not in msg
  for part in ("task 'vqav2_raw'", 'example 1230:', f'inputs has {n} tokens', 'at most 15',
               'config.data.text_len', "config.data.truncate='error'", 'question_start'):
    assert part in msg, (part, msg)
  with pytest.raises(data.TruncationError, match=r'example 123[02] \(train\)'):
    next(source.train_batches(0))


def test_truncate_setting_is_checked(vqa):
  with pytest.raises(ValueError, match=r"config.data.truncate.*'question_start', 'end', "
                     r"'error'.*'middle'"):
    seqio_source.SeqioSource(_config(vqa, truncate='middle'))


# ------------------------------------------------------------------------ unreadable images


def test_all_images_unreadable_names_dataset_count_and_folder(vqa):
  data.reset_skipped_images()
  source = seqio_source.SeqioSource(_config(vqa, coco='bad_coco'))
  bad = os.path.join(vqa['root'], 'bad_coco')
  with pytest.raises(data.NoExamplesError) as e:
    next(source.train_batches(0))  # was a bare StopIteration
  msg = str(e.value)
  for part in ("config.data.task 'vqav2_raw'", "split 'train'", 'batch of 2 examples',
               "dataset 'vqav2': 3 unreadable image file(s) skipped",
               f"looked in '{os.path.join(bad, 'train2014')}'", f"data dir 'coco': '{bad}'"):
    assert part in msg, (part, msg)
  with pytest.raises(data.NoExamplesError) as e:
    list(source.eval_batches(0, source.eval_tasks()[0].name))
  msg = str(e.value)
  assert "split 'validation'" in msg and "dataset 'vqav2': 6 unreadable" in msg
  assert f"looked in '{bad}'" in msg  # train2014 and val2014 both hold skipped files
  assert data.data_report()['skipped_images'] == {'vqav2': 6}


def test_some_images_unreadable_is_a_counted_skip(vqa, tmp_path):
  data.reset_skipped_images()
  coco = tmp_path / 'coco'
  _write_split(str(tmp_path), str(coco), 'val2014')
  (coco / 'val2014' / 'COCO_val2014_000000000002.jpg').write_bytes(b'\xff\xd8 cut short')
  c = _config(vqa)
  c.data.data_dirs.coco = str(coco)
  rows = _eval_rows(seqio_source.SeqioSource(c))
  assert len(rows) == 2 and data.skipped_images() == {'vqav2': 1}


# ------------------------------------------------------------------------------ vocabulary


def _vocab_error(vqa, path, tried=None):
  with pytest.raises(data.VocabularyNotFoundError) as e:
    seqio_source.SeqioSource(_config(vqa, vocab=path))
  msg = str(e.value)
  assert '\n' not in msg
  for part in (repr(tried or path), 'config.data.vocab',
               '--config.data.vocab=/path/to/spiece.model', 'configure(vocab_path=...)'):
    assert part in msg, (part, msg)
  return msg


def test_unreadable_vocabulary_names_setting_path_and_fix(vqa, tmp_path):
  msg = _vocab_error(vqa, str(tmp_path / 'missing.model'))
  assert 'NotFoundError' in msg
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'this is not a sentencepiece model')
  _vocab_error(vqa, str(garbage))
  t = time.time()
  _vocab_error(vqa, 'gs://adalink-jax-tests-no-such-bucket/spm.model')
  assert time.time() - t < 60
  # The task pipeline itself fails the same way, not deep inside seqio.
  import seqio  # pylint: disable=g-import-not-at-top
  with pytest.raises(data.VocabularyNotFoundError, match='no-such-bucket'):
    seqio.get_mixture_or_task('vqav2_raw').get_dataset({'inputs': 16, 'targets': 8},
                                                       split='validation')


def _offline():
  try:
    socket.getaddrinfo('storage.googleapis.com', 443)
    return False
  except OSError:
    return True


@pytest.mark.skipif(not _offline(), reason='the default vocabulary is readable online')
def test_default_gs_vocabulary_offline_says_it_is_the_default(vqa):
  msg = _vocab_error(vqa, '', tried=data.DEFAULT_VOCAB_PATH)  # '': the default
  for part in ('the default: config.data.vocab is empty', 'Could not resolve host',
               f'gsutil cp {data.DEFAULT_VOCAB_PATH} .', 'spiece.model in a Hugging Face'):
    assert part in msg, (part, msg)


# ------------------------------------------------------------------- README's config override


def _parse(argv):
  """The train CLI's flag parsing (same DEFINE_config_file call), in process."""
  fv, argv = flags.FlagValues(), ['train'] + argv
  config_flags.DEFINE_config_file('config', None, 'experiment config', flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_readme_data_dir_override_reaches_the_data(vqa):
  vqav2, coco = os.path.join(vqa['root'], 'vqav2'), os.path.join(vqa['root'], 'coco')
  c = _parse([f'--config={ROOT}/configs/vqav2_raw.py:method=adalink,rank=64,model=tiny,batch=2,'
              f'image_size={SIZE}', f'--config.data.data_dirs.vqav2={vqav2}',
              f'--config.data.data_dirs.coco={coco}', f'--config.data.vocab={vqa["vocab_path"]}',
              '--config.data.text_len=16', '--config.data.target_len=8'])
  assert (c.data.data_dirs.vqav2, c.data.data_dirs.coco) == (vqav2, coco)
  source = seqio_source.SeqioSource(c)
  rows = _eval_rows(source)
  assert source.data_config.data_dirs['vqav2'] == vqav2
  assert [r[2] for r in rows[1:]] == ['answer en what is this?', 'answer en which bus?']
  # Every known key is a field, in the multimodal and GLUE configs alike.
  for cfg, truncate in (('coco_mmit', 'question_start'), ('glue_t5xxl', 'end')):
    c = _parse([f'--config={ROOT}/configs/{cfg}.py'] +
               [f'--config.data.data_dirs.{k}=/d/{k}' for k in tasks.DATA_DIR_KEYS])
    assert dict(c.data.data_dirs) == {k: f'/d/{k}' for k in tasks.DATA_DIR_KEYS}
    assert c.data.truncate == truncate


def test_readme_command_parses(tmp_path):
  # README "Running experiments", with the data-dir override it documents; --dry_run builds
  # everything abstractly, so no checkpoint or data is read.
  cmd = [sys.executable, '-m', 'adalink_jax.train',
         '--config=configs/vqav2_raw.py:method=adalink,rank=64', f'--workdir={tmp_path}/run',
         '--config.init.t5=/ckpt/flan-t5-xl', '--config.init.vit=/ckpt/siglip_so400m_14_224.npz',
         '--config.data.tfds_data_dir=/data/tfds', '--config.data.data_dirs.vqav2=/data/vqa',
         '--dry_run']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'per-device memory estimate' in out.stdout
