"""Resume cost of the seqio training input: time to the first batch of ``train_batches(start)``.

  python -m bench.resume [--starts=20,2000] [--batch=8] [--questions=512] [--images=64]
                         [--image_px=640x480] [--reps=3] [--data_dir=DIR] [--out=results.json]

Builds a VQAv2-layout dataset on disk (official question / annotation JSON files, COCO-named
photograph-sized JPEGs of noisy random colour fields, a SentencePiece model trained on its
text), points ``configs/vqav2_raw.py`` (tiny model, 224 px images) at it and times, in
this process, ``next(SeqioSource(config).train_batches(start))`` for each start: the
index-addressable stream (what the trainer runs) and seqio's pipeline with ``skip(start)``
batches (``train_batches_by_skip``, the pre-change resume, still used for packed batches).
Each time includes building the tf.data pipeline; the JSON files are parsed and tf.functions
traced once beforehand (warm-up at start 0). Counted until the first batch came back:
``records``, what the JSON source generated (seqio caches a split this small in memory, so the
skip path generates each record once and replays it), and ``decoded``, image files read and
decoded (``adalink_jax.data._decode_py`` wrapped with a counter before any pipeline is built:
every earlier example plus seqio's 1,000-example shuffle buffer for the skip path, a prefetch's
worth for the stream). The index path is timed ``--reps`` times (median), the skip path once.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import threading
import time

import numpy as np

from bench import common

SUBSET = 'train2014'


def _write_images(coco: str, n: int, px: tuple[int, int], rng) -> list[int]:
  """``n`` JPEGs ``COCO_train2014_<id>.jpg`` of ``px`` (w, h): bilinear-upscaled 8x6 random
  colour fields plus pixel noise, so they decode like photographs rather than flat fills."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(coco, SUBSET), exist_ok=True)
  ids = []
  for j in range(n):
    image_id = 1000 + j
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    big = np.asarray(small.resize(px, Image.BILINEAR), np.int16)
    big = np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(big).save(os.path.join(coco, SUBSET, f'COCO_{SUBSET}_{image_id:012d}.jpg'),
                              quality=90)
    ids.append(image_id)
  return ids


def _write_vqa(root: str, image_ids: list[int], n_questions: int) -> list[str]:
  """The VQAv2 train question / annotation files; returns the text for the vocabulary."""
  colours = ['red', 'green', 'blue', 'yellow', 'white', 'black', 'brown', 'gray']
  questions, annotations, texts = [], [], []
  for q in range(n_questions):
    image_id = image_ids[q % len(image_ids)]
    qid = image_id * 1000 + q
    text = f'what color is the object number {q % 97} in this picture?'
    main, other = colours[q % len(colours)], colours[(q + 3) % len(colours)]
    words = [main] * 6 + [other] * 4
    questions.append({'image_id': image_id, 'question': text, 'question_id': qid})
    annotations.append({'question_id': qid, 'image_id': image_id, 'answer_type': 'other',
                        'question_type': 'what color', 'multiple_choice_answer': main,
                        'answers': [{'answer': w, 'answer_confidence': 'yes', 'answer_id': i + 1}
                                    for i, w in enumerate(words)]})
    texts.append(f'answer en {text} {main} {other}')
  os.makedirs(os.path.join(root, 'vqav2'), exist_ok=True)
  with open(os.path.join(root, 'vqav2', f'v2_OpenEnded_mscoco_{SUBSET}_questions.json'), 'w') as f:
    json.dump({'questions': questions}, f)
  with open(os.path.join(root, 'vqav2', f'v2_mscoco_{SUBSET}_annotations.json'), 'w') as f:
    json.dump({'annotations': annotations}, f)
  return texts


def _train_vocab(root: str, texts: list[str]) -> str:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  prefix = os.path.join(root, 'spm')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=400, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
      num_threads=1, minloglevel=2)
  return prefix + '.model'


def build_dataset(root: str, n_images: int, n_questions: int, px: tuple[int, int]) -> str:
  """Writes the dataset under ``root`` (reused if present); returns the vocabulary path."""
  vocab = os.path.join(root, 'spm.model')
  if os.path.exists(vocab):
    return vocab
  rng = np.random.default_rng(0)
  ids = _write_images(os.path.join(root, 'coco'), n_images, px, rng)
  return _train_vocab(root, _write_vqa(root, ids, n_questions))


