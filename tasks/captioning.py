"""Captioning tasks: COCO Captions (TFDS, Karpathy splits) and TextCaps (official JSON).

Training yields one example per (image, caption) pair; evaluation yields one example per
image whose ``answers`` hold all reference captions (CIDEr is computed against all of them).
"""
from __future__ import annotations

import collections
import functools
import os

from adalink_jax import data
from adalink_jax import metrics
from tasks import common
from tasks import prompts
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

# seqio split -> TFDS split. Karpathy 'restval' images are training data (113,287 images).
COCO_SPLITS = {'train': 'train+restval', 'validation': 'val', 'test': 'test'}
COCO_TFDS_NAME = 'coco_captions:1.1.0'

TEXTCAPS_FILES = {'train': 'TextCaps_0.1_train.json', 'validation': 'TextCaps_0.1_val.json'}


def _coco_to_common(ds: tf.data.Dataset, split: str) -> tf.data.Dataset:
  """TFDS coco_captions examples -> the common schema (per caption when training)."""
  def convert(ex):
    return {'image_encoded': ex['image'], 'id': tf.strings.as_string(ex['image/id']),
            'question': tf.constant(''), 'answers': ex['captions']['text']}
  ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.filter(lambda ex: tf.size(ex['answers']) > 0)
  if split == common.TRAIN:
    def per_caption(ex):
      return tf.data.Dataset.from_tensor_slices(ex['answers']).map(
          lambda caption: {**ex, 'target': caption})
    return ds.flat_map(per_caption)
  return ds.map(lambda ex: {**ex, 'target': ex['answers'][0]})


def textcaps_records(split: str) -> list[dict]:
  """TextCaps_0.1_{train,val}.json -> records.

  Official entries: ``{'image_id', 'image_name', 'image_path', 'caption_str',
  'reference_strs', ...}``, one per caption. Images are TextVQA's
  ``train_images/<image_name>.jpg`` (folder: data dir key 'textcaps_images', default
  ``<textcaps>/train_images``).
  """
  fname = TEXTCAPS_FILES[split]
  root = data.data_dir('textcaps', expected=[fname])
  images = data.config().data_dirs.get('textcaps_images') or os.path.join(root, 'train_images')
  entries = common.read_json(os.path.join(root, fname))['data']

  def path(e):
    name = e.get('image_name') or e['image_id']
    return os.path.join(images, f'{name}.jpg')

  if split == common.TRAIN:
    return [common.record(path(e), e['image_id'], '', e['caption_str'],
                          e.get('reference_strs') or [e['caption_str']])
            for e in entries if e.get('caption_str')]
  by_image = collections.OrderedDict()
  for e in entries:
    by_image.setdefault(e['image_id'], []).append(e)
  out = []
  for image_id, group in by_image.items():
    refs = group[0].get('reference_strs') or [e['caption_str'] for e in group
                                              if e.get('caption_str')]
    if refs:
      out.append(common.record(path(group[0]), image_id, '', refs[0], refs))
  return out


def register(style: str) -> None:
  """Registers ``coco_captions_{style}`` and ``textcaps_{style}``."""
  feats = common.image_output_features()
  for bench, source in (
      ('coco_captions', common.TrainingFlagTfdsSource(
          COCO_TFDS_NAME, COCO_SPLITS, hint_key='coco_captions', map_fn=_coco_to_common,
          # Keep JPEG bytes until after sharding / seqio's in-memory caching of small splits
          # (5,000 decoded val images would take ~4.6 GB).
          decoders={'image': tfds.decode.SkipDecoding()})),
      ('textcaps', common.JsonImageSource('textcaps', textcaps_records,
                                          splits=tuple(TEXTCAPS_FILES))),
  ):
    name = common.task_name(bench, style)
    common.add_task(
        name,
        source=source,
        preprocessors=[functools.partial(common.decode_images, dataset_name=bench),
                       seqio.CacheDatasetPlaceholder(required=False),
                       *common.text_chain(name, prompts.image_templates(bench, style),
                                          common.TASK_IDS[bench])],
        output_features=feats,
        postprocess_fn=common.references_postprocessor,
        metric_fns=[metrics.seqio_caption_metrics],
    )
