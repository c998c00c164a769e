"""adalink_jax.data: configuration and errors, image decoding / resizing, vocabulary, and the
PaLI feature converter. References we did not write: PyTorch's bilinear interpolation, PIL's
decoders, SentencePiece, and seqio's own EncDecFeatureConverter (with and without packing)."""
import io
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from adalink_jax import data
from adalink_jax.env import import_tensorflow

tf = import_tensorflow()
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position

import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position


# ------------------------------------------------------------------------- configuration


def test_data_dirs_and_missing_data_messages(tmp_path):
  with pytest.raises(ValueError, match='unknown data dir key'):
    tasks.register_all(data.DataConfig().set_data_dirs({'vqa2': '/x'}))
  cfg, hint = data.DataConfig(), tasks.DOWNLOAD_HINTS['textvqa']
  with pytest.raises(data.DataNotFoundError) as e:
    data.data_dir(cfg, 'textvqa', expected=['TextVQA_0.5.1_train.json', 'train_images'],
                  hint=hint)
  msg = str(e.value)
  for part in ("'textvqa'", 'ADALINK_DATA_TEXTVQA', 'set_data_dirs', 'TextVQA_0.5.1_train.json',
               'https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_'):
    assert part in msg
  (tmp_path / 'TextVQA_0.5.1_train.json').write_text('{}')
  cfg = cfg.set_data_dirs({'textvqa': str(tmp_path)})
  with pytest.raises(data.DataNotFoundError) as e:
    data.data_dir(cfg, 'textvqa', expected=['TextVQA_0.5.1_train.json', 'train_images'],
                  hint=hint)
  msg = str(e.value)
  assert "['train_images']" in msg and str(tmp_path) in msg
  assert 'TextVQA_0.5.1_train.json' in msg  # listed among the folder's contents
  (tmp_path / 'train_images').mkdir()
  assert data.data_dir(cfg, 'textvqa', expected=['train_images']) == str(tmp_path)
  cfg = cfg.set_data_dirs({'textvqa': None})
  assert 'textvqa' not in cfg.data_dirs


def test_environment_configuration(monkeypatch):
  monkeypatch.setenv('ADALINK_DATA_VQAV2', '/data/vqa')
  monkeypatch.setenv('ADALINK_DATA_COCO', '/data/coco')
  monkeypatch.setenv('ADALINK_IMAGE_SIZE', '448')
  monkeypatch.setenv('ADALINK_PROMPT_STYLE', 'mmit')
  monkeypatch.setenv('ADALINK_VOCAB', '/v/spm.model')
  monkeypatch.setenv('ADALINK_EXTRA_IDS', '0')
  cfg = data.config_from_env(os.environ)
  assert cfg.data_dirs == {'vqav2': '/data/vqa', 'coco': '/data/coco'}
  assert (cfg.image_size, cfg.prompt_style, cfg.vocab_path, cfg.extra_ids) == (
      448, 'mmit', '/v/spm.model', 0)
  with pytest.raises(ValueError, match='prompt_style'):
    data.DataConfig().configure(prompt_style='fancy')
  with pytest.raises(ValueError, match='image_size'):
    data.DataConfig().configure(image_size=0)


def test_vocabulary_from_config(tmp_path):
  default = data.DataConfig()
  assert data.get_vocabulary(default).sentencepiece_model_file == data.DEFAULT_VOCAB_PATH
  assert data.get_vocabulary(default).extra_ids == 100
  prefix = str(tmp_path / 'sp')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(['a tiny corpus for a tiny model', 'caption en answer en']),
      model_prefix=prefix, vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      hard_vocab_limit=False, minloglevel=2, num_threads=1)
  cfg = default.configure(vocab_path=prefix + '.model', extra_ids=7)
  vocab = data.get_vocabulary(cfg)
  assert data.get_vocabulary(default.configure(vocab_path=prefix + '.model', extra_ids=7)) is vocab
  assert data.get_vocabulary(default) is not vocab  # the default config is unchanged
  n = spm.SentencePieceProcessor(model_file=prefix + '.model').get_piece_size()
  assert vocab.vocab_size == n + 7 and vocab.eos_id == 1 and vocab.pad_id == 0
  assert vocab.decode(vocab.encode('caption en')) == 'caption en'


