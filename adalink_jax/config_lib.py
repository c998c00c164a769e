"""Shared pieces of the experiment configs in ``configs/`` (big_vision style: plain functions).

A config file is ``get_config(arg)`` returning a ConfigDict, plus ``sweep(add)``. ``arg`` is a
comma-separated ``key=value`` string after the file name, e.g.
``--config=configs/coco_mmit.py:method=lora,rank=16``.
"""
from __future__ import annotations

import ast
from typing import Any, Callable

import ml_collections

METHODS = ('adalink', 'prompt', 'lora', 'adapter', 'ft')

# Public-checkpoint shape of the PaLI-style model: SigLIP So400m/14 + a FLAN-T5-XL-shaped
# encoder-decoder (vocabulary 32128, so public FLAN-T5 / T5X weights load into it).
PALI_PUBLIC = dict(name='pali3', t5=dict(vocab_size=32128))


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """``'method=lora,rank=16'`` -> ConfigDict over ``defaults``; unknown keys name the field."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    if '=' not in item:
      raise ValueError(f'config argument {item!r} is not key=value (in {arg!r})')
    k, v = item.split('=', 1)
    if k not in defaults:
      raise ValueError(f'unknown config argument {k!r}; known: {sorted(defaults)}')
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v  # a bare string
  return ml_collections.ConfigDict(out)


def peft_block(method: str, rank: int, num_tasks: int = 1,
               modalities: tuple[str, ...] = ('text', 'image'),
               bank_tasks: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """The ``peft`` block for ``method`` with the paper's settings for each baseline.

  num_tasks > 1: a per-task bank; ``bank_tasks`` names its tasks in bank order (benchmark
  names, e.g. ``('glue_cola', 'glue_rte')``); empty: the training mixture's tasks by global id.
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r}; choose from {METHODS}')
  return ml_collections.ConfigDict(dict(
      method=method, rank=rank, modalities=modalities, num_tasks=num_tasks,
      bank_tasks=tuple(bank_tasks),
      activation='identity', use_bias=False, decoder_inputs=False,
      prompt_length=20, prompt_init='uniform', lora_alpha=float(2 * rank),
      lora_targets=('query', 'key', 'value', 'out'), adapter_dim=rank))


def base(*, steps: int = 10_000, batch: int = 128, lr: float = 1e-3,
         seed: int = 0) -> ml_collections.ConfigDict:
  """Fields every experiment has; callers fill model, init, data and eval."""
  c = ml_collections.ConfigDict()
  c.seed = seed
  c.batch_size = batch
  c.num_microbatches = 1
  c.total_steps = steps
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adafactor', learning_rate=lr, schedule='warmup_cosine', warmup_steps=500,
      total_steps=c.total_steps, grad_clip_norm=1.0, weight_decay=0.0))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1))
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.best_metric = ''
  c.preempt_check_every = 10   # steps between the hosts' agreement on a SIGTERM
  c.restart = False           # True: move an existing run in the workdir aside, start again
  c.init = ml_collections.ConfigDict(dict(native='', t5='', t5_format='hf', vit='',
                                          vit_format='big_vision'))
  return c


# Data-dir keys (adalink_jax.data re-exports them); '<name>_images' optionally overrides the
# image folder of '<name>'. Each is a config field, so `--config.data.data_dirs.vqav2=DIR` works.
DATA_DIR_KEYS = ('coco', 'textcaps', 'textcaps_images', 'vqav2', 'okvqa', 'textvqa',
                 'textvqa_images', 'stvqa', 'stvqa_images', 'docvqa', 'docvqa_images')


