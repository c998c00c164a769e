"""big_vision ``.npz`` checkpoints restored into adalink_jax's ViT (and a PaLI image tower).

The archives are written here the way big_vision writes them: ``np.savez`` of the
'/'-joined leaf names (bfloat16 arrays become 2-byte void, as with big_vision), under
the roots ``big_vision.utils.load_params`` accepts (bare, ``params/``, ``opt/target/``,
and the ``img/`` tower of SigLIP / PaliGemma checkpoints), scanned
(``Transformer/encoderblock`` stacked on axis 0) or not. Each load is compared with the
features of the same weights set directly.
"""
import logging
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adalink_jax import partitioning
from adalink_jax.checkpoints import big_vision
from adalink_jax.checkpoints.common import CheckpointMismatchError, flatten, unflatten
from adalink_jax.models import vit

IMAGES = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (2, 16, 16, 3), minval=-1, maxval=1))


def _model(**kw):
  return vit.ViT(vit.vit_config('tiny', **{'pool_type': 'map', **kw}))


def _abstract(model):
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), IMAGES)['params']
  return boxed, nn.unbox(boxed)


_APPLY = {}


def _features(model, params):
  if model.config not in _APPLY:
    _APPLY[model.config] = jax.jit(model.apply)
  return np.asarray(_APPLY[model.config]({'params': params}, IMAGES))


@pytest.fixture(scope='module')
def reference():
  model = _model()
  params = nn.unbox(model.init(jax.random.PRNGKey(11), IMAGES)['params'])
  flat = {k: np.array(v) for k, v in flatten(params).items()}
  # Non-trivial biases and norms so a misplaced one shows in the features.
  rng = np.random.default_rng(0)
  for k in flat:
    if k.endswith(('bias', 'scale')):
      flat[k] = flat[k] + rng.normal(0, 0.1, flat[k].shape).astype(np.float32)
  params = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  return flat, _features(model, params)


def savez(path, flat, prefix='', compressed=False):
  """What big_vision's npz checkpoints are: np.savez of '/'-joined names."""
  arrays = {prefix + k: v for k, v in sorted(flat.items())}
  (np.savez_compressed if compressed else np.savez)(path, **arrays)
  return str(path)


def scanned(flat, depth=2):
  out = {k: v for k, v in flat.items() if not k.startswith('Transformer/encoderblock_')}
  rests = {k.split('/', 2)[2] for k in flat if k.startswith('Transformer/encoderblock_')}
  for rest in rests:
    out[f'Transformer/encoderblock/{rest}'] = np.stack(
        [flat[f'Transformer/encoderblock_{i}/{rest}'] for i in range(depth)], axis=0)
  return out


@pytest.mark.parametrize('prefix', ['', 'params/', 'opt/target/', 'params/img/'])
def test_roots_and_exact_features(reference, tmp_path, prefix):
  flat, ref = reference
  arrays = {prefix + k: v for k, v in flat.items()}
  if prefix == 'params/img/':  # a SigLIP two-tower archive: text tower and logit scale/bias
    arrays.update({'params/txt/Transformer/encoder_norm/scale': np.ones(8, np.float32),
                   'params/t': np.array([2.3], np.float32),
                   'params/b': np.array([-10.], np.float32)})
  path = str(tmp_path / 'ckpt.npz')
  np.savez(path, **arrays)
  model = _model()
  params = big_vision.load_big_vision_params(path, _abstract(model)[1])
  for name, value in flatten(params).items():
    np.testing.assert_array_equal(np.asarray(value), flat[name], err_msg=name)
  np.testing.assert_array_equal(_features(model, params), ref)


