"""Metrics against hand-computed values and against the official/reference implementations.

References we did not write: pycocoevalcap (Cider, Bleu, Rouge, Meteor, PTBTokenizer with Stanford
CoreNLP run through Java), sklearn (accuracy_score, f1_score, matthews_corrcoef), scipy (pearsonr,
spearmanr). The caption and GLUE metrics call those libraries, so their tests check hand-computed
values and our plumbing (tokenisation, order, scale, T5's invalid-label handling). The VQA rules are
checked on crafted answers, one per rule of the official vqaEval.py (GT-Vision-Lab/VQA, HEAD
a013f00 and the 2016 version 458a8b2), and on a corpus whose official scores were computed by
running those two files.
"""
import math
import random
import shutil
import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from adalink_jax import metrics as M
from adalink_jax import ptb_tokenizer as P

needs_java = pytest.mark.skipif(shutil.which('java') is None or P._find_ptb_jar() is None,
                                reason='needs java + the CoreNLP jar shipped with pycocoevalcap')

# Ordinary caption text with capitals, punctuation, clitics, quotes, brackets, numbers, hyphens,
# abbreviations, currency and a few non-ASCII characters.
CAPTIONS = [
    'A man riding a wave on top of a surfboard.',
    "Don't you think it's the dog's bone? I can't, won't, cannot!",
    '"Hello," she said (quietly) {really} [maybe].',
    'The U.S. flag, Mr. Smith and Dr. Who at 3.5 p.m. etc.',
    'It costs $5.00 & 1,000 dollars... or -- no - black-and-white',
    "He's gonna wanna gotta lemme gimme 'tis",
    "dogs' toys. O'Neill's car; rock 'n' roll at 2 o'clock in the '60s.",
    'A cat   sitting on a mat.Two dogs',
    'Café naïve résumé — “smart quotes” ‘single’ …',
    'TWO People WALKING on Main St. near the Ave. at 10:30 am',
    "I'M HERE. YOU'RE THERE. WE'VE DONE. THEY'D GO. SHE'LL COME.",
    'A plate with a hot-dog, fries & a 1/2 cup of ketchup!!',
    'Two giraffes standing next to each other in a zoo enclosure',
    'a kitchen with a stove , a sink and a refrigerator .',
    'A group of people flying kites in a field?! Yes: many; maybe 20%.',
    "The man's shirt reads 'ROCK & ROLL' in big letters",
    'A bus #12 parked at the curb (next to a sign that says "STOP").',
    'Vitamin C. The letter A. Some fruit on a table.',
    'a T-shirt with "I <3 NY" and/or 24/7 printed on it',
    'An old-fashioned clock tower, circa 1900s; very tall.',
    'Children’s toys... scattered on the floor',
    'a 4x4 truck on a dirt road at 5 p.m. in Jan. 2014',
    '',
    'x-ray of a hand --- blurry',
]

CAPTION_REFS = [
    ['A man on a surfboard riding a wave.', 'A surfer rides a large wave in the ocean!',
     'Someone surfing; the wave is big.'],
    ["A dog chewing on a bone, isn't it cute?", "The dog's bone is on the grass.",
     'A brown dog with a bone', "Dog's toy (a bone) lying on the lawn.", 'A dog.'],
    ['"Hello" written on a sign.', 'A sign that says HELLO in red letters.'],
    ['The U.S. flag waving in front of a building.', 'An American flag flying on a pole.',
     'A flag on a flagpole at 3 p.m.'],
    ['A price tag of $5.00 on a black-and-white shirt.', 'A shirt on sale for five dollars.'],
    ['Two young men playing video games.', "They're gonna play a game!"],
    ['Toys belonging to the dogs on the floor.', "A child's toy car on a rug."],
    ['A cat sitting on a mat.', 'Two dogs and a cat on a mat.', 'A cat laying on a rug.'],
    ['A café with people sitting outside.', 'People at a cafe — drinking coffee.'],
    ['People walking down a city street.', 'Two pedestrians on Main St. at 10:30.'],
    ['A man and a woman standing in a room.', "They're here, waiting."],
    ['A hot dog with fries and ketchup on a plate.', 'A plate of food: hot-dog & fries.'],
    ['Two giraffes in a zoo enclosure.', 'Giraffes standing together near trees.'],
    ['A kitchen with a stove, sink and fridge.', 'A small kitchen with white appliances.'],
    ['People flying kites in a large field.', 'Many kites in the sky over a park.'],
    ['A man wearing a rock and roll t-shirt.', "A shirt that says 'ROCK & ROLL'."],
    ['A city bus parked next to a stop sign.', 'A bus (number 12) at the curb.'],
    ['Oranges and lemons on a table.', 'A bowl of fruit with vitamin C.'],
    ['A white T-shirt that says I love NY.', 'A shirt with a heart on it.'],
    ['A tall clock tower in a city.', 'An old clock tower against a blue sky.'],
    ['Toys scattered on a wooden floor.', 'A messy playroom full of toys...'],
    ['A truck driving on a dirt road.', 'A 4x4 on a muddy track.'],
    ['A blank caption.', 'Nothing to see here.'],
    ['An x-ray image of a human hand.', 'A radiograph of a hand.'],
]