def multimodal(benchmark: str, style: str, metric: str, arg: str | None, *,
               target_len: int = 32, text_len: int = 64) -> ml_collections.ConfigDict:
  """A captioning / VQA experiment on the PaLI-style model."""
  a = parse_arg(arg, method='adalink', rank=64, model='pali3', steps=10_000, batch=128,
                lr=1e-3, image_size=224)
  c = base(steps=a.steps, batch=a.batch, lr=a.lr)
  # Frozen weights in bf16, scanned and rematerialised: large backbones fit; adapters stay fp32.
  c.model = ml_collections.ConfigDict(dict(
      family='pali', name=a.model, dtype='bfloat16', frozen_dtype='bfloat16',
      t5=dict(scan_layers=True, remat_policy='minimal',
              **(PALI_PUBLIC['t5'] if a.model == 'pali3' else {})),
      vit=dict(scan_layers=True, image_size=a.image_size)))
  c.peft = peft_block(a.method, a.rank)
  c.data = ml_collections.ConfigDict(dict(
      kind='seqio', task=f'{benchmark}_{style}', eval_task='', train_split='train',
      eval_split='validation', text_len=text_len, target_len=target_len,
      image_size=a.image_size, tfds_data_dir='', vocab='', truncate='question_start',
      data_dirs=dict.fromkeys(DATA_DIR_KEYS, '')))
  # Each eval task is scored by its own postprocessor and metric functions (tasks/*.py);
  # eval.tasks lists tasks / mixtures to evaluate (empty: data.eval_task, else data.task).
  c.eval = ml_collections.ConfigDict(dict(
      every=2000, num_batches=0, metric=metric, at_start=False, tasks=(),
      decoding=dict(method='greedy', max_decode_len=target_len)))
  c.best_metric = metric
  if style == 'mmit':
    # *_mmit experiments adapt the instruction-tuned model that configs/mmit_instruction_tune.py
    # produces; export it with `python -m adalink_jax.export --workdir=<mmit run> --backbone
    # --out=<dir>` and pass --config.init.native=<dir>.
    c.init.native = 'EXPORTED_MMIT_BACKBONE_DIR'
  else:
    c.init.t5 = 'FLAN_T5_XL_HF_DIR'          # e.g. a save_pretrained copy of google/flan-t5-xl
    c.init.vit = 'SIGLIP_SO400M_14_224_NPZ'  # big_vision's SigLIP So400m/14 224px npz
  return c


def sweep_methods(add: Callable[..., None], ranks=(4, 16, 64)) -> None:
  """The paper's comparison: AdaLink and LoRA at several ranks, prompt tuning, full FT."""
  for r in ranks:
    add(**{'peft.method': 'adalink', 'peft.rank': r})
    add(**{'peft.method': 'lora', 'peft.rank': r, 'peft.lora_alpha': float(2 * r)})
  add(**{'peft.method': 'prompt', 'peft.prompt_length': 20})
  add(**{'peft.method': 'adapter', 'peft.adapter_dim': 64})
  add(**{'peft.method': 'ft', 'optimizer.learning_rate': 1e-4})


def glue(model: str, arg: str | None) -> ml_collections.ConfigDict:
  """GLUE (T5 text-to-text, proportional mixture) on a T5 1.1 / FLAN-T5 XXL, text adapters."""
  a = parse_arg(arg, method='adalink', rank=64, model=model, steps=20_000, batch=128, lr=1e-3,
                eval_task='', num_tasks=1)
  c = base(steps=a.steps, batch=a.batch, lr=a.lr)
  c.model = ml_collections.ConfigDict(dict(
      family='t5', name=a.model, dtype='bfloat16', frozen_dtype='bfloat16',
      t5=dict(scan_layers=True, remat_policy='minimal')))
  c.peft = peft_block(a.method, a.rank, num_tasks=a.num_tasks, modalities=('text',))
  c.data = ml_collections.ConfigDict(dict(
      kind='seqio', task='glue_v002_proportional_raw', eval_task=a.eval_task, pack=False,
      train_split='train', eval_split='validation', text_len=512, target_len=8,
      # 'end': T5's GLUE inputs are cut at the tail (two texts, no question to keep the end of).
      image_size=224, tfds_data_dir='', vocab='', truncate='end',
      data_dirs=dict.fromkeys(DATA_DIR_KEYS, '')))
  # Every GLUE task of the mixture is evaluated with T5's metrics; 'average' is the GLUE score.
  c.eval = ml_collections.ConfigDict(dict(
      every=2000, num_batches=0, metric='', at_start=False, tasks=(),
      decoding=dict(method='greedy', max_decode_len=8)))
  c.best_metric = 'average'
  c.init.t5 = f'{a.model.upper()}_HF_DIR'  # a save_pretrained copy of the public checkpoint
  return c