def test_submodel_syntax_and_memmap(reference, tmp_path):
  flat, ref = reference
  path = savez(tmp_path / 'two_tower.npz', {**{f'img/{k}': v for k, v in flat.items()},
                                            **{f'txt/{k}': v for k, v in flat.items()}})
  sources = big_vision.npz_sources(path)
  assert all(type(s).__name__ == '_MemmapNpySource' for s in sources.values())
  model = _model()
  params = big_vision.load_big_vision_params(path + ':img', _abstract(model)[1])
  np.testing.assert_array_equal(_features(model, params), ref)
  # The text tower is also a ViT-shaped tree: ':txt' picks it instead.
  params_txt = big_vision.load_big_vision_params(path + ':txt', _abstract(model)[1])
  np.testing.assert_array_equal(_features(model, params_txt), ref)


@pytest.mark.parametrize('scan_ckpt', [False, True], ids=['ckpt_unscanned', 'ckpt_scanned'])
@pytest.mark.parametrize('scan_model', [False, True], ids=['ours_unscanned', 'ours_scanned'])
def test_scanned_layouts(reference, tmp_path, scan_ckpt, scan_model):
  flat, ref = reference
  stored = scanned(flat) if scan_ckpt else flat
  if scan_ckpt:
    assert stored['Transformer/encoderblock/MlpBlock_0/Dense_0/kernel'].shape == (2, 32, 64)
  path = savez(tmp_path / 'ckpt.npz', stored, 'params/')
  model = _model(scan_layers=scan_model)
  params = big_vision.load_big_vision_params(path, _abstract(model)[1])
  if scan_model:
    got = np.asarray(params['Transformer']['encoderblock']['MultiHeadDotProductAttention_0']
                     ['out']['kernel'])
    np.testing.assert_array_equal(
        got[1], flat['Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out/kernel'])
  np.testing.assert_allclose(_features(model, params), ref, rtol=0, atol=1e-5)


def test_compressed_and_bf16_archives(reference, tmp_path):
  flat, _ = reference
  bf16 = {k: v.astype(jnp.bfloat16) for k, v in flat.items()}
  path = savez(tmp_path / 'bf16.npz', scanned(bf16), compressed=True)
  with zipfile.ZipFile(path) as zf:
    assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
  assert np.load(path)['pos_embedding'].dtype == np.dtype('V2')   # how numpy stores bf16
  model = _model()
  params = big_vision.load_big_vision_params(path, _abstract(model)[1])
  q = params['Transformer']['encoderblock_1']['MultiHeadDotProductAttention_0']['query']['kernel']
  assert q.dtype == jnp.float32   # cast to the model's param dtype
  np.testing.assert_array_equal(
      np.asarray(q),
      bf16['Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel']
      .astype(np.float32))


def test_paligemma_image_tower_into_pali_style_vit(reference, tmp_path):
  """pool 'none' (PaLI): the checkpoint's MAP head and projection head are not needed."""
  flat, _ = reference
  stored = {**scanned(flat), 'head/kernel': np.zeros((32, 48), np.float32),
            'head/bias': np.zeros(48, np.float32)}
  path = tmp_path / 'pt_224.npz'
  np.savez(path, **{f'params/img/{k}': v for k, v in stored.items()},
           **{'params/llm/embedder/input_embedding': np.zeros((10, 48), np.float32)})
  model = _model(pool_type='none')
  params = big_vision.load_big_vision_params(str(path), _abstract(model)[1])
  assert 'MAPHead_0' not in params
  tokens = _features(model, params)
  assert tokens.shape == (2, 16, 32)
  # Same weights as the pooled reference model up to the encoder output.
  ref_params = unflatten({k: jnp.asarray(v) for k, v in flat.items()
                          if not k.startswith('MAPHead_0/')})
  np.testing.assert_array_equal(tokens, _features(model, ref_params))