def make_config(root: str, vocab: str, batch: int):
  from adalink_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.multimodal('vqav2', 'raw', 'vqa_accuracy',
                            f'model=tiny,batch={batch},image_size=224')
  c.data.vocab = vocab
  c.data.data_dirs.vqav2 = os.path.join(root, 'vqav2')
  c.data.data_dirs.coco = os.path.join(root, 'coco')
  c.data.text_len, c.data.target_len = 64, 8
  return c


_DECODED = [0]
_DECODED_LOCK = threading.Lock()


def count_decodes() -> None:
  """Counts every image decode of pipelines built from now on (the real decoder still runs)."""
  from adalink_jax import data  # pylint: disable=g-import-not-at-top
  decode = data._decode_py  # pylint: disable=protected-access

  @functools.wraps(decode)
  def counted(*args):
    with _DECODED_LOCK:
      _DECODED[0] += 1
    return decode(*args)
  data._decode_py = counted  # pylint: disable=protected-access


def time_first_batch(source, start: int, mode: str) -> dict:
  """Seconds from ``train_batches(start)`` to its first batch; records and images read."""
  import seqio  # pylint: disable=g-import-not-at-top
  json_source = seqio.get_mixture_or_task(source.config.data.task).source
  json_source.reset_read_stats()
  decoded0 = _DECODED[0]
  t0 = time.perf_counter()
  batches = source.train_batches(start) if mode == 'index' else source.train_batches_by_skip(start)
  batch = next(batches)
  seconds = time.perf_counter() - t0
  decoded = _DECODED[0] - decoded0  # read before the prefetch threads run further
  assert batch['image'].shape[0] == source.local_batch
  stats = json_source.read_stats(source.train_split)
  return dict(seconds=seconds, records=stats['examples'], decoded=decoded)


def run(args) -> dict:
  from adalink_jax import seqio_source  # pylint: disable=g-import-not-at-top
  px = tuple(int(v) for v in args.image_px.split('x'))
  root = args.data_dir or tempfile.mkdtemp(prefix='adalink_resume_')
  vocab = build_dataset(root, args.images, args.questions, px)
  count_decodes()
  source = seqio_source.SeqioSource(make_config(root, vocab, args.batch))
  assert source.index_addressable()
  for mode in ('index', 'skip'):  # warm-up: JSON parsed, tf.functions traced
    time_first_batch(source, 0, mode)
  rows = []
  for start in args.starts:
    for mode in ('index', 'skip'):
      reps = args.reps if mode == 'index' else 1
      runs = [time_first_batch(source, start, mode) for _ in range(reps)]
      seconds = statistics.median(r['seconds'] for r in runs)
      rows.append(dict(mode=mode, start=start, seconds=seconds,
                       all_seconds=[r['seconds'] for r in runs], records=runs[0]['records'],
                       decoded=runs[0]['decoded']))
      print(f'  {mode:5s} start={start:6d}: {rows[-1]["seconds"]:8.3f} s, '
            f'{rows[-1]["records"]} records generated, {rows[-1]["decoded"]} images decoded',
            flush=True)
  return dict(rows=rows, batch=args.batch, questions=args.questions, images=args.images,
              image_px=args.image_px, data_dir=root, load=common.load_average(),
              machine=common.machine_info())


def table(result: dict) -> str:
  """Markdown: one row per start, both modes, and each mode's ratio last start / first start."""
  by = {(r['mode'], r['start']): r for r in result['rows']}
  starts = sorted({r['start'] for r in result['rows']})
  lines = ['| start (batches) | examples before it | stream: first batch | images decoded | '
           'skip: first batch | images decoded |', '|---|---|---|---|---|---|']
  for s in starts:
    i, k = by[('index', s)], by[('skip', s)]
    lines.append(f'| {s} | {s * result["batch"]} | {i["seconds"]:.3f} s | {i["decoded"]} | '
                 f'{k["seconds"]:.2f} s | {k["decoded"]} |')
  lo, hi = starts[0], starts[-1]
  for mode, name in (('index', 'stream'), ('skip', 'skip')):
    ratio = by[(mode, hi)]['seconds'] / by[(mode, lo)]['seconds']
    lines.append(f'\n{name}: start {hi} / start {lo} = {ratio:.2f}x')
  return '\n'.join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--starts', default='20,2000', type=lambda s: [int(x) for x in s.split(',')])
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--questions', type=int, default=512)
  p.add_argument('--images', type=int, default=64)
  p.add_argument('--image_px', default='640x480')
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--data_dir', default='')
  p.add_argument('--out', default='')
  args = p.parse_args(argv)
  print(f'[resume] {common.uptime_line()}', flush=True)
  result = run(args)
  print(table(result))
  print(f'[resume] {common.uptime_line()}', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
