"""Mixtures: GLUE (T5's proportional rates), captioning, the VQA family and MMIT.

Rates are fixed numbers (like T5's GLUE mapping) so that building a mixture never needs the
data on disk. Multimodal rates are the official training-set sizes of our 'train' splits
(examples, i.e. captions for captioning and questions for VQA).
"""
from __future__ import annotations

from tasks import common
from tasks import glue

# Training examples per benchmark ('train' split as these tasks define it).
TRAIN_SIZES: dict[str, int] = {
    'coco_captions': 566_747,  # Karpathy train + restval captions (113,287 images)
    'textcaps': 109_765,       # TextCaps_0.1_train.json captions (21,953 images)
    'vqav2': 443_757,          # v2 train2014 questions
    'okvqa': 9_009,            # OK-VQA train2014 questions
    'textvqa': 34_602,         # TextVQA_0.5.1_train.json questions
    'stvqa': 23_466,           # ~9/10 of the 26,074 train_task_3 questions (1/10 held out)
    'docvqa': 39_463,          # DocVQA train_v1.0 questions
}
CAPTIONING = ('coco_captions', 'textcaps')
VQA = ('vqav2', 'okvqa', 'textvqa', 'stvqa', 'docvqa')
# Multimodal instruction mixture: examples-proportional with a per-task cap (FLAN-style),
# so VQAv2 and COCO do not drown the small sets.
MMIT_RATE_CAP = 30_000


def mixture_name(family: str, style: str) -> str:
  """('vqa', 'raw') -> 'vqa_raw'; ('glue', 'mmit') -> 'glue_v002_proportional_mmit'."""
  if family == 'glue':
    return f'glue_v002_proportional_{style}'
  return f'{family}_{style}'


def glue_rates(style: str) -> list[tuple[str, float]]:
  """T5's glue_v002_proportional entries for our task names."""
  return [(common.task_name(f'glue_{n}', style), r) for n, r in glue.T5_GLUE_RATES.items()]


def mmit_rates() -> list[tuple[str, float]]:
  """The 'mmit' mixture: every multimodal task in the mmit style, capped proportional."""
  return [(common.task_name(b, 'mmit'), float(min(TRAIN_SIZES[b], MMIT_RATE_CAP)))
          for b in CAPTIONING + VQA]


def register(style: str) -> None:
  """Registers the ``glue``, ``captioning`` and ``vqa`` mixtures in ``style``."""
  common.add_mixture(mixture_name('glue', style), glue_rates(style))
  common.add_mixture(mixture_name('captioning', style),
                     [(common.task_name(b, style), float(TRAIN_SIZES[b])) for b in CAPTIONING])
  common.add_mixture(mixture_name('vqa', style),
                     [(common.task_name(b, style), float(TRAIN_SIZES[b])) for b in VQA])


def register_mmit() -> None:
  """Registers the multimodal instruction mixture ``mmit``."""
  common.add_mixture('mmit', mmit_rates())