def test_original_vit_layout_with_cls_in_posemb(reference, tmp_path):
  """big_vision fix_old_checkpoints: posembed_input, [cls] slot inside the position embedding."""
  flat, _ = reference
  model = _model(pool_type='tok')
  _, expected = _abstract(model)
  rng = np.random.default_rng(1)
  old = {k: v for k, v in flat.items() if not k.startswith('MAPHead_0/') and k != 'pos_embedding'}
  pe = rng.normal(size=(1, 17, 32)).astype(np.float32)
  cls = rng.normal(size=(1, 1, 32)).astype(np.float32)
  old.update({'Transformer/posembed_input/pos_embedding': pe, 'cls': cls,
              'pre_logits/kernel': np.zeros((32, 32), np.float32),
              'head/kernel': np.zeros((32, 10), np.float32)})
  path = savez(tmp_path / 'augreg.npz', old)
  params = big_vision.load_big_vision_params(path, expected)
  np.testing.assert_array_equal(np.asarray(params['pos_embedding']), pe[:, 1:])
  np.testing.assert_allclose(np.asarray(params['cls']), cls + pe[:, :1], rtol=0, atol=0)


def test_mismatch_lists_every_name(reference, tmp_path):
  flat, _ = reference
  path = savez(tmp_path / 'ckpt.npz', {**flat, 'Transformer/extra/kernel': np.zeros(3)})
  with pytest.raises(CheckpointMismatchError) as err:
    big_vision.load_big_vision_params(path, _abstract(_model(depth=3, mlp_dim=48))[1])
  e = err.value
  assert 'Transformer/encoderblock_2/LayerNorm_0/scale' in e.missing
  assert e.unexpected == ['Transformer/extra/kernel']
  assert ('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel', (32, 48), (32, 64)) \
      in e.mismatched
  assert ('MAPHead_0/MlpBlock_0/Dense_1/kernel', (48, 32), (64, 32)) in e.mismatched


def test_missing_and_wrong_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.npz'):
    big_vision.load_big_vision_params(tmp_path / 'nowhere.npz', {})
  path = tmp_path / 'other.npz'
  np.savez(path, **{'params/llm/x': np.zeros(2)})
  with pytest.raises(ValueError, match=r'no ViT found.*params/img/'):
    big_vision.load_big_vision_params(str(path), {})


def test_sharded_bf16_restore(reference, tmp_path):
  flat, _ = reference
  path = savez(tmp_path / 'ckpt.npz', scanned(flat), 'params/')
  model = _model()
  boxed, expected = _abstract(model)
  mesh = partitioning.make_mesh(data=1, fsdp=2, model=4)
  shardings = partitioning.param_shardings(boxed, mesh)
  params = big_vision.load_big_vision_params(path, expected, shardings=shardings,
                                             dtype=jnp.bfloat16)
  flat_sh = flatten(shardings)
  for name, value in flatten(params).items():
    assert value.dtype == jnp.bfloat16, name
    assert value.sharding.is_equivalent_to(flat_sh[name], value.ndim), name
    np.testing.assert_array_equal(np.asarray(value.astype(jnp.float32)),
                                  flat[name].astype(jnp.bfloat16).astype(np.float32), name)
  dense = params['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']
  assert {s.data.shape for s in dense.addressable_shards} == {(16, 16)}  # [embed/2, mlp/4]


# ------------------------------------------------------------------ another resolution


def bv_resample_posemb(old, new):
  """big_vision/models/vit.py ``resample_posemb`` as published (logging dropped)."""
  if old.shape == new.shape:
    return old
  gs_old = int(np.sqrt(old.shape[1]))
  gs_new = int(np.sqrt(new.shape[1]))
  grid = old.reshape(gs_old, gs_old, -1)
  zoom = (gs_new / gs_old, gs_new / gs_old, 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1)
  return grid.reshape(1, gs_new * gs_new, -1)


def _at_size(image_size, **kw):
  model = _model(image_size=image_size, **kw)
  x = jnp.zeros((2, *model.config.image_size, 3))
  return model, nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params'])


