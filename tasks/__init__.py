"""seqio Tasks and Mixtures for the AdaLink benchmarks; importing this package registers them.

Tasks (``<benchmark>_<style>``, style ``raw`` or ``mmit``):
  captioning  coco_captions_*, textcaps_*                       (metric: CIDEr)
  VQA         vqav2_*, okvqa_*, textvqa_* (VQA accuracy), stvqa_*, docvqa_* (ANLS)
  GLUE        glue_{cola,sst2,mrpc,qqp,stsb,mnli,mnli_matched,mnli_mismatched,qnli,rte}_v002_*
Mixtures: ``glue_v002_proportional_<style>``, ``captioning_<style>``, ``vqa_<style>``, ``mmit``.

Pick names with :func:`task_name` (``task_name('vqav2')`` follows
``adalink_jax.data.configure(prompt_style=...)``). Data locations, vocabulary and image size
are configured in :mod:`adalink_jax.data`; changing the vocabulary re-registers everything.
"""
from adalink_jax import data as _data
from tasks import captioning
from tasks import common
from tasks import glue
from tasks import mixtures
from tasks import prompts
from tasks import vqa
from tasks.common import BENCHMARKS, TASK_IDS, benchmark_of, task_id, task_name  # noqa: F401
from tasks.mixtures import mixture_name  # noqa: F401


def register_all() -> None:
  """(Re)registers every task and mixture with the current vocabulary."""
  common.clear_registrations()
  for style in _data.PROMPT_STYLES:
    captioning.register(style)
    vqa.register(style)
    glue.register(style)
    mixtures.register(style)
  mixtures.register_mmit()


register_all()
_data.on_vocabulary_change(register_all)
