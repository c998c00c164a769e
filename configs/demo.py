"""Embedded demo: AdaLink teaches a tiny frozen PaLI-style model to answer new questions.

  python -m adalink_jax.train --config=configs/demo.py --workdir=workdirs/demo

Backbone and data are made here, from nothing (see adalink_jax/demo.py): on first use a tiny
ViT + T5 is pre-trained with full fine-tuning on rendered shapes ("caption en",
"answer en color", "answer en shape") and frozen; then AdaLink (rank 8 on text and image
tokens) learns questions the backbone never saw ("what hue does the object have?").
Eval: greedy decoding, official VQA accuracy, before and after training.
"""
import ml_collections


def _model():
  return ml_collections.ConfigDict(dict(
      family='pali', name='tiny', dtype='float32', frozen_dtype='float32',
      vit=dict(image_size=32, patch_size=8, width=64, depth=2, mlp_dim=128, num_heads=4),
      t5=dict(vocab_size=64, d_model=64, num_heads=4, d_kv=16, d_ff=128,
              num_encoder_layers=2, num_decoder_layers=2)))


def _data(mode):
  return ml_collections.ConfigDict(dict(
      kind='demo', mode=mode, assets_dir='', seed=0, image_size=32, text_len=12, target_len=6))


def get_config(arg=None):
  """arg: None (the AdaLink demo) or 'pretrain' (how its frozen backbone is made)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = _model()
  c.init = ml_collections.ConfigDict(dict(native='', t5='', t5_format='hf', vit='',
                                          vit_format='big_vision'))
  c.peft = ml_collections.ConfigDict(dict(method='adalink', rank=8, modalities=('text', 'image'),
                                          num_tasks=1, activation='identity', use_bias=False))
  c.data = _data('vqa')
  c.batch_size = 32
  c.num_microbatches = 1
  c.total_steps = 400
  c.optimizer = ml_collections.ConfigDict(dict(name='adamw', learning_rate=1e-2,
                                               schedule='warmup_cosine', warmup_steps=20,
                                               total_steps=400, grad_clip_norm=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.log_every = 20
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.best_metric = ''
  c.preempt_check_every = 10   # steps between the hosts' agreement on a SIGTERM
  c.restart = False           # True: move an existing run in the workdir aside, start again
  c.eval = ml_collections.ConfigDict(dict(
      every=200, num_batches=8, metric='vqa_accuracy', at_start=True,
      decoding=dict(method='greedy', max_decode_len=6)))
  # The frozen backbone: made on first use under data.assets_dir (default ~/.cache/adalink_jax/demo).
  c.demo_backbone = ml_collections.ConfigDict(dict(
      steps=1200, batch_size=64, learning_rate=3e-3))
  if arg == 'pretrain':
    return pretrain_config(c)
  return c


def pretrain_config(demo_config):
  """How the demo's frozen backbone is made: full fine-tuning on the pre-training prompts."""
  c = demo_config.copy_and_resolve_references()
  b = c.demo_backbone
  c.peft = ml_collections.ConfigDict(dict(method='ft'))
  c.data.mode = 'pretrain'
  c.batch_size = b.batch_size
  c.total_steps = b.steps
  c.optimizer.learning_rate = b.learning_rate
  c.optimizer.total_steps = b.steps
  c.optimizer.warmup_steps = 50
  c.eval.metric = 'exact_match'
  c.eval.every = 0
  c.eval.at_start = False
  c.checkpoint_every = b.steps
  c.keep_checkpoints = 1
  return c


def sweep(add):
  """Ranks x methods, for `adalink_jax.sweep` (big_vision style: call add(**overrides))."""
  for method in ('adalink', 'prompt', 'lora', 'ft'):
    for rank in ((2, 8) if method in ('adalink', 'lora') else (None,)):
      over = {'peft.method': method}
      if rank:
        over['peft.rank'] = rank
      add(**over)
