"""VQA tasks from official JSON files: VQAv2, OK-VQA, TextVQA, ST-VQA, DocVQA.

Training target: the most frequent of the annotated answers (ties: first seen). Every
example keeps all answers in ``answers`` for the metrics (VQA accuracy over the 10 human
answers; ANLS over the accepted answers for ST-VQA / DocVQA).
"""
from __future__ import annotations

import functools
import hashlib
import os

from adalink_jax import data
from adalink_jax import metrics
from tasks import common
from tasks import prompts
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position

COCO_SUBSETS = {'train': 'train2014', 'validation': 'val2014'}
VQAV2_FILES = {s: (f'v2_OpenEnded_mscoco_{c}_questions.json', f'v2_mscoco_{c}_annotations.json')
               for s, c in COCO_SUBSETS.items()}
OKVQA_FILES = {s: (f'OpenEnded_mscoco_{c}_questions.json', f'mscoco_{c}_annotations.json')
               for s, c in COCO_SUBSETS.items()}
TEXTVQA_FILES = {'train': 'TextVQA_0.5.1_train.json', 'validation': 'TextVQA_0.5.1_val.json'}
STVQA_FILE = 'train_task_3.json'
# ST-VQA publishes answers for its train set only; a fixed, content-hashed 1/10 of the train
# images is held out as 'validation' (the same images on every machine and run).
STVQA_HOLDOUT_MODULO = 10
DOCVQA_SPLITS = {'train': 'train', 'validation': 'val'}


def _coco_vqa_records(key: str, files: dict, split: str) -> list[dict]:
  """Joins the question and annotation files of a VQAv2-format dataset."""
  qfile, afile = files[split]
  root = data.data_dir(key, expected=[qfile, afile])
  questions = common.read_json(os.path.join(root, qfile))['questions']
  annotations = {a['question_id']: a
                 for a in common.read_json(os.path.join(root, afile))['annotations']}
  coco_root = data.data_dir('coco', expected=[COCO_SUBSETS[split]], hint_key='coco')
  subset = COCO_SUBSETS[split]
  out = []
  for q in questions:
    ann = annotations.get(q['question_id'])
    if ann is None:
      raise ValueError(f'{key}: question {q["question_id"]} of {qfile} has no entry in {afile}')
    answers = [a['answer'] for a in ann['answers']]
    path = os.path.join(coco_root, subset, f'COCO_{subset}_{int(q["image_id"]):012d}.jpg')
    out.append(common.record(path, q['question_id'], q['question'],
                             common.most_common(answers), answers))
  return out


def vqav2_records(split: str) -> list[dict]:
  """v2_OpenEnded_mscoco_{train,val}2014_questions.json + v2_mscoco_*_annotations.json."""
  return _coco_vqa_records('vqav2', VQAV2_FILES, split)


def okvqa_records(split: str) -> list[dict]:
  """OpenEnded_mscoco_{train,val}2014_questions.json + mscoco_*_annotations.json (OK-VQA)."""
  return _coco_vqa_records('okvqa', OKVQA_FILES, split)


def _images_dir(key: str, root: str, default_sub: str) -> str:
  return data.config().data_dirs.get(f'{key}_images') or os.path.join(root, default_sub)


def textvqa_records(split: str) -> list[dict]:
  """TextVQA_0.5.1_{train,val}.json (``data: [{question, question_id, image_id, answers}]``);
  images ``train_images/<image_id>.jpg`` (val images live there too)."""
  fname = TEXTVQA_FILES[split]
  root = data.data_dir('textvqa', expected=[fname])
  images = _images_dir('textvqa', root, 'train_images')
  out = []
  for e in common.read_json(os.path.join(root, fname))['data']:
    answers = list(e.get('answers') or [])
    out.append(common.record(os.path.join(images, f'{e["image_id"]}.jpg'), e['question_id'],
                             e['question'], common.most_common(answers), answers))
  return out


def stvqa_is_holdout(file_path: str) -> bool:
  """Whether an ST-VQA train image belongs to our held-out validation split."""
  digest = hashlib.md5(file_path.encode('utf-8')).hexdigest()
  return int(digest, 16) % STVQA_HOLDOUT_MODULO == 0


def stvqa_records(split: str) -> list[dict]:
  """train_task_3.json (``data: [{question_id, question, answers, file_path, ...}]``);
  images ``train_images/<file_path>``."""
  root = data.data_dir('stvqa', expected=[STVQA_FILE])
  images = _images_dir('stvqa', root, 'train_images')
  want_holdout = split != common.TRAIN
  out = []
  for e in common.read_json(os.path.join(root, STVQA_FILE))['data']:
    if stvqa_is_holdout(e['file_path']) != want_holdout:
      continue
    answers = list(e.get('answers') or [])
    out.append(common.record(os.path.join(images, e['file_path']), e['question_id'],
                             e['question'], common.most_common(answers), answers))
  return out


def docvqa_records(split: str) -> list[dict]:
  """{train,val}_v1.0_withQT.json or {train,val}_v1.0.json (``data: [{questionId, question,
  image: 'documents/<name>.png', answers}]``), at the data dir or in its split folder;
  images ``<split folder>/<image>``."""
  sub = DOCVQA_SPLITS[split]
  root = data.data_dir('docvqa')
  jpath = data.first_existing(
      root, [f'{sub}_v1.0_withQT.json', f'{sub}_v1.0.json',
             f'{sub}/{sub}_v1.0_withQT.json', f'{sub}/{sub}_v1.0.json'], 'docvqa')
  images = _images_dir('docvqa', root, sub)
  out = []
  for e in common.read_json(jpath)['data']:
    answers = list(e.get('answers') or [])
    out.append(common.record(os.path.join(images, e['image']), e['questionId'], e['question'],
                             common.most_common(answers), answers))
  return out


# name -> (records_fn, splits, metric name in adalink_jax.metrics)
VQA_DATASETS = {
    'vqav2': (vqav2_records, tuple(VQAV2_FILES), 'vqa_accuracy'),
    'okvqa': (okvqa_records, tuple(OKVQA_FILES), 'vqa_accuracy'),
    'textvqa': (textvqa_records, tuple(TEXTVQA_FILES), 'vqa_accuracy'),
    'stvqa': (stvqa_records, ('train', 'validation'), 'anls'),
    'docvqa': (docvqa_records, tuple(DOCVQA_SPLITS), 'anls'),
}


def register(style: str) -> None:
  """Registers ``{vqav2,okvqa,textvqa,stvqa,docvqa}_{style}``."""
  feats = common.image_output_features()
  metric_fns = {'vqa_accuracy': metrics.seqio_vqa_accuracy, 'anls': metrics.seqio_anls}
  for bench, (records_fn, splits, metric) in VQA_DATASETS.items():
    name = common.task_name(bench, style)
    common.add_task(
        name,
        source=common.JsonImageSource(bench, records_fn, splits=splits),
        preprocessors=[functools.partial(common.decode_images, dataset_name=bench),
                       seqio.CacheDatasetPlaceholder(required=False),
                       *common.text_chain(name, prompts.image_templates(bench, style),
                                          common.TASK_IDS[bench])],
        output_features=feats,
        postprocess_fn=common.references_postprocessor,
        metric_fns=[metric_fns[metric]],
    )
