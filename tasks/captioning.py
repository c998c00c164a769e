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
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

# seqio split -> TFDS split. Karpathy 'restval' images are training data (113,287 images).
COCO_SPLITS = {'train': 'train+restval', 'validation': 'val', 'test': 'test'}
COCO_TFDS_NAME = 'coco_captions:1.1.0'

TEXTCAPS_FILES = {'train': 'TextCaps_0.1_train.json', 'validation': 'TextCaps_0.1_val.json'}

# The data-dir keys these tasks read (each is a field config.data.data_dirs.<key>) and where to
# get the data, quoted when it is missing.
DATA_DIRS: dict[str, str] = {
    'textcaps': ('TextCaps (https://textvqa.org/textcaps/): '
                 'https://dl.fbaipublicfiles.com/textvqa/data/textcaps/TextCaps_0.1_{train,val}'
                 '.json; images are TextVQA\'s '
                 'https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip '
                 '(train_images/)'),
    'textcaps_images': 'optional: the TextCaps image folder (default <textcaps>/train_images)',
}
# COCO Captions come from TFDS (config.data.tfds_data_dir), not from a data dir.
COCO_CAPTIONS_HINT = ('TFDS coco_captions (Karpathy splits): run `tfds build coco_captions '
                      '--data_dir=<tfds_data_dir>`; it downloads COCO 2014 from '
                      'http://images.cocodataset.org and the splits from '
                      'https://cs.stanford.edu/people/karpathy/deepimagesent/'
                      'caption_datasets.zip')


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


def textcaps_records(config: data.DataConfig, split: str) -> list[dict]:
  """TextCaps_0.1_{train,val}.json -> records.

  Official entries: ``{'image_id', 'image_name', 'image_path', 'caption_str',
  'reference_strs', ...}``, one per caption. Images are TextVQA's
  ``train_images/<image_name>.jpg`` (folder: data dir key 'textcaps_images', default
  ``<textcaps>/train_images``).
  """
  fname = TEXTCAPS_FILES[split]
  root = data.data_dir(config, 'textcaps', expected=[fname], hint=DATA_DIRS['textcaps'])
  images = config.data_dirs.get('textcaps_images') or os.path.join(root, 'train_images')
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


def register(style: str, config: data.DataConfig) -> None:
  """Registers ``coco_captions_{style}`` and ``textcaps_{style}``, reading ``config``'s data."""
  feats = common.image_output_features(config)
  for bench, source in (
      ('coco_captions', common.TrainingFlagTfdsSource(
          COCO_TFDS_NAME, COCO_SPLITS, hint=COCO_CAPTIONS_HINT,
          tfds_data_dir=config.tfds_data_dir, map_fn=_coco_to_common,
          # Keep JPEG bytes until after sharding / seqio's in-memory caching of small splits
          # (5,000 decoded val images would take ~4.6 GB).
          decoders={'image': tfds.decode.SkipDecoding()})),
      ('textcaps', common.JsonImageSource(
          'textcaps', functools.partial(textcaps_records, config),
          splits=tuple(TEXTCAPS_FILES))),
  ):
    name = common.task_name(bench, style)
    common.add_task(
        name,
        source=source,
        preprocessors=common.image_preprocessors(config, bench, name,
                                                 prompts.image_templates(bench, style)),
        output_features=feats,
        postprocess_fn=common.references_postprocessor,
        metric_fns=[metrics.seqio_caption_metrics],
    )
