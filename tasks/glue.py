"""GLUE tasks from TFDS ``glue/*`` in T5's text-to-text format (T5 ``glue_*_v002``).

Raw style reproduces T5's ``preprocessors.glue`` / ``preprocessors.stsb`` strings exactly:
inputs ``'<benchmark> <key1>: <text1> <key2>: <text2>'`` (keys sorted by name), targets the
TFDS label word (``'<unk>'`` for unlabeled test examples) and, for STS-B, the score rounded
to the nearest 0.2 and printed with one decimal (``round(5 * y) / 5``, e.g. 3.75 -> '3.8').
MNLI's matched / mismatched validation sets are separate eval-only tasks, as in T5.
"""
from __future__ import annotations

import functools
from typing import Optional

from adalink_jax import data
from adalink_jax import metrics
from tasks import common
from tasks import prompts
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

GLUE_VERSION = '2.0.0'
# GLUE comes from TFDS (config.data.tfds_data_dir): no data-dir key.
DATA_DIRS: dict[str, str] = {}
GLUE_HINT = ('TFDS glue (https://gluebenchmark.com/tasks): run `tfds build glue '
             '--data_dir=<tfds_data_dir>`')
_STD_SPLITS = {'train': 'train', 'validation': 'validation', 'test': 'test'}
_MNLI_SPLITS = {'train': 'train', 'validation_matched': 'validation_matched',
                'validation_mismatched': 'validation_mismatched',
                'test_matched': 'test_matched', 'test_mismatched': 'test_mismatched'}

# task -> (TFDS config, seqio split -> TFDS split). The MNLI eval tasks read glue/mnli.
GLUE_TASKS: dict[str, tuple[str, dict[str, str]]] = {
    'cola': ('cola', _STD_SPLITS),
    'sst2': ('sst2', _STD_SPLITS),
    'mrpc': ('mrpc', _STD_SPLITS),
    'qqp': ('qqp', _STD_SPLITS),
    'stsb': ('stsb', _STD_SPLITS),
    'mnli': ('mnli', _MNLI_SPLITS),
    'mnli_matched': ('mnli', {'validation': 'validation_matched', 'test': 'test_matched'}),
    'mnli_mismatched': ('mnli', {'validation': 'validation_mismatched',
                                 'test': 'test_mismatched'}),
    'qnli': ('qnli', _STD_SPLITS),
    'rte': ('rte', _STD_SPLITS),
}

# T5's glue_v002_proportional rates (t5/data/glue_utils.py GLUE_WEIGHT_MAPPING): the number of
# training examples of each task, uncapped; MNLI's eval-only tasks get 0.
T5_GLUE_RATES: dict[str, float] = {
    'cola': 8_551., 'sst2': 67_349., 'mrpc': 3_668., 'qqp': 363_849., 'stsb': 5_749.,
    'mnli': 392_702., 'qnli': 104_743., 'rte': 2_490., 'mnli_mismatched': 0.,
    'mnli_matched': 0.,
}


def label_classes(name: str) -> Optional[list[str]]:
  """TFDS's label words for a GLUE task (None for the STS-B regression)."""
  config = GLUE_TASKS[name][0]
  classes = tfds.text.glue.Glue.builder_configs[config].label_classes
  return list(classes) if classes else None


def stsb_target(label: tf.Tensor) -> tf.Tensor:
  """T5's STS-B target string: nearest multiple of 0.2, one decimal (tf.round: half-to-even)."""
  return tf.strings.as_string(tf.round(tf.cast(label, tf.float32) * 5) / 5, precision=1)


def _label_to_target(ds: tf.data.Dataset, split: str, name: str) -> tf.data.Dataset:
  """Adds ``target`` (label word / STS-B score string) to TFDS GLUE examples."""
  del split
  classes = label_classes(name)

  def convert(ex):
    ex = dict(ex)
    if classes is None:
      ex['target'] = stsb_target(ex['label'])
    else:
      label = tf.cast(ex['label'], tf.int32)
      ex['target'] = tf.cond(tf.equal(label, -1), lambda: tf.constant('<unk>'),
                             lambda: tf.gather(tf.constant(classes), tf.maximum(label, 0)))
    return ex
  return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def metric_fns(name: str) -> list:
  """T5's GLUE metrics (t5/data/glue_utils.py GLUE_METRICS), from adalink_jax.metrics."""
  base = 'mnli' if name.startswith('mnli') else name
  return {
      'cola': [metrics.seqio_matthews_corrcoef],
      'sst2': [metrics.seqio_accuracy],
      'mrpc': [metrics.seqio_f1_with_invalid, metrics.seqio_accuracy],
      'qqp': [metrics.seqio_f1_with_invalid, metrics.seqio_accuracy],
      'stsb': [metrics.seqio_pearson_corrcoef, metrics.seqio_spearman_corrcoef],
      'mnli': [metrics.seqio_accuracy],
      'qnli': [metrics.seqio_accuracy],
      'rte': [metrics.seqio_accuracy],
  }[base]


def register(style: str, config: data.DataConfig) -> None:
  """Registers ``glue_<name>_v002_{style}`` for every entry of ``GLUE_TASKS`` (``config``: the
  vocabulary, TFDS data dir and truncation)."""
  feats = common.text_output_features(config)
  for name, (tfds_config, splits) in GLUE_TASKS.items():
    classes = label_classes(name)
    # T5's postprocessors (also applied to the targets): label word -> class id (-1 if not a
    # label word), STS-B string -> float (-1.0 if unparsable).
    postprocess = (metrics.string_to_float if classes is None else
                   functools.partial(metrics.string_label_to_class_id,
                                     label_classes=tuple(classes)))
    source = common.TrainingFlagTfdsSource(
        f'glue/{tfds_config}:{GLUE_VERSION}', splits, hint=GLUE_HINT,
        tfds_data_dir=config.tfds_data_dir, map_fn=functools.partial(_label_to_target, name=name))
    task = common.task_name(f'glue_{name}', style)
    common.add_task(
        task,
        source=source,
        preprocessors=[seqio.CacheDatasetPlaceholder(required=False),
                       *common.text_chain(task, prompts.glue_templates(name, style),
                                          common.task_id(f'glue_{name}'),
                                          truncate=config.truncate)],
        output_features=feats,
        # Classification tasks are also scored by rank classification over these words.
        label_words=tuple(classes or ()),
        postprocess_fn=postprocess,
        metric_fns=metric_fns(name),
    )
