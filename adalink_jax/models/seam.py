"""The embedding seam every backbone family shares: what input adapters see and return.

A family embeds its inputs (text tokens, image tokens), packs them into :class:`EncoderInputs`
with a modality id per slot, and calls the method's input adapter (AdaLink, prompt tuning) on
it before the first transformer block. Nothing inside the blocks is touched. The T5 family
adapts its encoder inputs (image + prompt) and optionally the decoder's token embeddings; the
decoder-only family its prefix (image + prompt) and optionally the suffix tokens.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax

TEXT, IMAGE = 0, 1  # modality ids carried alongside the embeddings
PROMPT = 2          # prompt-tuning slots, so AdaLink (or anything else) can tell them apart


class EncoderInputs(NamedTuple):
  """What the embedding seam sees and returns.

  embeddings: ``[b, l, d_model]``; mask: ``[b, l]`` bool (True = real token);
  modality: ``[b, l]`` int32 (``TEXT``=0, ``IMAGE``=1, ``PROMPT``=2); task_id: ``[b]`` int32
  or None.
  """
  embeddings: jax.Array
  mask: jax.Array
  modality: jax.Array
  task_id: Optional[jax.Array] = None
