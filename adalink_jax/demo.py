"""The embedded demo: synthetic shapes, a tiny SentencePiece vocabulary and a tiny frozen backbone.

Nothing is downloaded. :func:`adalink_jax.demo_assets.ensure` writes, once, under the assets
folder (:func:`default_assets_dir`):
  * ``spm.model`` -- a SentencePiece vocabulary trained on the demo's own sentences;
  * ``backbone/`` -- a tiny PaLI-style model (ViT + T5) pre-trained from scratch, with full
    fine-tuning, on *pre-training* prompts about rendered shapes ("caption en",
    "answer en color", "answer en shape").
The demo task then asks *new* questions the backbone never saw ("what hue does the object
have?", "which figure is drawn?") and AdaLink, training 0.7% of the weights of this tiny
model, teaches the frozen backbone to answer them. Data are rendered on the fly from a seed,
so batch ``k`` is always the same batch (exact resume for free).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional

import numpy as np

COLORS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (50, 80, 230),
          'yellow': (230, 210, 40)}
SHAPES = ('circle', 'square', 'triangle')

# Pre-training prompts (what the backbone learns) and the demo's new questions (what AdaLink learns).
PRETRAIN_PROMPTS = {'caption': 'caption en', 'color': 'answer en color', 'shape': 'answer en shape'}
DEMO_QUESTIONS = {
    'color': ('what hue does the object have?', 'which tint is the figure painted in?',
              'tell me the hue of the thing.'),
    'shape': ('which figure is drawn?', 'what form does the object take?',
              'tell me the form of the thing.'),
}


def render(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str, str]:
  """One image ``[size, size, 3]`` in [-1, 1] with a random shape; returns (image, color, shape)."""
  color = str(rng.choice(list(COLORS)))
  shape = str(rng.choice(SHAPES))
  img = rng.normal(128, 12, (size, size, 3))
  r = rng.uniform(0.22, 0.38) * size
  cy, cx = rng.uniform(r, size - r, 2)
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  if shape == 'circle':
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
  elif shape == 'square':
    inside = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
  else:  # upward triangle inscribed in the circle
    top, bottom = cy - r, cy + r * 0.6
    half = (yy - top) / (bottom - top) * r
    inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
  img[inside] = np.asarray(COLORS[color]) + rng.normal(0, 8, (inside.sum(), 3))
  return (np.clip(img, 0, 255) / 127.5 - 1.0).astype(np.float32), color, shape


def all_sentences() -> list[str]:
  """Every sentence the demo can produce, to train the vocabulary on."""
  out = list(PRETRAIN_PROMPTS.values()) + [q for qs in DEMO_QUESTIONS.values() for q in qs]
  out += [f'a {c} {s}' for c in COLORS for s in SHAPES] + list(COLORS) + list(SHAPES)
  return out


def train_vocabulary(path: str, vocab_size: int = 64) -> str:
  """Trains the demo SentencePiece model at ``path`` (a ``.model`` file); returns the path."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  text = os.path.join(os.path.dirname(path), 'corpus.txt')
  with open(text, 'w', encoding='utf-8') as f:
    f.write('\n'.join(all_sentences() * 20))
  # T5 conventions: pad=0, eos=1, unk=2, no bos.
  spm.SentencePieceTrainer.train(
      input=text, model_prefix=path[:-len('.model')], vocab_size=vocab_size,
      model_type='word', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  return path


@dataclasses.dataclass
class ShapesTask:
  """Batches for ``mode='pretrain'`` (backbone) or ``mode='vqa'`` (the demo's new questions).

  Each batch is a dict of numpy arrays: image ``[b, s, s, 3]``, encoder_input_tokens ``[b, L]``,
  decoder_input_tokens / decoder_target_tokens / decoder_loss_weights ``[b, T]``, task_id ``[b]``,
  plus ``answers`` (list of lists of str) and ``prompts`` (str) for evaluation.
  """
  spm_path: str
  mode: str = 'vqa'
  batch_size: int = 32
  image_size: int = 32
  text_len: int = 16
  target_len: int = 8
  seed: int = 0

  def __post_init__(self):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if not os.path.exists(self.spm_path):
      raise FileNotFoundError(f'demo vocabulary {self.spm_path} not found; create it with '
                              '`python scripts/make_demo_assets.py` (or run configs/demo.py once)')
    self.sp = spm.SentencePieceProcessor(model_file=self.spm_path)
    if self.mode not in ('pretrain', 'vqa'):
      raise ValueError(f"ShapesTask.mode={self.mode!r}; choose 'pretrain' or 'vqa'")

  def _encode(self, text: str, length: int, eos: bool) -> np.ndarray:
    ids = self.sp.encode(text)[:length - int(eos)] + ([1] if eos else [])
    return np.pad(np.asarray(ids, np.int32), (0, length - len(ids)))

  def example(self, rng: np.random.Generator) -> tuple[np.ndarray, str, str]:
    """One (image, prompt, answer)."""
    img, color, shape = render(rng, self.image_size)
    if self.mode == 'pretrain':
      kind = str(rng.choice(list(PRETRAIN_PROMPTS)))
      prompt = PRETRAIN_PROMPTS[kind]
    else:
      kind = str(rng.choice(list(DEMO_QUESTIONS)))
      prompt = 'answer en ' + str(rng.choice(DEMO_QUESTIONS[kind]))
    answer = {'caption': f'a {color} {shape}', 'color': color, 'shape': shape}[kind]
    return img, prompt, answer

  def batch(self, index: int, split: str = 'train') -> dict:
    """Batch number ``index`` of ``split``: a pure function of (seed, split, index)."""
    rng = np.random.default_rng([self.seed, {'train': 0, 'eval': 1}[split], index])
    imgs, enc, targets, answers, prompts = [], [], [], [], []
    for _ in range(self.batch_size):
      img, prompt, answer = self.example(rng)
      imgs.append(img)
      enc.append(self._encode(prompt, self.text_len, eos=True))
      targets.append(self._encode(answer, self.target_len, eos=True))
      answers.append([answer] * 10)  # VQA format: ten (here identical) annotator answers
      prompts.append(prompt)
    targets = np.stack(targets)
    dec_in = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    return dict(image=np.stack(imgs), encoder_input_tokens=np.stack(enc),
                decoder_input_tokens=dec_in, decoder_target_tokens=targets,
                decoder_loss_weights=(targets > 0).astype(np.float32),
                task_id=np.zeros((self.batch_size,), np.int32), answers=answers,
                prompts=prompts)

  def train_batches(self, start: int = 0) -> Iterator[dict]:
    """Endless training batches from batch ``start`` (resume = start at the saved step)."""
    i = start
    while True:
      yield self.batch(i, 'train')
      i += 1

  def eval_batches(self, num_batches: int) -> Iterator[dict]:
    for i in range(num_batches):
      yield self.batch(i, 'eval')

  def decode_text(self, ids) -> str:
    ids = [int(t) for t in ids]
    if 1 in ids:
      ids = ids[:ids.index(1)]
    n = self.sp.get_piece_size()  # the model may pad its vocabulary beyond the SentencePiece one
    return self.sp.decode([t for t in ids if 2 < t < n])


def default_assets_dir() -> str:
  """Where the demo's vocabulary and backbone live when ``config.data.assets_dir`` is empty.

  The train / evaluate CLIs set that field from ``ADALINK_DEMO_DIR``
  (:mod:`adalink_jax.config_env`); the library reads no environment variable.
  """
  return os.path.join(os.path.expanduser('~'), '.cache', 'adalink_jax', 'demo')


def spm_path(assets_dir: Optional[str] = None) -> str:
  return os.path.join(assets_dir or default_assets_dir(), 'spm.model')