# ---------------------------------------------------------------------------------- images


def _png_bytes(arr, mode=None):
  buf = io.BytesIO()
  Image.fromarray(arr, mode=mode).save(buf, format='PNG')
  return buf.getvalue()


@pytest.mark.parametrize('src,dst', [((17, 23), 32), ((40, 64), 24)])
def test_preprocess_image_matches_torch_bilinear(src, dst):
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(*src, 3), dtype=np.uint8)
  got = data.preprocess_image(tf.constant(img), dst).numpy()
  # PyTorch bilinear, half-pixel centres, no antialiasing (big_vision's tf.image.resize default).
  ref = torch.nn.functional.interpolate(
      torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None], size=(dst, dst),
      mode='bilinear', align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
  assert got.shape == (dst, dst, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref / 127.5 - 1.0, atol=2e-5)
  ends = data.preprocess_image(tf.constant(np.array([[[0, 255, 0]]], np.uint8)), 1).numpy()
  np.testing.assert_array_equal(ends.reshape(-1), [-1.0, 1.0, -1.0])


def test_load_image_decodes_and_counts_unreadable_files(tmp_path):
  data.reset_skipped_images()
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
  good, grey = tmp_path / 'good.png', tmp_path / 'grey.png'
  good.write_bytes(_png_bytes(rgb))
  grey.write_bytes(_png_bytes(gray, mode='L'))
  jpg = tmp_path / 'photo.jpg'
  Image.fromarray(rgb).save(jpg, quality=90)
  (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  paths = [str(good), str(grey), str(jpg), str(tmp_path / 'bad.jpg'),
           str(tmp_path / 'missing.jpg'), str(tmp_path / 'bad.jpg')]
  ds = tf.data.Dataset.from_tensor_slices(paths).map(lambda p: data.load_image(p, 'unit'))
  out = [(i.numpy(), bool(ok.numpy())) for i, ok in ds]
  assert [ok for _, ok in out] == [True, True, True, False, False, False]
  np.testing.assert_array_equal(out[0][0], rgb)  # PNG is lossless: exact pixels
  np.testing.assert_array_equal(out[1][0], np.repeat(gray[..., None], 3, axis=-1))
  pil = np.asarray(Image.open(jpg).convert('RGB'), np.int32)
  diff = np.abs(out[2][0].astype(np.int32) - pil)  # libjpeg builds differ in IDCT/upsampling
  assert out[2][0].shape == rgb.shape and diff.max() <= 8 and diff.mean() < 1.5
  # Two distinct unreadable files (one seen twice), counted once each.
  assert data.skipped_images() == {'unit': 2}
  assert data.skipped_image_paths('unit') == sorted([paths[3], paths[4]])
  assert data.skipped_images_report() == (
      'unit: 2 unreadable image file(s) skipped (3 example(s))')
  data.reset_skipped_images()
  assert data.skipped_images() == {}


# ------------------------------------------------------------------------ feature converter


def _examples(size=8, spec_size=8):
  rng = np.random.default_rng(2)
  exs = [dict(inputs=[7, 8, 5, 1], targets=[3, 9, 1], task_id=4),
         dict(inputs=[8, 4, 9, 3, 1], targets=[4, 1], task_id=2),
         dict(inputs=[5, 1], targets=[6, 6, 6, 1], task_id=0)]
  for e in exs:
    e['image'] = rng.uniform(-1, 1, (size, size, 3)).astype(np.float32)

  def gen():
    for e in exs:
      yield e
  sig = {'inputs': tf.TensorSpec([None], tf.int32), 'targets': tf.TensorSpec([None], tf.int32),
         'task_id': tf.TensorSpec([], tf.int32),
         'image': tf.TensorSpec([spec_size, spec_size, 3], tf.float32)}
  return exs, tf.data.Dataset.from_generator(gen, output_signature=sig)


def test_pali_converter_matches_seqio_and_carries_image_and_task_id():
  exs, ds = _examples()
  lengths = {'inputs': 6, 'targets': 5}
  got = list(data.PaLIFeatureConverter(image_size=8)(ds, lengths).batch(3).as_numpy_iterator())
  assert len(got) == 1
  b = got[0]
  ref = next(seqio.EncDecFeatureConverter(pack=False)(
      ds.map(lambda e: {'inputs': e['inputs'], 'targets': e['targets']}), lengths)
             .batch(3).as_numpy_iterator())
  assert set(b) == set(ref) | {'image', 'task_id'}
  for k in ref:
    np.testing.assert_array_equal(b[k], ref[k])
    assert b[k].dtype == np.int32 and b[k].shape == (3, lengths['inputs' if 'encoder' in k else 'targets'])
  np.testing.assert_array_equal(b['encoder_input_tokens'][0], [7, 8, 5, 1, 0, 0])
  np.testing.assert_array_equal(b['decoder_target_tokens'][0], [3, 9, 1, 0, 0])
  np.testing.assert_array_equal(b['decoder_input_tokens'][0], [0, 3, 9, 1, 0])
  np.testing.assert_array_equal(b['decoder_loss_weights'][0], [1, 1, 1, 0, 0])
  assert b['image'].shape == (3, 8, 8, 3) and b['image'].dtype == np.float32
  np.testing.assert_array_equal(b['image'], np.stack([e['image'] for e in exs]))
  np.testing.assert_array_equal(b['task_id'], [4, 2, 0])


def test_pali_converter_packing_and_errors():
  _, ds = _examples()
  text = ds.map(lambda e: {'inputs': e['inputs'], 'targets': e['targets']})
  lengths = {'inputs': 10, 'targets': 7}
  got = list(data.PaLIFeatureConverter(image_size=None, with_task_id=False, pack=True)(
      text, lengths).as_numpy_iterator())
  ref = list(seqio.EncDecFeatureConverter(pack=True)(text, lengths).as_numpy_iterator())
  assert len(got) == len(ref) == 2
  for g, r in zip(got, ref):
    assert set(g) == set(r)
    for k in r:
      np.testing.assert_array_equal(g[k], r[k])
  # seqio's documented packing of the first two examples.
  np.testing.assert_array_equal(got[0]['encoder_input_tokens'], [7, 8, 5, 1, 8, 4, 9, 3, 1, 0])
  np.testing.assert_array_equal(got[0]['encoder_segment_ids'], [1, 1, 1, 1, 2, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(got[0]['decoder_input_tokens'], [0, 3, 9, 0, 4, 0, 0])
  np.testing.assert_array_equal(got[0]['decoder_positions'], [0, 1, 2, 0, 1, 0, 0])

  with pytest.raises(ValueError, match='text-only'):
    data.PaLIFeatureConverter(image_size=224, pack=True)
  with pytest.raises(ValueError, match='image_size=8'):
    data.PaLIFeatureConverter(image_size=8)(ds, {'inputs': 6, 'targets': 5, 'image': 16})
  with pytest.raises(ValueError, match='targets'):
    data.PaLIFeatureConverter(image_size=8)(ds, {'inputs': 6})
  _, wrong = _examples(size=5, spec_size=None)
  with pytest.raises(tf.errors.InvalidArgumentError):  # images of the wrong size
    list(data.PaLIFeatureConverter(image_size=8)(wrong, {'inputs': 6, 'targets': 5})
         .as_numpy_iterator())
  with pytest.raises(tf.errors.InvalidArgumentError):  # inputs longer than allowed
    list(data.PaLIFeatureConverter(image_size=8)(ds, {'inputs': 3, 'targets': 5})
         .as_numpy_iterator())