@pytest.mark.parametrize('image_size, grid', [(32, 8), (24, 6), (12, 3)])  # x2, x1.5, x0.75
def test_posemb_grid_resampled_like_big_vision(reference, tmp_path, caplog, image_size, grid):
  """A 4x4-grid checkpoint into a model at another resolution: big_vision's vit.load result."""
  flat, _ = reference
  assert flat['pos_embedding'].shape == (1, 16, 32)
  path = savez(tmp_path / 'ckpt.npz', scanned(flat), 'params/img/')
  model, expected = _at_size(image_size)
  assert expected['pos_embedding'].shape == (1, grid * grid, 32)
  # Streamed into a sharding that splits the width over 8 devices: each shard is a slice.
  mesh = Mesh(np.array(jax.devices()[:8]), ('x',))
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), expected)
  shardings['pos_embedding'] = NamedSharding(mesh, P(None, None, 'x'))
  with caplog.at_level(logging.INFO, logger='adalink_jax.checkpoints.big_vision'):
    params = big_vision.load_big_vision_params(path, expected, shardings=shardings)
  pe = params['pos_embedding']
  want = bv_resample_posemb(flat['pos_embedding'], np.zeros((1, grid * grid, 32)))
  np.testing.assert_array_equal(np.asarray(pe), want)
  assert pe.sharding == shardings['pos_embedding']
  assert {s.data.shape for s in pe.addressable_shards} == {(1, grid * grid, 4)}
  lines = [r.getMessage() for r in caplog.records if 'resampled' in r.getMessage()]
  assert len(lines) == 1 and f'resampled from 4x4 to {grid}x{grid}' in lines[0]
  assert 'ckpt.npz' in lines[0]
  for name, value in flatten(params).items():  # everything else as stored
    if name != 'pos_embedding':
      np.testing.assert_array_equal(np.asarray(value), flat[name], err_msg=name)
  # The model runs at its resolution, and the corner positions are the checkpoint's.
  grid_pe = np.asarray(pe).reshape(grid, grid, 32)
  old = flat['pos_embedding'].reshape(4, 4, 32)
  np.testing.assert_allclose(grid_pe[[0, 0, -1, -1], [0, -1, 0, -1]],
                             old[[0, 0, -1, -1], [0, -1, 0, -1]], rtol=0, atol=1e-6)
  images = jax.random.uniform(jax.random.PRNGKey(4), (2, image_size, image_size, 3), minval=-1)
  out = np.asarray(model.apply({'params': params}, images))
  assert out.shape == (2, 32) and np.isfinite(out).all()


def test_old_cls_posemb_and_bf16_resampled(reference, tmp_path, caplog):
  """[cls] slot split off first (fix_old_checkpoints), then the 4x4 grid resampled to 8x8."""
  flat, _ = reference
  rng = np.random.default_rng(2)
  old = {k: v for k, v in flat.items() if not k.startswith('MAPHead_0/') and k != 'pos_embedding'}
  pe = rng.normal(size=(1, 17, 32)).astype(jnp.bfloat16)
  cls = rng.normal(size=(1, 1, 32)).astype(np.float32)
  old.update({'Transformer/pos_embedding': pe, 'cls': cls})
  path = savez(tmp_path / 'old.npz', old)
  model, expected = _at_size(32, pool_type='tok')
  with caplog.at_level(logging.INFO, logger='adalink_jax.checkpoints.big_vision'):
    params = big_vision.load_big_vision_params(path, expected)
  grid = pe[:, 1:].astype(np.float32)
  np.testing.assert_array_equal(np.asarray(params['pos_embedding']),
                                bv_resample_posemb(grid, np.zeros((1, 64, 32))))
  np.testing.assert_allclose(np.asarray(params['cls']), cls + pe[:, :1].astype(np.float32),
                             rtol=0, atol=0)
  assert 'resampled from 4x4 to 8x8' in caplog.text


def test_non_square_grid_is_not_resampled(reference, tmp_path):
  flat, _ = reference
  path = savez(tmp_path / 'ckpt.npz', flat)
  _, expected = _at_size((16, 32))  # 4x8 patches
  with pytest.raises(CheckpointMismatchError) as err:
    big_vision.load_big_vision_params(path, expected)
  assert err.value.mismatched == [('pos_embedding', (1, 32, 32), (1, 16, 32))]
  assert 'not resampled: only a [1, g*g, d] grid resamples to another square grid' in str(
      err.value)