def _coco_tokenize(captions):
  """pycocoevalcap's PTBTokenizer on a list (one image id keeps the order)."""
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  return PTBTokenizer().tokenize({0: [{'caption': c} for c in captions]})[0]


def _coco_tokenize_dict(captions_by_id):
  """pycocoevalcap's PTBTokenizer on {image_id: [caption, ...]}."""
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  return PTBTokenizer().tokenize(
      {k: [{'caption': c} for c in v] for k, v in captions_by_id.items()})


def _coco_scores(gts, res):
  """pycocoevalcap Cider/Bleu/Rouge on tokenised {id: [str]} dicts."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  cider, cider_per = Cider().compute_score(gts, res)
  bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
  rouge, rouge_per = Rouge().compute_score(gts, res)
  return {'cider': (cider, cider_per), 'bleu4': (bleu[3], bleu_per[3]),
          'rouge_l': (rouge, rouge_per), 'bleus': bleu}


def _random_captions(n, seed):
  """Caption-like sentences mixing the phenomena above (seeded, reproducible)."""
  rng = random.Random(seed)
  words = ("a an the man woman dog cat A The Two people standing on of in with near street "
           "table pizza surfboard wave train giraffe kitchen red blue is are holding riding Mr Dr "
           "St Ave Mt Jr Inc Co etc U.S. I it it's don't can't isn't there's man's dogs' cannot "
           "gonna o'clock y'all McDonald's I'm you're black-and-white t-shirt x-ray 3-D 10 3.5 "
           "1,000 $5 50% #1 1/2 24/7 and/or w/ AT&T & + e.g. a.m. p.m. vs. No. Jan. Sept. Mass "
           "miss Pa A. c. I. O'Neill '90s 'em 2nd 4x4 TV OK café").split()
  attach = ['.', ',', '!', '?', ';', ':', '...', '!!', '-', "'", '"', ')', '."', "'s", '.,']
  lead = ['"', "'", '(', '[', '-', '‘', '“', '$']
  out = []
  for _ in range(n):
    toks = []
    for _ in range(rng.randint(1, 14)):
      w, r = rng.choice(words), rng.random()
      w = rng.choice(lead) + w if r < 0.08 else (w + rng.choice(attach) if r < 0.25 else w)
      toks.append(w.upper() if rng.random() < 0.03 else w)
    s = ' '.join(toks) + rng.choice(['.', '', ' .', '!'])
    out.append(s[0].upper() + s[1:])
  return out


# ------------------------------------------------------------------------- tokenisation

@needs_java
def test_ptb_tokenize_both_backends_equal_pycocoevalcap():
  captions = (CAPTIONS + [c for refs in CAPTION_REFS for c in refs] + _random_captions(600, 0)
              + _random_captions(400, 2))
  expected = _coco_tokenize(captions)
  assert M.ptb_tokenize(captions, 'java') == expected
  got = M.ptb_tokenize(captions, 'python')
  bad = [(c, e, g) for c, e, g in zip(captions, expected, got) if e != g]
  assert not bad, bad[:5]


def test_ptb_tokenize_python_hand_examples():
  # Expected strings worked out from the PTB conventions: clitics split, punctuation tokens
  # dropped, brackets escaped (and, lowercased, not dropped: upstream quirk), abbreviations keep
  # their period, single letters lose it before a capitalised function word.
  cases = {
      "Don't you think it's the dog's bone? I can't!":
          "do n't you think it 's the dog 's bone i ca n't",
      'I cannot, gonna go.': 'i can not gon na go',
      'A (red) [big] {old} car.': 'a -lrb- red -rrb- -lsb- big -rsb- -lcb- old -rcb- car',
      '"Hi," Mr. Smith said at 3.5 p.m. on Main St.': 'hi mr. smith said at 3.5 p.m. on main st.',
      'Vitamin C. The end': 'vitamin c the end',
      'Vitamin C. the end': 'vitamin c. the end',
      'It costs $5 -- or 1,000 & more...': 'it costs $ 5 or 1,000 & more',
      'a black-and-white cat!!': 'a black-and-white cat !!',
      'size 10 1/2 shoes': 'size 10\u00a01/2 shoes',
      '': '',
  }
  assert M.ptb_tokenize(list(cases), 'python') == list(cases.values())


def test_ptb_tokenize_auto_falls_back_to_python_without_java(monkeypatch):
  captions = ["It's a dog's life (really).", 'Mr. T. The end', 'gonna go']
  expected = M.ptb_tokenize(captions, 'python')
  assert expected == ["it 's a dog 's life -lrb- really -rrb-", 'mr. t the end', 'gon na go']
  monkeypatch.setattr(P.shutil, 'which', lambda name: None)
  assert M.ptb_tokenize(captions, 'auto') == expected
  with pytest.raises(RuntimeError, match='needs `java`'):
    M.ptb_tokenize(captions, 'java')


def test_ptb_tokenize_keeps_one_line_per_caption_and_validates():
  out = M.ptb_tokenize(['two\nlines here.', 'next'], 'python')
  assert out == ['two lines here', 'next']
  with pytest.raises(ValueError, match='backend'):
    M.ptb_tokenize(['x'], 'perl')
  with pytest.raises(TypeError, match='caption 1'):
    M.ptb_tokenize(['x', 3], 'python')


# ------------------------------------------------------------------------- CIDEr / BLEU / ROUGE

def test_cider_hand_computed():
  # Two images, one reference each: N = 2 documents, every reference n-gram has df = 1, so every
  # weight is log(2) - log(1) = log 2. A perfect "a b" hypothesis: unigram cosine 1, bigram
  # cosine 1, no 3/4-grams (0), equal bigram counts (no penalty): mean(1, 1, 0, 0) * 10 = 5.
  refs = [['a b'], ['c d']]
  assert M.cider(['a b', 'c d'], refs, tokenizer=None) == pytest.approx(500.0, rel=1e-12)
  # Hypothesis "a": unigram vec (log2) vs ref (log2, log2): min(w, w_r) * w_r / (|h||r|) =
  # log2^2 / (log2 * sqrt2 log2) = 1/sqrt2; no bigrams. Bigram counts 0 vs 1 -> delta = -1 ->
  # penalty exp(-1 / 72). Image score = (1/sqrt2) * exp(-1/72) / 4 * 10.
  mean, per = M.cider(['a', 'c d'], refs, tokenizer=None, return_per_example=True)
  first = 100 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
  np.testing.assert_allclose(per, [first, 500.0], rtol=1e-12)
  assert mean == pytest.approx((first + 500) / 2, rel=1e-12)
  # A hypothesis n-gram absent from every reference gets df = 0 -> weight log(N) (clipped away).
  assert M.cider(['a b zz', 'c d'], refs, tokenizer=None) < 500.0


def test_bleu4_hand_computed():
  # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": clipped precisions 5/6, 3/5, 2/4,
  # 1/3; equal lengths so no brevity penalty: BLEU-4 = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
  got = M.bleu4(['the cat sat on the mat'], [['the cat sat on a mat']], tokenizer=None)
  assert got == pytest.approx(100 * (1 / 12) ** 0.25, rel=1e-8)
  # 'closest' reference length, ties to the shorter one: refs of 3 and 5 words for a 4-word
  # hypothesis -> 3, no penalty (all precisions 1) -> 100.
  hyp, refs = ['the cat sat down'], [['the cat sat', 'the cat sat down now']]
  assert M.bleu4(hyp, refs, tokenizer=None) == pytest.approx(100.0, rel=1e-8)
  # Only a 5-word ref: brevity penalty exp(1 - 5/4).
  got = M.bleu4(hyp, [['the cat sat down now']], tokenizer=None)
  assert got == pytest.approx(100 * math.exp(-0.25), rel=1e-8)


def test_rouge_l_hand_computed():
  # LCS("a b c d", "a c d e f") = 3: P = 3/4, R = 3/5, F = (1 + 1.2^2) P R / (R + 1.2^2 P).
  p, r = 0.75, 0.6
  got = M.rouge_l(['a b c d'], [['a c d e f']], tokenizer=None)
  assert got == pytest.approx(100 * 2.44 * p * r / (r + 1.44 * p), rel=1e-12)
  # Max precision and max recall are taken over references separately: ref 1 gives R = 1,
  # ref 2 gives P = 1 -> F = 1.
  assert M.rouge_l(['a b c d'], [['a b', 'a b c d e f g h']], tokenizer=None) == pytest.approx(100)


@needs_java
@pytest.mark.parametrize('backend', ['java', 'python'])
def test_caption_metrics_match_pycocoevalcap(backend):
  preds = CAPTIONS
  gts = _coco_tokenize_dict({i: r for i, r in enumerate(CAPTION_REFS)})
  res = _coco_tokenize_dict({i: [p] for i, p in enumerate(preds)})
  ref = _coco_scores(gts, res)
  # Sanity: the references are not degenerate.
  assert 20 < 100 * ref['cider'][0] < 200 and 0 < ref['bleu4'][0] < 1
  got = M.caption_metrics(preds, CAPTION_REFS, tokenizer=backend, meteor=False)
  assert 'meteor' not in got
  for k in range(4):
    assert got[f'bleu{k + 1}'] == pytest.approx(100 * ref['bleus'][k], rel=1e-6)
  for name, fn in (('cider', M.cider), ('bleu4', M.bleu4), ('rouge_l', M.rouge_l)):
    mean, per = fn(preds, CAPTION_REFS, tokenizer=backend, return_per_example=True)
    assert got[name] == pytest.approx(mean, rel=1e-12)
    assert mean == pytest.approx(100 * ref[name][0], rel=1e-6), name
    np.testing.assert_allclose(per, 100 * np.asarray(ref[name][1]), rtol=1e-6, atol=1e-9)


@needs_java
def test_caption_metrics_random_corpus_matches_pycocoevalcap():
  rng = random.Random(1)
  pool = _random_captions(400, 2)
  preds = [rng.choice(pool) for _ in range(150)]
  refs = [[rng.choice(pool) for _ in range(rng.randint(1, 5))] for _ in range(150)]
  ref = _coco_scores(_coco_tokenize_dict(dict(enumerate(refs))),
                     _coco_tokenize_dict({i: [p] for i, p in enumerate(preds)}))
  got = M.caption_metrics(preds, refs, tokenizer='python', meteor=False)
  for name in ('cider', 'bleu4', 'rouge_l'):
    assert got[name] == pytest.approx(100 * ref[name][0], rel=1e-6), name


def test_caption_metrics_validation():
  with pytest.raises(ValueError, match='2 predictions but 1'):
    M.cider(['a', 'b'], [['a']], tokenizer=None)
  with pytest.raises(ValueError, match=r'references\[0\]'):
    M.cider(['a'], [[]], tokenizer=None)
  with pytest.raises(TypeError, match='reference 1 is bytes'):
    M.rouge_l(['a'], [['a', b'b']], tokenizer=None)


@needs_java
def test_meteor_matches_pycocoevalcap():
  from pycocoevalcap.meteor.meteor import Meteor
  gts = _coco_tokenize_dict({i: r for i, r in enumerate(CAPTION_REFS)})
  res = _coco_tokenize_dict({i: [p] for i, p in enumerate(CAPTIONS)})
  ref, ref_per = Meteor().compute_score(gts, res)
  assert 0.05 < ref < 0.5 and min(ref_per) == 0.0 < max(ref_per)  # '' scores 0; others do not.
  got = M.caption_metrics(CAPTIONS, CAPTION_REFS, tokenizer='java')  # meteor=None: Java is here.
  assert got['meteor'] == pytest.approx(100 * ref, rel=1e-12)
  # The other metrics do not depend on METEOR being computed.
  no_meteor = M.caption_metrics(CAPTIONS, CAPTION_REFS, tokenizer='java', meteor=False)
  assert no_meteor == {k: v for k, v in got.items() if k != 'meteor'}


def test_caption_metrics_without_java_use_python_tokenizer_and_skip_meteor(monkeypatch):
  preds, refs = CAPTIONS[:8], CAPTION_REFS[:8]
  expected = M.caption_metrics(preds, refs, tokenizer='python', meteor=False)
  assert 10 < expected['cider'] < 300 and 0 < expected['bleu4'] < 100
  monkeypatch.setattr(P.shutil, 'which', lambda name: None)  # A machine without Java.
  assert M.caption_metrics(preds, refs) == expected  # no 'meteor' key, python tokenizer
  assert M.cider(preds, refs) == expected['cider']
  with pytest.raises(RuntimeError, match='METEOR needs `java`'):
    M.caption_metrics(preds, refs, meteor=True)


# ------------------------------------------------------------------------- VQA

@pytest.mark.parametrize('raw, expected', [
    ('Yes!', 'yes'),                        # '!' not touching a space -> ' ', then split/join.
    ('t-shirt', 't shirt'),                 # '-' inside a word -> space.
    ('t-shirt, red -', 'tshirt red'),       # ' -' present -> every '-' deleted; ', ' deletes ','.
    ('red-white 1,5', 'redwhite 15'),       # digit,digit anywhere -> every mark deleted.
    ('1,000', '1000'),
    ('3.5', '3.5'),                         # '.' before a digit stays ...
    ('dr. who.', 'dr who'),                 # ... any other '.' goes.
    ('.5 inches', '.5 inches'),
    ('Two', '2'), ('none', '0'), ('ten', '10'), ('eleven', 'eleven'),   # number words
    ('a dog', 'dog'), ('an apple', 'apple'), ('The cat', 'cat'),          # articles
    ('dont', "don't"), ('isnt', "isn't"), ('youre', "you're"), ('yall', "y'all"),
    ("youd've", "you'd've"), ("you'dve", "you'd've"), ('twas', "'twas"), ('oclock', "o'clock"),
    ('im', 'im'),                           # upstream's key is 'Im': dead after lowercasing.
    ('lets', 'lets'), ("somebody'd", 'somebodyd'),  # upstream table irregularities
    (' yes\n', 'yes'), ('YES\tsir', 'yes sir'),
    ('a/b (c) [d] {e} "f" =g+ h\\i_j >k< @l `m ?n ;o', 'b c d e f g h i j k l m n o'),
])
def test_vqa_normalization_rules(raw, expected):
  assert M.vqa_normalize_answer(raw) == expected


def test_vqa_period_strip_is_capped_at_32():
  # Upstream passes re.UNICODE (= 32) as re.sub's `count`: at most 32 periods are removed.
  assert M.vqa_process_punctuation('.' * 40) == '.' * 8


def _vqa_official(pred, answers, rule):
  """One question scored by the steps of vqaEval.py's evaluate(), written out as upstream does
  them: answer dicts with distinct ids (leave-one-out removes exactly one), in-place processing.
  The two processing helpers are checked rule by rule in test_vqa_normalization_rules."""
  def clean(x):
    return x.replace('\n', ' ').replace('\t', ' ').strip()
  gts = [{'answer': a, 'answer_id': i} for i, a in enumerate(answers)]
  res = clean(pred)
  if rule == '2016':
    res = M.vqa_process_digit_article(M.vqa_process_punctuation(res))
  else:
    for d in gts:
      d['answer'] = clean(d['answer'])
  if len(set(d['answer'] for d in gts)) > 1:
    for d in gts:
      d['answer'] = M.vqa_process_punctuation(d['answer'])
      if rule != '2016':
        d['answer'] = M.vqa_process_digit_article(d['answer'])
    if rule != '2016':
      res = M.vqa_process_digit_article(M.vqa_process_punctuation(res))
  accs = []
  for d in gts:
    others = [o for o in gts if o != d]
    accs.append(min(1, float(len([o for o in others if o['answer'] == res])) / 3))
  return float(sum(accs)) / len(accs)


# Answers with articles, number words, digits with commas, punctuation, contractions, capitals,
# trailing periods and stray whitespace.
_VQA_POOL = ['yes', 'no', '2', 'two', 'Two', 'the dog', 'a dog', 'dog', 'Dog.', 'dog.', 'yes.',
             'Yes', 'YES', 'dont', "don't", 'do not', '1,000', '1000', 't-shirt', 't shirt',
             'tshirt', 'red, white', 'red white', ' yes', 'yes ', 'yes\n', 'no\t', 'an apple',
             'apple', 'none', '0', '3.5', '3.5.', 'dr. who', 'dr who', "it's", 'its', 'a/b', 'ten',
             '10', 'The Cat!', 'cat', 'mr. t']


def _vqa_corpus():
  """600 questions, 30% with unanimous answers; predictions drawn from the pool and the answers."""
  rng = random.Random(0)
  preds, lists = [], []
  for _ in range(600):
    if rng.random() < 0.3:
      lists.append([rng.choice(_VQA_POOL)] * 10)
    else:
      pool = rng.sample(_VQA_POOL, rng.randint(1, 4))
      lists.append([rng.choice(pool) for _ in range(10)])
    preds.append(rng.choice(_VQA_POOL + lists[-1]))
  return preds, lists


def test_vqa_accuracy_current_rules_by_hand():
  # 3 of 10 humans said "2": those 3 see 2 others agreeing (2/3), the other 7 see 3 (1).
  answers = ['2'] * 3 + ['3'] * 7
  assert M.vqa_accuracy(['two'], [answers]) == pytest.approx(100 * (3 * 2 / 3 + 7) / 10)
  # Unanimous answers (after stripping): neither side is processed, so case and periods count.
  assert M.vqa_accuracy(['yes.'], [['yes.'] * 10]) == pytest.approx(100.0)
  assert M.vqa_accuracy(['Yes'], [['yes'] * 10]) == 0.0
  assert M.vqa_accuracy(['yes'], [['Yes.'] * 10]) == 0.0
  assert M.vqa_accuracy(['2'], [['two'] * 10]) == 0.0
  assert M.vqa_accuracy([' yes\n'], [['yes '] * 5 + ['\tyes'] * 5]) == pytest.approx(100.0)
  # Not unanimous: both sides get punctuation and digit/article processing.
  assert M.vqa_accuracy(['yes.'], [['yes.'] * 9 + ['no']]) == pytest.approx(100.0)
  assert M.vqa_accuracy(['the dog'], [['the dog'] * 9 + ['cat']]) == pytest.approx(100.0)
  assert M.vqa_accuracy(['dog'], [['The Dog.'] * 9 + ['cat']]) == pytest.approx(100.0)
  assert M.vqa_accuracy(['2'], [['Two'] * 4 + ['three'] * 6]) == pytest.approx(100.0)
  assert M.vqa_accuracy(['dont'], [["don't"] * 2 + ['no'] * 8]) == pytest.approx(
      100 * (2 * 1 / 3 + 8 * 2 / 3) / 10)
  assert M.vqa_accuracy(['1000'], [['1,000'] * 3 + ['10'] * 7]) == pytest.approx(
      100 * (3 * 2 / 3 + 7) / 10)
  mean, per = M.vqa_accuracy(['no', '3'], [['no'] * 10, answers], return_per_example=True)
  np.testing.assert_allclose(per, [100.0, 100.0])
  with pytest.raises(ValueError, match=r'answer_lists\[0\]'):
    M.vqa_accuracy(['x'], [[]])
  with pytest.raises(TypeError, match='question 0'):
    M.vqa_accuracy(['x'], [[b'x']])
  with pytest.raises(ValueError, match="rule='2015'"):
    M.vqa_accuracy(['x'], [['x']], rule='2015')


def test_vqa_accuracy_2016_rule_by_hand():
  # The pre-2021 scorer: prediction always normalised, answers only punctuation-processed (and
  # only when not unanimous), never stripped.
  assert M.vqa_accuracy(['yes.'], [['yes.'] * 10], rule='2016') == 0.0
  assert M.vqa_accuracy(['Yes'], [['yes'] * 10], rule='2016') == pytest.approx(100.0)
  assert M.vqa_accuracy(['yes'], [['yes '] * 10], rule='2016') == 0.0
  assert M.vqa_accuracy(['the dog'], [['the dog'] * 9 + ['cat']], rule='2016') == 0.0
  assert M.vqa_accuracy(['the dog'], [['dog'] * 9 + ['cat']], rule='2016') == pytest.approx(100.0)
  assert M.vqa_accuracy(['2'], [['Two'] * 4 + ['three'] * 6], rule='2016') == 0.0


@pytest.mark.parametrize('rule, official_mean', [('current', 28.8), ('2016', 16.8)])
def test_vqa_accuracy_matches_official_scorer_on_varied_answers(rule, official_mean):
  preds, lists = _vqa_corpus()
  mean, per = M.vqa_accuracy(preds, lists, return_per_example=True, rule=rule)
  expected = [100 * _vqa_official(p, a, rule) for p, a in zip(preds, lists)]
  np.testing.assert_allclose(per, expected, rtol=1e-12)
  # Overall accuracy that GT-Vision-Lab's vqaEval.py itself printed for this corpus (its HEAD
  # and its 2016 version, run under Python 3 with the print statements converted).
  assert mean == pytest.approx(official_mean, abs=5e-3)
  assert len({round(x, 6) for x in per}) > 3


# ------------------------------------------------------------------------- ANLS

def test_anls_hand_values():
  cases = [
      ('hello', ['hello'], 1.0),
      ('helo', ['hello'], 1 - 1 / 5),              # lev 1, max len 5
      ('abc', ['abd'], 1 - 1 / 3),
      ('ab', ['ax'], 0.5),                         # NL = 0.5: kept (score < 0.5 is zeroed)
      ('abcde', ['axxxe'], 0.0),                   # NL = 0.6 -> 0
      ('  Hello   World ', ['hello world'], 1.0),  # strip, lowercase, collapse spaces
      (' helo ', ['hello'], 1 - 1 / 6),            # lengths are of the raw strings (upstream)
      ('hello', ['xyz', 'hello'], 1.0),            # best answer
      ('', [''], 1.0),                             # both empty: NL defined as 0
  ]
  for pred, answers, expected in cases:
    assert M.anls([pred], [answers]) == pytest.approx(100 * expected, rel=1e-12), pred
  preds, lists, exp = zip(*cases)
  assert M.anls(list(preds), list(lists)) == pytest.approx(100 * np.mean(exp), rel=1e-12)
  assert M.anls(['abc'], [['abd']], threshold=0.7) == 0.0
  assert M.levenshtein('kitten', 'sitting') == 3


# ------------------------------------------------------------------------- GLUE

def test_glue_metrics_match_sklearn_and_scipy():
  rng = np.random.default_rng(0)
  t = rng.integers(0, 2, 500)
  p = np.where(rng.random(500) < 0.8, t, 1 - t)
  p[rng.random(500) < 0.05] = -1  # invalid generations (string_label_to_class_id default)
  assert M.accuracy(t, p) == pytest.approx(100 * sklearn.metrics.accuracy_score(t, p), rel=1e-12)
  assert M.matthews_corrcoef(t, p) == pytest.approx(
      100 * sklearn.metrics.matthews_corrcoef(t, p), rel=1e-10)
  p_fixed = np.where((p != 0) & (p != 1), 1 - t, p)  # T5: invalid counts as the wrong class.
  assert M.f1_score_with_invalid(t, p) == pytest.approx(
      100 * sklearn.metrics.f1_score(t, p_fixed), rel=1e-12)
  assert M.f1_score_with_invalid([0, 0], [0, -1]) == 0.0  # no positives: sklearn's 0
  labels3 = rng.integers(0, 3, 200)
  preds3 = np.where(rng.random(200) < 0.6, labels3, rng.integers(-1, 3, 200))
  assert M.matthews_corrcoef(labels3, preds3) == pytest.approx(
      100 * sklearn.metrics.matthews_corrcoef(labels3, preds3), rel=1e-10)
  with pytest.warns(UserWarning, match='single label'):  # sklearn says why it is 0.
    assert M.matthews_corrcoef([1, 1], [1, 1]) == 0.0

  # STS-B: targets rounded to 0.2 (ties), generated strings through T5's string_to_float.
  y = np.round(rng.uniform(0, 5, 300) * 5) / 5
  strings = [f'{v:.1f}' for v in np.round(np.clip(y + rng.normal(0, 1, 300), 0, 5), 1)]
  strings[:7] = ['abc', '', 'five', '3.2.1', ' 2.4 ', 'nan?', '1e0']
  x = [M.string_to_float(s) for s in strings]
  assert x[:7] == [-1.0, -1.0, -1.0, -1.0, 2.4, -1.0, 1.0]
  assert M.pearson_corrcoef(y, x) == pytest.approx(100 * scipy.stats.pearsonr(y, x)[0], rel=1e-10)
  assert M.spearman_corrcoef(y, x) == pytest.approx(100 * scipy.stats.spearmanr(y, x)[0],
                                                    rel=1e-10)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    assert math.isnan(scipy.stats.pearsonr([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])[0])
  with pytest.warns(scipy.stats.ConstantInputWarning):  # NaN, but never silently.
    assert math.isnan(M.pearson_corrcoef([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
  assert M.string_label_to_class_id('entailment', ['entailment', 'neutral']) == 0
  assert M.string_label_to_class_id('maybe', ['entailment', 'neutral']) == -1
  with pytest.raises(ValueError, match='equal-length'):
    M.accuracy([1, 2], [1])


def test_glue_average_groups_tasks_like_t5():
  scores = {'cola': {'matthews_corrcoef': 50.0}, 'sst2': {'accuracy': 90.0},
            'glue_mrpc_v002': {'f1': 88.0, 'accuracy': 84.0},
            'stsb': {'pearson_corrcoef': 80.0, 'spearman_corrcoef': 82.0},
            'qqp': {'f1': 70.0, 'accuracy': 76.0}, 'glue_mnli_matched_v002': {'accuracy': 80.0},
            'mnli_mismatched': 82.0, 'qnli': 90.0, 'rte': {'accuracy': 70.0}}
  # Per task: 50, 90, 86, 81, 73, MNLI (80+82)/2 = 81, 90, 70 -> 8 tasks.
  assert M.glue_average(scores) == pytest.approx((50 + 90 + 86 + 81 + 73 + 81 + 90 + 70) / 8)
  assert M.glue_average({**scores, 'wnli': 60.0}) == pytest.approx(
      (50 + 90 + 86 + 81 + 73 + 81 + 90 + 70 + 60) / 9)
  with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
    M.glue_average({'squad': 1.0})


def test_seqio_wrappers_have_seqio_signature():
  assert M.seqio_accuracy([1, 0, 1], [1, 1, 1]) == {'accuracy': pytest.approx(200 / 3)}
  caps = M.seqio_caption_metrics([['a b'], ['c d']], ['a b', 'c d'])
  meteor = {'meteor'} if P.java_available() else set()  # METEOR where Java exists.
  assert set(caps) == {'cider', 'rouge_l', 'bleu1', 'bleu2', 'bleu3', 'bleu4'} | meteor
  assert caps['cider'] == pytest.approx(500)
  assert M.seqio_vqa_accuracy([['two'] * 10], ['2']) == {'vqa_accuracy': 0.0}  # unanimous: raw
  assert M.seqio_vqa_accuracy([['two'] * 9 + ['2']], ['2']) == {'vqa_accuracy': 100.0}
  assert M.seqio_anls([['hello']], ['helo']) == {'anls': pytest.approx(80.0)}
  out = {}
  for fn in M.GLUE_METRIC_FNS['stsb']:
    out.update(fn([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]))
  assert out == {'pearson_corrcoef': pytest.approx(50.0), 'spearman_corrcoef': pytest.approx(50.0)}
