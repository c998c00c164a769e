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

# The data-dir keys these tasks read (each is a field config.data.data_dirs.<key>) and where to
# get the data, quoted when it is missing. '<name>_images' optionally moves '<name>'s images.
DATA_DIRS: dict[str, str] = {
    'coco': ('COCO 2014 images: http://images.cocodataset.org/zips/train2014.zip and '
             'http://images.cocodataset.org/zips/val2014.zip (unzip to <coco>/train2014, '
             '<coco>/val2014)'),
    'vqav2': ('VQAv2 (https://visualqa.org/download.html): '
              'https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Questions_{Train,Val}_mscoco.zip '
              'and https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Annotations_{Train,Val}'
              '_mscoco.zip; images from COCO 2014 (data dir key "coco")'),
    'okvqa': ('OK-VQA (https://okvqa.allenai.org/download.html): '
              'https://okvqa.allenai.org/static/data/OpenEnded_mscoco_{train,val}2014_questions'
              '.json.zip and https://okvqa.allenai.org/static/data/mscoco_{train,val}2014_'
              'annotations.json.zip; images from COCO 2014 (data dir key "coco")'),
    'textvqa': ('TextVQA (https://textvqa.org/dataset/): '
                'https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_{train,val}.json and '
                'https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip '
                '(unzips to train_images/)'),
    'textvqa_images': 'optional: the TextVQA image folder (default <textvqa>/train_images)',
    'stvqa': ('ST-VQA task 3 (https://rrc.cvc.uab.es/?ch=11, registration required): '
              'train_task_3.json and train_images/'),
    'stvqa_images': 'optional: the ST-VQA image folder (default <stvqa>/train_images)',
    'docvqa': ('DocVQA (https://rrc.cvc.uab.es/?ch=17, registration required): '
               '{train,val}_v1.0_withQT.json (or {train,val}_v1.0.json) and the documents/ '
               'image folders of each split'),
    'docvqa_images': 'optional: the DocVQA image folder (default <docvqa>/<split folder>)',
}

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


def _data_dir(config: data.DataConfig, key: str, expected=()) -> str:
  return data.data_dir(config, key, expected=expected, hint=DATA_DIRS[key])


def _coco_vqa_records(config: data.DataConfig, key: str, files: dict, split: str) -> list[dict]:
  """Joins the question and annotation files of a VQAv2-format dataset."""
  qfile, afile = files[split]
  root = _data_dir(config, key, expected=[qfile, afile])
  questions = common.read_json(os.path.join(root, qfile))['questions']
  annotations = {a['question_id']: a
                 for a in common.read_json(os.path.join(root, afile))['annotations']}
  coco_root = _data_dir(config, 'coco', expected=[COCO_SUBSETS[split]])
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


def vqav2_records(config: data.DataConfig, split: str) -> list[dict]:
  """v2_OpenEnded_mscoco_{train,val}2014_questions.json + v2_mscoco_*_annotations.json."""
  return _coco_vqa_records(config, 'vqav2', VQAV2_FILES, split)


def okvqa_records(config: data.DataConfig, split: str) -> list[dict]:
  """OpenEnded_mscoco_{train,val}2014_questions.json + mscoco_*_annotations.json (OK-VQA)."""
  return _coco_vqa_records(config, 'okvqa', OKVQA_FILES, split)


def _images_dir(config: data.DataConfig, key: str, root: str, default_sub: str) -> str:
  return config.data_dirs.get(f'{key}_images') or os.path.join(root, default_sub)


def textvqa_records(config: data.DataConfig, split: str) -> list[dict]:
  """TextVQA_0.5.1_{train,val}.json (``data: [{question, question_id, image_id, answers}]``);
  images ``train_images/<image_id>.jpg`` (val images live there too)."""
  fname = TEXTVQA_FILES[split]
  root = _data_dir(config, 'textvqa', expected=[fname])
  images = _images_dir(config, 'textvqa', root, 'train_images')
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


def stvqa_records(config: data.DataConfig, split: str) -> list[dict]:
  """train_task_3.json (``data: [{question_id, question, answers, file_path, ...}]``);
  images ``train_images/<file_path>``."""
  root = _data_dir(config, 'stvqa', expected=[STVQA_FILE])
  images = _images_dir(config, 'stvqa', root, 'train_images')
  want_holdout = split != common.TRAIN
  out = []
  for e in common.read_json(os.path.join(root, STVQA_FILE))['data']:
    if stvqa_is_holdout(e['file_path']) != want_holdout:
      continue
    answers = list(e.get('answers') or [])
    out.append(common.record(os.path.join(images, e['file_path']), e['question_id'],
                             e['question'], common.most_common(answers), answers))
  return out


def docvqa_records(config: data.DataConfig, split: str) -> list[dict]:
  """{train,val}_v1.0_withQT.json or {train,val}_v1.0.json (``data: [{questionId, question,
  image: 'documents/<name>.png', answers}]``), at the data dir or in its split folder;
  images ``<split folder>/<image>``."""
  sub = DOCVQA_SPLITS[split]
  root = _data_dir(config, 'docvqa')
  jpath = data.first_existing(
      root, [f'{sub}_v1.0_withQT.json', f'{sub}_v1.0.json',
             f'{sub}/{sub}_v1.0_withQT.json', f'{sub}/{sub}_v1.0.json'], 'docvqa',
      DATA_DIRS['docvqa'])
  images = _images_dir(config, 'docvqa', root, sub)
  out = []
  for e in common.read_json(jpath)['data']:
    answers = list(e.get('answers') or [])
    out.append(common.record(os.path.join(images, e['image']), e['questionId'], e['question'],
                             common.most_common(answers), answers))
  return out


# name -> (records_fn(config, split), splits, seqio metric function)
VQA_DATASETS = {
    'vqav2': (vqav2_records, tuple(VQAV2_FILES), metrics.seqio_vqa_accuracy),
    'okvqa': (okvqa_records, tuple(OKVQA_FILES), metrics.seqio_vqa_accuracy),
    'textvqa': (textvqa_records, tuple(TEXTVQA_FILES), metrics.seqio_vqa_accuracy),
    'stvqa': (stvqa_records, ('train', 'validation'), metrics.seqio_anls),
    'docvqa': (docvqa_records, tuple(DOCVQA_SPLITS), metrics.seqio_anls),
}


def register(style: str, config: data.DataConfig) -> None:
  """Registers ``{vqav2,okvqa,textvqa,stvqa,docvqa}_{style}``, reading ``config``'s data."""
  feats = common.image_output_features(config)
  for bench, (records_fn, splits, metric_fn) in VQA_DATASETS.items():
    name = common.task_name(bench, style)
    common.add_task(
        name,
        source=common.JsonImageSource(bench, functools.partial(records_fn, config),
                                      splits=splits),
        preprocessors=common.image_preprocessors(config, bench, name,
                                                 prompts.image_templates(bench, style)),
        output_features=feats,
        postprocess_fn=common.references_postprocessor,
        metric_fns=[metric_fn],
    )
