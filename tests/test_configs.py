"""Every experiment config builds, names registered tasks, sweeps over real fields; PaLI-X dry run."""
import importlib.util
import pathlib

import pytest
import seqio

from adalink_jax import dry_run

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'configs').glob('*.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_sweeps(path):
  import tasks  # pylint: disable=g-import-not-at-top
  from adalink_jax import data  # pylint: disable=g-import-not-at-top
  tasks.register_all(data.DataConfig())  # the default data config: names are all it needs
  module = _load(path)
  c = module.get_config()
  from adalink_jax import families  # pylint: disable=g-import-not-at-top
  from adalink_jax.peft import registry  # pylint: disable=g-import-not-at-top
  assert c.model.family in families.FAMILIES and c.peft.method in registry.names()
  assert {k for k, v in c.init.items() if v and k != 'native' and not k.endswith('_format')} <= \
      set(families.get(c.model.family).init_towers)
  if c.data.kind == 'seqio':
    seqio.get_mixture_or_task(c.data.task)  # raises if not registered
    if c.data.eval_task:
      seqio.get_mixture_or_task(c.data.eval_task)
  points = []
  module.sweep(lambda **kw: points.append(kw))
  assert points
  for over in points:
    for key in over:
      node = c
      for part in key.split('.'):
        node = node[part]  # a typo in a sweep key fails here


def test_config_arguments_and_typos():
  module = _load(next(p for p in CONFIGS if p.stem == 'coco_mmit'))
  c = module.get_config('method=lora,rank=8')
  assert (c.peft.method, c.peft.rank, c.peft.lora_alpha) == ('lora', 8, 16.0)
  with pytest.raises(ValueError, match='rnak'):
    module.get_config('rnak=8')
  mmit = _load(next(p for p in CONFIGS if p.stem == 'mmit_instruction_tune'))
  assert mmit.get_config().peft.method == 'ft'
  assert mmit.get_config('lr=3e-5').peft.method == 'ft'


def test_palix_dry_run_reports_the_paper_count():
  """AdaLink at rank 64 on text+image of the PaLI-X-shaped model: 1,048,576 trainable params."""
  c = _load(next(p for p in CONFIGS if p.stem == 'vqav2_mmit')).get_config('model=palix')
  out = dry_run.report(c)
  trainable = next(l for l in out.splitlines() if l.startswith('trainable total'))
  assert trainable.split()[-1] == '1,048,576'
  frozen = int(next(l for l in out.splitlines() if l.startswith('frozen total')).split()[-1]
               .replace(',', ''))
  assert 50e9 < frozen < 60e9
  # Every frozen weight matrix is sharded over fsdp; the adapters are replicated.
  plan = [l for l in out.split('sharding plan')[1].splitlines()
          if l.startswith(('img/', 't5/', 'img_proj/', 'encoder_input_adapter/'))]
  kernels = [l for l in plan if not l.startswith('encoder_input_adapter/')
             and l.split()[0].rsplit('/', 1)[-1] in ('kernel', 'embedding')]
  assert len(kernels) > 10 and all("'fsdp'" in l for l in kernels), kernels
  adapters = [l for l in plan if l.startswith('encoder_input_adapter/')]
  assert len(adapters) == 4 and all(l.rstrip().endswith('()') for l in adapters)
  assert 'optimizer_state' in out
