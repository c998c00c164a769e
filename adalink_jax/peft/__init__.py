"""Parameter-efficient methods behind one interface: AdaLink, prompt tuning, LoRA, bottleneck
adapters and full fine-tuning. ``build(peft_cfg, t5_config)`` wires one in; ``split``/``merge``
separate trainable from frozen params by path; ``make_train_step`` differentiates only the former.
"""
from adalink_jax.peft.adalink import (MODALITY_IDS, PROMPT, AdaLink, LowRankResidual,
                                      fold_text_embedding, folded_encoder_params, select_task)
from adalink_jax.peft.artifacts import (base_hash, load_adapter, read_card, save_adapter)
from adalink_jax.peft.methods import (METHODS, Built, PeftConfig, build, cast, merge,
                                      param_counts, param_table, parse, split, trainable_predicate)
from adalink_jax.peft.prompt import PromptTuning, vocab_init
from adalink_jax.peft.train import (make_loss_fn, make_train_step, t5_forward,
                                    token_cross_entropy)
