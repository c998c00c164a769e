"""The frozen backbone of a run: where it comes from (``config.init``), its hash, and our own format.

``config.init`` fields:
  native:      a directory written by :func:`save_native` (the whole model, any family).
  t5, t5_format:   a T5 checkpoint ('hf' safetensors directory or 't5x' checkpoint directory).
  vit, vit_format: an image tower ('big_vision' npz or 'hf' SigLIP/ViT safetensors), PaLI only.
  gemma, gemma_format: a Gemma decoder ('gguf' file or 'hf' directory), Gemma family.
  paligemma, paligemma_format: a PaliGemma ('big_vision' npz or 'hf' directory).
Each family fills the towers it names (``families.*.init_towers``) in its ``load``; a field of
another family is refused.
Anything not given keeps its random initialisation -- said in the log, as is a PaLI assembled
from separate towers whose projection ``img_proj`` therefore starts fresh.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
from safetensors.numpy import save_file

from adalink_jax.checkpoints import common
from adalink_jax.checkpoints.streaming import place

log = logging.getLogger(__name__)

NATIVE_TENSORS, NATIVE_CARD = 'params.safetensors', 'backbone.json'


def save_native(directory: str, params: Mapping, meta: Mapping[str, Any]) -> str:
  """Writes ``params`` (nested dict of arrays) as safetensors + a JSON card; returns the directory."""
  os.makedirs(directory, exist_ok=True)
  flat = {k: np.asarray(jax.device_get(v)) for k, v in common.flatten(dict(params)).items()}
  save_file(flat, os.path.join(directory, NATIVE_TENSORS))
  with open(os.path.join(directory, NATIVE_CARD), 'w', encoding='utf-8') as f:
    json.dump(dict(meta), f, indent=1)
  return directory


def _read_native_into(directory: str, params: dict, shardings: Mapping) -> dict:
  """Replaces every leaf the native checkpoint has, each read slice by slice into its sharding."""
  file = os.path.join(directory, NATIVE_TENSORS)
  if not os.path.exists(file):
    raise common.missing_checkpoint_error(
        file, 'a native adalink_jax backbone (params.safetensors + backbone.json)',
        'write one with adalink_jax.checkpoints.backbone.save_native, or for the demo run '
        '`python scripts/make_demo_assets.py`')
  from adalink_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
  return place(hf.safetensors_sources([pathlib.Path(file)]), params, shardings=dict(shardings),
               skip=_is_adapter_path, where=file)


def _is_adapter_path(path: str) -> bool:
  # Parameters a method adds on top of a backbone (each method declares them in the registry);
  # a backbone checkpoint never has them.
  from adalink_jax.peft import registry  # pylint: disable=g-import-not-at-top
  return registry.is_added_path(path)


def load_into(init: Mapping, params: dict, shardings: Any, setup: Any) -> dict:
  """Loads the checkpoints named in ``init`` over the randomly initialised ``params``.

  ``init.native``: a whole backbone this project wrote; otherwise the family's ``load``
  fills the towers it names (``setup.init_towers``: ``t5``/``vit``, ``gemma``, ``paligemma``).
  """
  init = dict(init or {})
  if init.get('native'):
    log.info('loading backbone from %s', init['native'])
    return _read_native_into(init['native'], params, shardings)
  towers = set(getattr(setup, 'init_towers', ()))
  stray = sorted(k for k, v in init.items()
                 if v and k != 'native' and not k.endswith('_format') and k not in towers)
  if stray:
    raise ValueError(f'config.init.{stray[0]} is set but config.model.family='
                     f'{setup.family!r} loads only {sorted(towers) or "native"}; unset it')
  params = setup.load(init, params, shardings)
  if not any(v for k, v in init.items() if not k.endswith('_format')):
    log.warning('config.init is empty: the backbone is RANDOMLY initialised')
  return params


def load_encoder_decoder(init: Mapping, params: dict, shardings: Any, setup: Any) -> dict:
  """The T5 / PaLI families' ``load``: ``init.t5`` (HF or T5X) and ``init.vit`` (big_vision
  npz or HF SigLIP / ViT)."""
  pali = setup.family == 'pali'
  if init.get('t5'):
    t5_params, t5_sh = (params['t5'], shardings['t5']) if pali else (params, shardings)
    fmt = init.get('t5_format', 'hf')
    log.info('loading the T5 encoder-decoder from %s (%s)', init['t5'], fmt)
    if fmt == 'hf':
      from adalink_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
      t5_params = hf.load_hf_t5_params(init['t5'], t5_params, config=setup.t5_config,
                                       shardings=t5_sh, skip=_is_adapter_path)
      params = dict(params, t5=t5_params) if pali else t5_params
    elif fmt == 't5x':
      from adalink_jax.checkpoints import t5x  # pylint: disable=g-import-not-at-top
      t5_params = t5x.load_t5x_params(init['t5'], t5_params, shardings=t5_sh,
                                      skip=_is_adapter_path)
      params = dict(params, t5=t5_params) if pali else t5_params
    else:
      raise ValueError(f"config.init.t5_format={fmt!r}; choose 'hf' or 't5x'")
  if init.get('vit'):
    if not pali:
      raise ValueError('config.init.vit is set but config.model.family is not pali')
    fmt = init.get('vit_format', 'big_vision')
    log.info('loading the image tower from %s (%s)', init['vit'], fmt)
    if fmt == 'big_vision':
      from adalink_jax.checkpoints import big_vision  # pylint: disable=g-import-not-at-top
      params = dict(params, img=big_vision.load_big_vision_params(
          init['vit'], params['img'], shardings=shardings['img'], skip=_is_adapter_path))
    elif fmt == 'hf':
      from adalink_jax.checkpoints import hf_vision  # pylint: disable=g-import-not-at-top
      params = dict(params, img=hf_vision.load_hf_vision(
          init['vit'], params['img'], shardings=shardings['img'], skip=_is_adapter_path,
          config=setup.pali_config.vit))
    else:
      raise ValueError(f"config.init.vit_format={fmt!r}; choose 'big_vision' (npz, optionally "
                       "'file.npz:img') or 'hf' (SigLIP / ViT save_pretrained directory)")
  if pali and (init.get('t5') or init.get('vit')):
    log.warning('PaLI assembled from separate checkpoints: img_proj (image -> text width) starts '
                'from a fresh random initialisation%s',
                '' if init.get('vit') and init.get('t5') else
                '; so does the tower that was not given')
  return params


def describe(init: Mapping, frozen: Mapping) -> dict:
  """What a checkpoint records about the backbone: its source paths and a content hash.

  The hash is computed where the weights are (:mod:`fingerprint`): no host copy, the same
  value on any mesh and any number of processes."""
  from adalink_jax.peft import artifacts  # pylint: disable=g-import-not-at-top
  return {'sources': {k: v for k, v in dict(init or {}).items() if v},
          'hash': artifacts.base_hash(frozen), 'hash_kind': artifacts.HASH_KIND}


def check_same(saved: Mapping, current: Mapping, frozen: Mapping | None = None):
  """Refuses to resume adapters on a backbone other than the one they were trained on.

  A checkpoint written before ``hash_kind`` existed recorded a sha256 of the gathered values:
  given ``frozen``, that older hash is recomputed to compare like with like."""
  if not saved:
    return
  now = current.get('hash')
  if saved.get('hash_kind') != current.get('hash_kind') and frozen is not None:
    from adalink_jax.peft import artifacts  # pylint: disable=g-import-not-at-top
    now = artifacts.legacy_base_hash(frozen)
  if saved.get('hash') != now:
    raise ValueError(
        'the checkpoint was trained on a different frozen backbone:\n'
        f"  checkpoint: {saved.get('sources')} hash {saved.get('hash')}\n"
        f"  this run:   {current.get('sources')} hash {now}\n"
        'point config.init at the original backbone, or use a fresh --workdir')
