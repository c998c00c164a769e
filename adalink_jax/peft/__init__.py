"""Parameter-efficient methods behind one interface: AdaLink, prompt tuning, LoRA, bottleneck
adapters, IA3 and full fine-tuning, one registered object each (:mod:`.registry`).
``build(peft_cfg, model_config)`` wires one in; ``split``/``merge`` separate trainable from frozen
params by path; ``make_train_step`` differentiates only the former.

Names are resolved on first use (PEP 562), so ``from adalink_jax.peft import registry`` -- what
config files need for the method names -- does not import JAX.
"""
import importlib

_EXPORTS = {
    'adalink': ('MODALITY_IDS', 'PROMPT', 'AdaLink', 'LowRankResidual', 'fold_text_embedding',
                'folded_encoder_params', 'select_task'),
    'artifacts': ('base_hash', 'load_adapter', 'read_card', 'save_adapter'),
    'methods': ('METHODS', 'Built', 'PeftConfig', 'build', 'cast', 'merge', 'param_counts',
                'param_table', 'parse', 'split', 'trainable_predicate'),
    'prompt': ('PromptTuning', 'vocab_init'),
    'train': ('make_loss_fn', 'make_train_step', 't5_forward', 'token_cross_entropy'),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
  if name in _WHERE:
    return getattr(importlib.import_module(f'{__name__}.{_WHERE[name]}'), name)
  try:  # a submodule: peft.methods, peft.registry ...
    return importlib.import_module(f'{__name__}.{name}')
  except ModuleNotFoundError as e:
    if e.name != f'{__name__}.{name}':
      raise
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}') from None


def __dir__():
  return sorted(set(globals()) | set(_WHERE))
