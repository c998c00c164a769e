"""Data configuration is passed, not global.

Importing the library reads no ``ADALINK_*`` variable and registers no task; the library's
modules (and the task package) import each other without a cycle; tasks are built from the
DataConfig handed to ``tasks.register_all`` (re-registering under another config is explicit
and leaves tasks already fetched as they were); the CLIs' explicit ``ADALINK_*`` filling
(:mod:`adalink_jax.config_env`) fills only empty fields.
"""
import ast
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from adalink_jax import config_env
from adalink_jax import config_lib
from adalink_jax import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ('adalink_jax', 'tasks')


def _modules() -> dict[str, pathlib.Path]:
  """Dotted name -> file of every module of the library and the task package."""
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob('*.py')):
      parts = list(path.relative_to(ROOT).with_suffix('').parts)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      out['.'.join(parts)] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the modules of ours it imports, anywhere in its file (function-level too).

  ``from pkg import sub`` counts as an edge to ``pkg.sub`` when that is a module (not to the
  package ``pkg``, whose ``__init__`` importing ``sub`` is the normal package layout)."""
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in mods
                   else node.module for a in node.names]
      else:
        continue
      deps |= {t for t in targets if t in mods and t != name}
    graph[name] = deps
  return graph


def find_cycle(graph: dict[str, set[str]]):
  """One import cycle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
  state, stack = {}, []

  def visit(u):
    state[u] = 'open'
    stack.append(u)
    for v in sorted(graph.get(u, ())):
      if state.get(v) == 'open':
        return stack[stack.index(v):] + [v]
      if v not in state:
        found = visit(v)
        if found:
          return found
    stack.pop()
    state[u] = 'done'
    return None

  for u in sorted(graph):
    if u not in state:
      found = visit(u)
      if found:
        return found
  return None


def test_no_import_cycle_among_library_modules():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None
  graph = import_graph()
  # The graph sees the real edges, including function-level imports.
  assert {'adalink_jax.multihost', 'adalink_jax.data', 'tasks'} <= graph[
      'adalink_jax.seqio_source']
  assert 'adalink_jax.seqio_source' in graph['adalink_jax.input_pipeline']
  assert 'adalink_jax.input_pipeline' not in graph['adalink_jax.seqio_source']
  assert 'tasks' in graph['adalink_jax.config_lib']
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


# Run in a fresh interpreter: records every ADALINK_* lookup in os.environ whose caller is a
# file of ours, while importing every module of the library (the flag-defining CLIs too).
_PROBE = r'''
import importlib, os, sys
from absl import flags
ours = tuple(os.path.join(sys.argv[1], p) + os.sep for p in ('adalink_jax', 'tasks'))
reads = []
cls = type(os.environ)
original = cls.__getitem__

def getitem(self, key):
  frame = sys._getframe(1)
  while frame and (frame.f_code.co_filename.startswith('<frozen ')  # os, _collections_abc
                   or frame.f_code.co_filename.endswith(('os.py', '_collections_abc.py'))):
    frame = frame.f_back
  where = frame.f_code.co_filename if frame else ''
  if str(key).startswith('ADALINK_') and where.startswith(ours):
    reads.append(f'{key} in {where}:{frame.f_lineno}')
  return original(self, key)

cls.__getitem__ = getitem  # os.environ.get / in / getenv all come here
imported, missing = [], []
for name in sys.argv[2:]:
  before = set(flags.FLAGS)
  try:
    importlib.import_module(name)
    imported.append(name)
  except ModuleNotFoundError as e:  # an optional third-party package of one module
    if e.name.split('.')[0] in ('adalink_jax', 'tasks'):
      raise
    missing.append(f'{name} ({e.name})')
  for flag in set(flags.FLAGS) - before:  # the CLIs each define --config
    delattr(flags.FLAGS, flag)
import seqio
ours_registered = [n for n in ('vqav2_raw', 'glue_cola_v002_raw', 'coco_captions_mmit')
                   if n in seqio.TaskRegistry.names()]
print('READS', reads)
print('IMPORTED', len(imported), sorted(imported))
print('MISSING', missing)
print('REGISTERED', ours_registered)
'''


