"""AdaLink: low-rank residual adapters on the encoder (and optionally decoder) input embeddings.

Where it applies (exactly): between the embedders and the first transformer block, i.e. on the
:class:`~adalink_jax.models.seam.EncoderInputs` that ``T5.encode`` passes through its
``encoder_input_adapter`` seam. For every modality ``m`` it owns (``text``, ``image``) it
rewrites the positions whose ``modality == m``::

    x' = x + act(x @ down_m + down_bias_m) @ up_m + up_bias_m      (biases optional)

and leaves every other position (other modalities, prompt tokens -- modality ``PROMPT``)
bit-identical. Padding positions of a modality are adapted too (the encoder masks them anyway;
this keeps the adapter a per-token function of the embedding, which makes folding exact).
As ``decoder_input_adapter`` the same module (text only) acts on the decoder token
embeddings, including during KV-cache decoding (it is per-token).

``up`` is zero-initialised, so at step 0 the adapted model equals the frozen one exactly.
With ``num_tasks > 1`` every parameter gets a leading ``tasks`` axis and each example picks its
adapter with a gather on ``task_id`` -- a batch may mix tasks. ``task_id`` is the *bank index*
(0..num_tasks-1, see :mod:`adalink_jax.peft.task_bank`); anything else raises, under jit too.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adalink_jax.models import seam
from adalink_jax.models.axes import param
from adalink_jax.models.layers import ACTIVATIONS
from adalink_jax.models.layers import activation as get_activation
from adalink_jax.peft import registry
from adalink_jax.peft import task_bank

Dtype = Any

MODALITY_IDS = {'text': seam.TEXT, 'image': seam.IMAGE}
PROMPT = seam.PROMPT  # prompt-tuning slots have their own modality id


def modality_id(name: str) -> int:
  """``'text' -> seam.TEXT``, ``'image' -> seam.IMAGE`` with a clear error otherwise."""
  if name not in MODALITY_IDS:
    raise ValueError(f'unknown modality {name!r}; choose from {sorted(MODALITY_IDS)}')
  return MODALITY_IDS[name]


def _matmul(x: jax.Array, w: jax.Array, banked: bool) -> jax.Array:
  """``x[b, l, i] @ w[i, o]`` or, for per-example weights, ``x[b, l, i] @ w[b, i, o]``."""
  return jnp.einsum('bli,bio->blo', x, w) if banked else jnp.dot(x, w)


def _bias(b: jax.Array, banked: bool) -> jax.Array:
  """Bias ``[o]`` or per-example ``[b, o]`` -> broadcastable against ``[b, l, o]``."""
  return b[:, None, :] if banked else b


class LowRankResidual(nn.Module):
  """One modality's adapter: ``x[b, l, d] -> delta[b, l, d] = act(x D + b1) U + b2``.

  Params (single task): ``down [d, r]`` axes (embed, rank); ``up [r, d]`` axes (rank, embed),
  zero-init; optional ``down_bias [r]``, ``up_bias [d]``. With ``num_tasks > 1`` each gets a
  leading ``tasks`` axis and ``task_id[b]`` picks one per example.
  """
  rank: int
  num_tasks: int = 1
  activation: str = 'identity'
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, task_id: Optional[jax.Array] = None) -> jax.Array:
    d, r, nt = x.shape[-1], self.rank, self.num_tasks
    lead, lead_axes = ((), ()) if nt == 1 else ((nt,), ('tasks',))
    # batch_axis keeps fan-in = d for a bank (otherwise the tasks axis would count as fan-in).
    down_init = nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal', batch_axis=tuple(range(len(lead))))
    down = param(self, 'down', down_init, lead + (d, r), self.param_dtype,
                 lead_axes + ('embed', 'rank'))
    up = param(self, 'up', nn.initializers.zeros, lead + (r, d), self.param_dtype,
               lead_axes + ('rank', 'embed'))
    banked = nt > 1
    if banked:  # one range check per call, then plain gathers
      ids = task_bank.bank_indices(task_id, nt, f'AdaLink {self.name or "adapter"}')
    pick = (lambda p: task_bank.gather(p, ids)) if banked else (lambda p: p)
    h = _matmul(x.astype(self.dtype), pick(down).astype(self.dtype), banked)
    if self.use_bias:
      b1 = param(self, 'down_bias', nn.initializers.zeros, lead + (r,), self.param_dtype,
                 lead_axes + ('rank',))
      h = h + _bias(pick(b1).astype(self.dtype), banked)
    h = get_activation(self.activation)(h)
    delta = _matmul(h, pick(up).astype(self.dtype), banked)
    if self.use_bias:
      b2 = param(self, 'up_bias', nn.initializers.zeros, lead + (d,), self.param_dtype,
                 lead_axes + ('embed',))
      delta = delta + _bias(pick(b2).astype(self.dtype), banked)
    return delta


class AdaLink(nn.Module):
  """``EncoderInputs -> EncoderInputs`` with a low-rank residual per modality (see module doc).

  modalities: names in ``MODALITY_IDS``; ranks: one rank per modality (same order).
  Params live under ``<modality>/{down, up[, down_bias, up_bias]}``.
  """
  modalities: tuple[str, ...] = ('text', 'image')
  ranks: tuple[int, ...] = (64, 64)
  num_tasks: int = 1
  activation: str = 'identity'
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: seam.EncoderInputs) -> seam.EncoderInputs:
    """embeddings ``[b, l, d]``, modality ``[b, l]`` -> same shapes, only own modalities changed."""
    if len(self.modalities) != len(self.ranks):
      raise ValueError(f'AdaLink: {len(self.modalities)} modalities {self.modalities} but '
                       f'{len(self.ranks)} ranks {self.ranks}')
    x = inputs.embeddings
    out = x
    for name, rank in zip(self.modalities, self.ranks):
      delta = LowRankResidual(rank, self.num_tasks, self.activation, self.use_bias,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=name)(
                                  x, inputs.task_id)
      on = (inputs.modality == modality_id(name))[..., None]
      # `where`, not a multiply: positions of other modalities stay bit-identical.
      out = jnp.where(on, out + delta.astype(x.dtype), out)
    return inputs._replace(embeddings=out)


# ------------------------------------------------------------------ banks and folding


def select_task(adapter_params: dict, task: int) -> dict:
  """Bank params (leading ``tasks`` axis on every leaf) -> one task's single-adapter params.

  ``task`` is a bank index; ValueError if it is outside the bank (never a wrapped index).
  """
  sizes = {np.shape(p)[0] if np.ndim(p) else None for p in jax.tree.leaves(adapter_params)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f'select_task: not a bank (leading sizes {sorted(map(str, sizes))} differ); '
                     'only params with a leading tasks axis hold several tasks')
  task = task_bank.check_index(task, sizes.pop(), 'select_task')
  return jax.tree.map(lambda p: p[task], adapter_params)


def fold_text_embedding(embedding: jax.Array, text_params: dict, activation: str = 'identity',
                        task: Optional[int] = None, dtype: Dtype = jnp.float32) -> jax.Array:
  """Folds the text adapter into an encoder input table ``E' = E + act(E @ down + b1) @ up + b2``.

  embedding: ``[vocab, d]`` (the frozen shared table); text_params: the ``text`` subtree of the
  AdaLink params (``down [d, r]``, ``up [r, d]``, optional biases; for a bank, ``down
  [tasks, d, r]`` etc. and ``task``: the bank index to fold, checked against the bank's size).
  The adapter is a per-token function of the embedding row, so this is exact for any activation.
  Serve it with :func:`folded_encoder_params` -- the shared table (decoder, tied head) is untouched.
  """
  is_bank = np.ndim(text_params['down']) == 3
  if task is None and is_bank:
    raise ValueError(f'text adapter down has shape {np.shape(text_params["down"])}: it is a '
                     'bank, pass task=<bank index>')
  if task is not None and not is_bank:
    raise ValueError(f'fold_text_embedding(task={task!r}): the text adapter is not a bank '
                     f'(down {np.shape(text_params["down"])}); omit task')
  p = text_params if task is None else select_task(text_params, task)
  e = embedding.astype(dtype)
  h = e @ p['down'].astype(dtype)
  if 'down_bias' in p:
    h = h + p['down_bias'].astype(dtype)
  delta = get_activation(activation)(h) @ p['up'].astype(dtype)
  if 'up_bias' in p:
    delta = delta + p['up_bias'].astype(dtype)
  return e + delta  # in `dtype`: a bf16 base table would otherwise round the fold away


def fold_gemma_embedding(embedding: jax.Array, text_params: dict, activation: str = 'identity',
                         task: Optional[int] = None) -> jax.Array:
  """The decoder-only family's fold: Gemma scales a looked-up row by ``sqrt(d)`` *before* the
  seam, so the folded row is ``(s E + adapter(s E)) / s`` -- exact for any activation and bias.

  Gemma's table is tied to its LM head: serve the result as a separate *input* table (e.g. HF
  ``tie_word_embeddings=False`` with this as ``embed_tokens`` and the original as ``lm_head``).
  It holds the prefix (prompt) adaptation only, as AdaLink adapts the prefix's text slots.
  """
  scale = np.sqrt(np.shape(embedding)[-1]).astype(np.float32)
  e = jnp.asarray(embedding, jnp.float32) * scale
  return fold_text_embedding(e, text_params, activation, task=task) / scale


def folded_encoder_params(params: dict, folded_table: jax.Array) -> dict:
  """Params for serving a folded text adapter with an *unmodified* T5.

  Use them only for ``method=T5.encode``; decode with the original params::

      enc, m = model.apply({'params': folded_encoder_params(p, E2)}, toks, method=model.encode)
      logits = model.apply({'params': p}, enc, m, dec_toks, method=model.decode)

  ``encode`` only reads ``token_embedder`` to embed encoder text, so swapping the table there
  gives the encoder ``E'`` while the decoder (and a tied LM head) still sees ``E``.
  Drops ``encoder_input_adapter/text`` (it is in the table now); other modalities stay.
  """
  out = dict(params)
  out['token_embedder'] = {**params['token_embedder'], 'embedding': folded_table}
  if 'encoder_input_adapter' in out:
    rest = {k: v for k, v in out['encoder_input_adapter'].items() if k != 'text'}
    if rest:
      out['encoder_input_adapter'] = rest
    else:
      del out['encoder_input_adapter']
  return out


# ------------------------------------------------------------------ the registered method

SEAMS = ('encoder_input_adapter', 'decoder_input_adapter')  # where seam adapters' params live


def ranks(cfg) -> dict[str, int]:
  """``peft.rank`` (int, or ``{'text': r, 'image': r}``) -> AdaLink rank per modality."""
  if isinstance(cfg.rank, Mapping):
    missing = [m for m in cfg.modalities if m not in cfg.rank]
    if missing:
      raise ValueError(f'peft.rank has no entry for modalities {missing}: {dict(cfg.rank)}')
    return {m: int(cfg.rank[m]) for m in cfg.modalities}
  return {m: int(cfg.rank) for m in cfg.modalities}


def _validate(cfg, bad) -> None:
  if not cfg.modalities:
    bad('modalities', 'AdaLink needs at least one modality')
  for m in cfg.modalities:
    if m not in MODALITY_IDS:
      bad('modalities', f'unknown modality {m!r}; choose from {sorted(MODALITY_IDS)}')
  if any(r < 1 for r in ranks(cfg).values()):
    bad('rank', 'ranks must be >= 1')
  if cfg.activation not in ACTIVATIONS:
    bad('activation', f'choose from {sorted(ACTIVATIONS)}')


def _input_adapters(cfg, kw: dict, embedding_table: Any = None):
  del embedding_table
  r = ranks(cfg)
  enc = AdaLink(tuple(r), tuple(r.values()), cfg.num_tasks, cfg.activation, cfg.use_bias, **kw)
  dec = None
  if cfg.decoder_inputs:
    rd = cfg.decoder_rank or r.get('text') or max(r.values())
    dec = AdaLink(('text',), (rd,), cfg.num_tasks, cfg.activation, cfg.use_bias, **kw)
  return enc, dec


def seam_group(parts: Sequence[str]) -> Optional[str]:
  """Parameter-table group of a seam adapter's param: ``encoder_input_adapter/<modality>``."""
  for i, p in enumerate(parts):
    if p in SEAMS:
      return '/'.join(parts[i:i + 2])
  return None


