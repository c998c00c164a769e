"""Task-driven evaluation: each eval task scores its own predictions with its own rules.

An :class:`EvalTask` is what a task declares about evaluation -- the postprocessor turning a
decoded string into what is scored, and its metric functions ``fn(targets, predictions) ->
{metric: value}`` (seqio's contract). Sources supply the tasks (``source.eval_tasks()``) and
the targets already postprocessed (``targets`` in each eval batch), so the trainer and the
evaluate CLI never name a metric themselves.

Results are flat ``{'<task>/<metric>': value}``; with one task the bare metric names too (so
``vqa_accuracy`` keeps meaning the run's VQA accuracy); with several, ``average``: the mean
over tasks of each task's mean metric, T5's GLUE rule (:func:`metrics.glue_average` for GLUE
tasks, whose MNLI matched/mismatched count as one task).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from adalink_jax import metrics

MetricFn = Callable[[Sequence[Any], Sequence[Any]], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class EvalTask:
  """name; ``postprocess(decoded_text) -> scored prediction``; ``metric_fns``.

  A classification task may also name its ``labels`` (label words) with their ``candidates``
  (token ids ``[c, t]``, each label + EOS, see :mod:`adalink_jax.rank_classification`): it is
  then scored twice, by greedy decoding and by rank classification (metrics ``rank_<name>``).
  """
  name: str
  postprocess: Callable[[str], Any]
  metric_fns: tuple[MetricFn, ...]
  labels: tuple[str, ...] = ()
  candidates: Any = dataclasses.field(default=None, compare=False)


def score(task: EvalTask, predictions: Sequence[str], targets: Sequence[Any]) -> dict:
  """``{metric: value}`` of one task (predictions are decoded strings, targets postprocessed)."""
  if not predictions:
    raise ValueError(f'eval task {task.name!r} produced no examples to score')
  scored = [task.postprocess(p) for p in predictions]
  out: dict = {}
  for fn in task.metric_fns:
    for k, v in dict(fn(list(targets), scored)).items():
      out[k] = float(getattr(v, 'value', v))  # seqio.metrics.Scalar or a number
  return out


def score_ranked(task: EvalTask, label_index: Sequence[int], targets: Sequence[Any]) -> dict:
  """``{rank_<metric>: value}``: the task's metrics on the rank-classified label words."""
  return {f'rank_{k}': v for k, v in
          score(task, [task.labels[int(i)] for i in label_index], targets).items()}


def average(per_task: Mapping[str, Mapping[str, float]]) -> float:
  """Mean over tasks of each task's mean metric (GLUE tasks by T5's rule)."""
  # Our GLUE task names carry the prompt style: glue_mrpc_v002_raw -> glue_mrpc_v002.
  glue = {re.sub(r'_(raw|mmit)$', '', k): v for k, v in per_task.items() if k.startswith('glue_')}
  rest = [float(np.mean(list(v.values()))) for k, v in per_task.items()
          if not k.startswith('glue_') and v]
  if glue:
    # MNLI matched + mismatched are one GLUE task; the GLUE score then counts once.
    return float(np.mean(rest + [metrics.glue_average(glue)])) if rest else \
        metrics.glue_average(glue)
  return float(np.mean(rest))


def flatten(per_task: Mapping[str, Mapping[str, float]]) -> dict:
  """``{'<task>/<metric>': v}`` + bare names for one task, or ``average`` for several."""
  out = {f'{t}/{k}': v for t, m in per_task.items() for k, v in m.items()}
  if len(per_task) == 1:
    out.update(next(iter(per_task.values())))
  elif per_task:
    out['average'] = average(per_task)
  return out


def named_metric(name: str) -> MetricFn:
  """The demo's metric by name (``config.eval.metric``), as a seqio-style metric function."""
  fns = {'vqa_accuracy': metrics.seqio_vqa_accuracy, 'anls': metrics.seqio_anls,
         'cider': lambda t, p: {'cider': metrics.cider(p, t)},
         'exact_match': lambda t, p: {'exact_match': 100.0 * float(np.mean(
             [x.strip() == r[0].strip() for x, r in zip(p, t)]))}}
  if name not in fns:
    raise ValueError(f'config.eval.metric={name!r}; choose from {sorted(fns)}')
  return fns[name]