def test_importing_the_library_reads_no_adalink_variable_and_registers_nothing():
  names = sorted(_modules())
  env = dict(os.environ, ADALINK_DATA_VQAV2='/env/vqa', ADALINK_VOCAB='/env/spm.model',
             ADALINK_IMAGE_SIZE='448', ADALINK_EXTRA_IDS='0', ADALINK_DEMO_DIR='/env/demo',
             ADALINK_TFDS_DATA_DIR='/env/tfds', ADALINK_PROMPT_STYLE='mmit')
  proc = subprocess.run([sys.executable, '-c', _PROBE, str(ROOT), *names], capture_output=True,
                        text=True, timeout=600, env=env, cwd=str(ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = {l.split(' ', 1)[0]: l.split(' ', 1)[1] for l in proc.stdout.splitlines()
           if l.split(' ', 1)[0] in ('READS', 'IMPORTED', 'MISSING', 'REGISTERED')}
  assert lines['READS'] == '[]', lines['READS']
  imported = lines['IMPORTED']
  for name in ('adalink_jax.data', 'adalink_jax.seqio_source', 'adalink_jax.input_pipeline',
               'adalink_jax.demo', 'adalink_jax.config_lib', 'adalink_jax.train',
               'adalink_jax.evaluate', "'tasks'", 'tasks.vqa'):
    assert name in imported, (name, imported, lines['MISSING'])
  assert lines['REGISTERED'] == '[]'  # importing tasks registers nothing


def test_tasks_are_built_from_the_config_handed_in(tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top
  a = data.DataConfig(image_size=32, truncate='end', data_dirs={'vqav2': str(tmp_path)})
  b = a.configure(vocab_path=str(tmp_path / 'other.model'), extra_ids=0, image_size=48,
                  truncate='error')
  try:
    tasks.register_all(a)
    task_a = seqio.get_mixture_or_task('vqav2_raw')
    tasks.register_all(b)  # explicit: nothing re-registers behind our back
    task_b = seqio.get_mixture_or_task('vqav2_raw')
  finally:
    tasks.register_all(data.DataConfig())
  assert task_a.output_features['inputs'].vocabulary is data.get_vocabulary(a)
  vocab_b = task_b.output_features['targets'].vocabulary
  assert (vocab_b.sentencepiece_model_file, vocab_b.extra_ids) == (str(tmp_path / 'other.model'), 0)

  def settings(task):
    kw = {}
    for p in task.preprocessors:
      if isinstance(p, functools.partial):
        kw.update({k: v for k, v in p.keywords.items() if k in ('size', 'mode')})
    return kw
  assert settings(task_a) == {'size': 32, 'mode': 'end'}
  assert settings(task_b) == {'size': 48, 'mode': 'error'}
  # The task fetched before re-registering keeps its config (data folder included).
  with pytest.raises(data.DataNotFoundError, match=str(tmp_path)):
    task_a.source.records('train')


def test_register_all_refuses_unknown_data_dir_keys():
  import tasks  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"unknown data dir key\(s\) \['vqa2'\]; known keys: "):
    tasks.register_all(data.DataConfig(data_dirs={'vqa2': '/x'}))
  # Every key a task module declares is a config field, and nothing else is.
  c = config_lib.multimodal('vqav2', 'raw', 'vqa_accuracy', 'model=tiny')
  assert set(c.data.data_dirs) == set(tasks.DATA_DIR_KEYS)
  assert set(tasks.DATA_DIR_KEYS) == set().union(*(m.DATA_DIRS for m in tasks.TASK_MODULES))
  assert {'coco', 'vqav2', 'textcaps', 'docvqa_images'} <= set(tasks.DATA_DIR_KEYS)
  assert 'https://visualqa.org' in tasks.DOWNLOAD_HINTS['vqav2']


def _demo_config():
  spec = importlib.util.spec_from_file_location('demo_cfg', ROOT / 'configs' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_cli_fills_only_empty_data_fields_from_adalink_variables():
  c = config_lib.multimodal('vqav2', 'raw', 'vqa_accuracy', 'model=tiny')
  c.data.data_dirs.coco = '/mine/coco'
  env = {'ADALINK_DATA_VQAV2': '/env/vqa', 'ADALINK_DATA_COCO': '/env/coco',
         'ADALINK_VOCAB': '/env/spm.model', 'ADALINK_EXTRA_IDS': '0',
         'ADALINK_TFDS_DATA_DIR': '/env/tfds', 'ADALINK_IMAGE_SIZE': '448'}
  config_env.fill_config(c, env)
  assert (c.data.data_dirs.vqav2, c.data.data_dirs.coco) == ('/env/vqa', '/mine/coco')
  assert (c.data.vocab, c.data.tfds_data_dir, c.data.extra_ids) == (
      '/env/spm.model', '/env/tfds', 0)
  assert c.data.image_size == 224  # the config's own field
  cfg = data.DataConfig.from_config(c.data)
  assert (cfg.data_dirs['vqav2'], cfg.vocab_path, cfg.extra_ids, cfg.tfds_data_dir) == (
      '/env/vqa', '/env/spm.model', 0, '/env/tfds')
  with pytest.raises(ValueError, match='ADALINK_DATA_VQA2 names no field of '
                                       r'config.data.data_dirs; known keys: \['):
    config_env.fill_config(c, {'ADALINK_DATA_VQA2': '/x'})
  with pytest.raises(ValueError, match="ADALINK_EXTRA_IDS='many' is not an integer"):
    config_env.fill_config(c, {'ADALINK_EXTRA_IDS': 'many'})
  demo = _demo_config()
  config_env.fill_config(demo, {'ADALINK_DEMO_DIR': '/env/demo', 'ADALINK_DATA_VQAV2': '/x',
                                'ADALINK_EXTRA_IDS': '0'})
  assert demo.data.assets_dir == '/env/demo' and 'extra_ids' not in demo.data
  demo.data.assets_dir = '/mine/demo'
  config_env.fill_config(demo, {'ADALINK_DEMO_DIR': '/env/demo'})
  assert demo.data.assets_dir == '/mine/demo'