def _folder(cfg):
  """``--fold``: the text adapter folded into the encoder input table (see module doc)."""
  if 'text' not in tuple(cfg.modalities):
    raise ValueError('--fold needs a text AdaLink (peft.method=adalink with modality text)')

  def fold(params: Mapping, task: Optional[int]) -> dict:
    if 'llm' in params:  # the decoder-only family (Gemma, PaliGemma): see fold_gemma_embedding
      table = params['llm']['embedder']['input_embedding']
      return {'llm/embedder/input_embedding': fold_gemma_embedding(
          table, params['encoder_input_adapter']['text'], cfg.activation, task=task)}
    # A PaLI-style model holds the T5 (and its table) under 't5', the seam adapter on top.
    t5_params = params if 'token_embedder' in params else params['t5']
    adapters = params.get('encoder_input_adapter') or t5_params['encoder_input_adapter']
    table = fold_text_embedding(t5_params['token_embedder']['embedding'], adapters['text'],
                                cfg.activation, task=task)
    return {'token_embedder/embedding': table}

  return fold


METHOD = registry.Method(
    name='adalink',
    summary='AdaLink: low-rank residual adapters on the input embeddings, per modality',
    fields=(('modalities', ('text', 'image')), ('activation', 'identity'), ('use_bias', False),
            ('decoder_inputs', False),     # AdaLink also on decoder token embeddings
            ('decoder_rank', None)),       # defaults to the text rank
    validate=_validate,
    banks=True,
    input_adapters=_input_adapters,
    adds=SEAMS,
    group=seam_group,
    card=lambda cfg: {'ranks': ranks(cfg), 'modalities': list(cfg.modalities)},
    fold=_folder,
    size_field='rank',
)
