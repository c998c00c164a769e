"""Per-task adapter banks: task ids are range-checked everywhere, never filled or wrapped.

Model level (AdaLink and prompt banks, eager and under jit, in a train step and in decoding),
the host-side mapping of global task ids to bank indices, fold / select by bank index, the
export CLI's ``--task=NAME``, and training / eval data whose tasks are not in the bank.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from adalink_jax import decoding
from adalink_jax import input_pipeline
from adalink_jax import peft
from adalink_jax import trainer
from adalink_jax.models import t5
from adalink_jax.peft import task_bank
from tasks import common
from tests.test_cli_tools import run  # noqa: F401  (trained demo run, num_tasks=1)
from tests.test_train import DEMO_CONFIG, ROOT, assets, tiny_config  # noqa: F401
from tests.test_train_tasks import _seqio_config, files  # noqa: F401

CFG = t5.t5_config('t5_1_1_tiny')
BAD_IDS = [[0, 2], [1, 5], [-1, 0], [0, -2]]  # past the end, and negative (jnp.take wraps those)
OUT_OF_RANGE = 'task_id out of range for a bank of num_tasks=2'


def _inputs(task_id, b=2, l=3, d=8):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, l, d)), jnp.float32)
  return t5.EncoderInputs(x, jnp.ones((b, l), bool), jnp.zeros((b, l), jnp.int32),
                          None if task_id is None else jnp.asarray(task_id, jnp.int32))


def _randomize(tree, seed=3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), tree)


def _module_and_params(kind):
  mod = (peft.AdaLink(('text',), (2,), num_tasks=2) if kind == 'adalink'
         else peft.PromptTuning(length=3, num_tasks=2))
  params = _randomize(nn.unbox(mod.init(jax.random.key(0), _inputs([0, 1]))['params']))
  return mod, params


# ------------------------------------------------------------------ model level


@pytest.mark.parametrize('kind', ['adalink', 'prompt'])
@pytest.mark.parametrize('ids', BAD_IDS, ids=['past_end', 'far', 'neg1', 'neg2'])
def test_bank_modules_reject_out_of_range_ids_eager_and_jit(kind, ids):
  mod, params = _module_and_params(kind)
  apply = lambda p, t: mod.apply({'params': p}, _inputs(t)).embeddings
  bad = sorted(i for i in ids if not 0 <= i < 2)
  with pytest.raises(ValueError, match=rf'{OUT_OF_RANGE}: got task_id\(s\) \[{bad[0]}\]'):
    apply(params, ids)
  jitted = jax.jit(apply)
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=rf'{OUT_OF_RANGE}: got ids in \[{min(ids)}, {max(ids)}\]'):
    jax.block_until_ready(jitted(params, jnp.asarray(ids, jnp.int32)))
  # In-range ids under the same jit: each example gets its own task's adapter / prompt.
  got = np.asarray(jitted(params, jnp.asarray([1, 0], jnp.int32)))
  for row, task in enumerate([1, 0]):
    one = jax.tree.map(lambda p, t=task: p[t], params)
    single = (peft.AdaLink(('text',), (2,)) if kind == 'adalink' else peft.PromptTuning(length=3))
    want = single.apply({'params': one}, _inputs(None)).embeddings[row]
    np.testing.assert_allclose(got[row], np.asarray(want), atol=1e-6)


def test_bank_without_task_id_or_with_float_ids_is_an_error():
  mod, params = _module_and_params('adalink')
  with pytest.raises(ValueError, match='pass task_id'):
    mod.apply({'params': params}, _inputs(None))
  with pytest.raises(ValueError, match='task_id must be integers'):
    mod.apply({'params': params}, _inputs([0, 1])._replace(task_id=jnp.array([0., 1.])))


def _t5_bank(**over):
  built = peft.build(dict(method='adalink', rank=4, num_tasks=2, modalities=('text',), **over),
                     CFG)
  model = t5.T5(built.model_config, built.encoder_input_adapter, built.decoder_input_adapter)
  rng = np.random.default_rng(0)
  enc = jnp.asarray(rng.integers(2, CFG.vocab_size, (2, 6)), jnp.int32)
  dec = jnp.asarray(rng.integers(2, CFG.vocab_size, (2, 4)), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), enc, dec, task_id=jnp.array([0, 1]))['params'])
  trainable, frozen = peft.split(params, built.trainable)
  return model, _randomize(trainable), frozen, enc, dec


def test_train_step_under_jit_stops_on_out_of_range_ids():
  model, trainable, frozen, enc, dec = _t5_bank()
  tx = optax.sgd(0.1)
  step = jax.jit(peft.make_train_step(model, tx))
  batch = lambda ids: dict(encoder_input_tokens=enc, decoder_input_tokens=dec,
                           decoder_target_tokens=dec, task_id=jnp.asarray(ids, jnp.int32))
  for ids in ([0, 2], [-1, 1]):
    with pytest.raises(jax.errors.JaxRuntimeError, match=OUT_OF_RANGE):
      jax.block_until_ready(step(trainable, tx.init(trainable), frozen, batch(ids), None))
  new, _, metrics = step(trainable, tx.init(trainable), frozen, batch([1, 0]), None)
  assert np.isfinite(float(metrics['loss']))
  assert float(jnp.abs(new['encoder_input_adapter']['text']['up'] -
                       trainable['encoder_input_adapter']['text']['up']).max()) > 0


def test_decoding_under_jit_stops_on_out_of_range_ids():
  """Eval: the decoder-side bank inside the decode loop checks its ids too."""
  model, trainable, frozen, enc, _ = _t5_bank(decoder_inputs=True)
  params = peft.merge(trainable, frozen)
  good = jnp.array([1, 0], jnp.int32)
  encoded, mask = decoding.encode(model, params, enc, task_id=good)
  for ids in ([1, 2], [0, -1]):
    with pytest.raises(jax.errors.JaxRuntimeError, match=OUT_OF_RANGE):
      jax.block_until_ready(decoding.greedy_decode(model, params, encoded, mask, 4,
                                                   task_id=jnp.asarray(ids, jnp.int32)))
    with pytest.raises(jax.errors.JaxRuntimeError, match=OUT_OF_RANGE):
      jax.block_until_ready(decoding.encode(model, params, enc,
                                            task_id=jnp.asarray(ids, jnp.int32))[0])
  tokens = decoding.greedy_decode(model, params, encoded, mask, 4, task_id=good)
  assert tokens.shape == (2, 4)


# ------------------------------------------------------------------ fold / select


def test_fold_and_select_reject_out_of_range_tasks():
  d = CFG.d_model
  text = _randomize({'down': jnp.zeros((2, d, 3)), 'up': jnp.zeros((2, 3, d))})
  table = jnp.asarray(np.random.default_rng(0).normal(size=(10, d)), jnp.float32)
  for task in (2, 7, -1, -2):
    with pytest.raises(ValueError, match=rf'task {task} is outside the bank of num_tasks=2'):
      peft.select_task(text, task)
    with pytest.raises(ValueError, match=rf'task {task} is outside the bank of num_tasks=2'):
      peft.fold_text_embedding(table, text, task=task)
  with pytest.raises(ValueError, match='integer bank index'):
    peft.select_task(text, 'vqav2')
  with pytest.raises(ValueError, match='not a bank'):
    peft.fold_text_embedding(table, jax.tree.map(lambda p: p[0], text), task=0)
  np.testing.assert_array_equal(np.asarray(peft.select_task(text, np.int64(1))['up']),
                                np.asarray(text['up'][1]))


# ------------------------------------------------------------------ host-side mapping


def test_host_mapping_to_bank_indices_and_errors():
  bank = task_bank.make_bank(('okvqa', 'coco_captions_mmit'), common.TASK_IDS,
                             common.benchmark_of)
  assert bank.names == ('okvqa', 'coco_captions') and bank.global_ids == (3, 0)
  out = bank.map_batch_task_ids({'task_id': np.array([0, 3, 3, 0], np.int32), 'x': 1})
  np.testing.assert_array_equal(out['task_id'], [1, 0, 0, 1])
  assert out['task_id'].dtype == np.int32 and out['x'] == 1
  with pytest.raises(ValueError, match=r"train batch 4: task id\(s\) 2 \(vqav2\) are not in the "
                     r"adapter bank of num_tasks=2 \['okvqa' \(id 3\), 'coco_captions' \(id 0\)\]"):
    bank.map_batch_task_ids({'task_id': np.array([0, 2, 3])}, 'train batch 4')
  with pytest.raises(ValueError, match=r'-1 \(unknown task\), 99 \(unknown task\)'):
    bank.map_batch_task_ids({'task_id': np.array([-1, 99])})
  with pytest.raises(ValueError, match='has no task_id'):
    bank.map_batch_task_ids({'encoder_input_tokens': np.zeros((2, 3))})
  assert bank.index('okvqa_raw') == 0 and bank.index('coco_captions') == 1
  with pytest.raises(ValueError, match=r"'vqav2' is not in this adapter bank; it holds "):
    bank.index('vqav2')


def test_bank_resolution_from_mixture_and_config_errors():
  glue = [f'glue_{n}_v002_raw' for n in ('rte', 'cola', 'mnli', 'mnli_matched', 'sst2')]
  bank = task_bank.resolve_bank((), 4, glue, common.TASK_IDS, common.benchmark_of)
  # Global-id order, whatever order the mixture lists its tasks in; matched/mismatched = mnli.
  assert bank.names == ('glue_cola', 'glue_sst2', 'glue_mnli', 'glue_rte')
  with pytest.raises(ValueError, match=r"peft.num_tasks=8 but the training data has 4 task\(s\)"):
    task_bank.resolve_bank((), 8, glue, common.TASK_IDS, common.benchmark_of)
  with pytest.raises(ValueError, match=r'lists 1 tasks \(\'vqav2\',\) but peft.num_tasks=2'):
    task_bank.resolve_bank(('vqav2',), 2, glue, common.TASK_IDS, common.benchmark_of)
  with pytest.raises(ValueError, match=r"unknown task\(s\) \['vqa3'\]"):
    task_bank.make_bank(('vqa3', 'okvqa'), common.TASK_IDS, common.benchmark_of)
  with pytest.raises(ValueError, match='twice'):
    task_bank.make_bank(('vqav2_raw', 'vqav2_mmit'), common.TASK_IDS, common.benchmark_of)
  with pytest.raises(ValueError, match=r"peft.bank_tasks=\('vqav2',\): lists 1 tasks but "
                     r'peft.num_tasks=2'):
    peft.parse(dict(method='adalink', num_tasks=2, bank_tasks=['vqav2']))
  assert peft.parse(dict(num_tasks=2, bank_tasks=['vqav2', 'okvqa'])).bank_tasks == (
      'vqav2', 'okvqa')


def test_demo_bank_size_must_match_its_tasks(assets):  # noqa: F811
  with pytest.raises(ValueError, match=r"peft.num_tasks=2 but the training data has 1 task\(s\) "
                     r"\['demo' \(id 0\)\]"):
    input_pipeline.make_source(tiny_config(assets, **{'peft.num_tasks': 2}))


# ------------------------------------------------------------------ train / eval data


def _bank_config(assets, files, task, num_tasks, bank_tasks=(), eval_task=''):  # noqa: F811
  c = _seqio_config(assets, files, task, 'pali', 'vqa_accuracy', steps=3,
                    **{'peft.method': 'adalink', 'eval.every': 0})
  c.peft.num_tasks = num_tasks
  c.peft.bank_tasks = tuple(bank_tasks)
  c.data.eval_task = eval_task
  return c


def test_training_data_outside_the_bank_stops_with_clear_error(assets, files, tmp_path):  # noqa: F811
  # The case: VQAv2 (global id 2) on a bank of 2 that does not hold it.
  c = _bank_config(assets, files, 'vqav2_raw', 2, ('coco_captions', 'okvqa'))
  with pytest.raises(ValueError, match=r"training data \(config.data.task='vqav2_raw'\) uses "
                     r"task\(s\) \['vqav2_raw'\] that are not in the adapter bank of num_tasks=2 "
                     r"\['coco_captions' \(id 0\), 'okvqa' \(id 3\)\]"):
    trainer.train(c, str(tmp_path / 'a'))
  assert not os.path.exists(tmp_path / 'a' / 'checkpoints')
  c = _bank_config(assets, files, 'vqa_raw', 5, eval_task='textcaps_raw')
  with pytest.raises(ValueError, match=r"eval data \(config.data.eval_task='textcaps_raw'\) uses "
                     r"task\(s\) \['textcaps_raw'\]"):
    trainer.train(c, str(tmp_path / 'b'))


def test_every_train_batch_is_mapped_and_checked(assets, files):  # noqa: F811
  c = _bank_config(assets, files, 'vqa_raw', 5)
  banked = input_pipeline.make_source(c)
  assert banked.bank.names == ('vqav2', 'okvqa', 'textvqa', 'stvqa', 'docvqa')
  raw = next(banked.source.train_batches(0))['task_id']  # global ids (VQAv2 dominates: 2)
  assert set(raw.tolist()) <= {2, 3, 4, 5, 6} and 2 in raw
  np.testing.assert_array_equal(next(banked.train_batches(0))['task_id'], raw - 2)
  # A bank without VQAv2 stops at the first batch that carries it, naming id and task.
  narrow = input_pipeline.BankedSource(banked.source, task_bank.make_bank(
      ('okvqa', 'textvqa', 'stvqa', 'docvqa', 'coco_captions'), common.TASK_IDS))
  with pytest.raises(ValueError, match=r'train batch 3: task id\(s\) 2 \(vqav2\) are not in '
                     r"the adapter bank of num_tasks=5 \['okvqa' \(id 3\)"):
    next(narrow.train_batches(3))


# ------------------------------------------------------------------ export --task=NAME


def _export(config_file, workdir, out, *extra):
  return subprocess.run([sys.executable, '-m', 'adalink_jax.export', f'--config={config_file}',
                         f'--workdir={workdir}', f'--out={out}', *extra], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_export_task_name_on_single_adapter_run_is_an_error(assets, run, tmp_path):  # noqa: F811
  over = [f'--config.data.assets_dir={assets}', '--config.data.mode=pretrain',
          '--config.batch_size=8']
  r = _export(DEMO_CONFIG, run, tmp_path, '--fold', '--task=vqav2', *over)
  assert r.returncode != 0
  assert '--task=vqav2: this run has one adapter (peft.num_tasks=1), not a bank' in r.stderr
  assert not os.path.exists(tmp_path / 'adapter_card.json')


@pytest.fixture(scope='module')
def bank_run(assets, files, tmp_path_factory):  # noqa: F811
  """A 5-task AdaLink bank (derived from the VQA mixture) trained 3 steps; config as a file."""
  d = tmp_path_factory.mktemp('bank_run')
  c = _bank_config(assets, files, 'vqa_raw', 5)
  trainer.train(c, str(d / 'run'))
  cfg = d / 'bank_config.py'
  cfg.write_text('import ml_collections\n\ndef get_config():\n'
                 f'  return ml_collections.ConfigDict({c.to_dict()!r})\n')
  return {'workdir': d / 'run', 'config': cfg}


def test_export_folds_a_bank_task_by_name(bank_run, tmp_path):
  r = _export(bank_run['config'], bank_run['workdir'], tmp_path, '--fold', '--task=vqav2_raw')
  assert r.returncode == 0, r.stderr[-2000:]
  assert "for task 'vqav2'" in r.stdout
  card = json.load(open(tmp_path / 'adapter_card.json'))
  assert card['num_tasks'] == 5
  assert card['bank_tasks'] == ['vqav2', 'okvqa', 'textvqa', 'stvqa', 'docvqa']
  adapter = safetensors.numpy.load_file(tmp_path / 'adapter.safetensors')
  down, up = (adapter[f'encoder_input_adapter/text/{w}'] for w in ('down', 'up'))
  # VQAv2 is bank index 0 (its global id, 2, would be textvqa's adapter).
  assert down.shape[0] == 5 and np.abs(up[0]).max() > 0
  table = safetensors.numpy.load_file(tmp_path / 'folded_embedding.safetensors')
  table = table['token_embedder/embedding']
  _, frozen = trainer.Trainer(_load(bank_run['config']), str(tmp_path / 'w')).init_params()
  emb = np.asarray(frozen['t5']['token_embedder']['embedding'], np.float64)
  np.testing.assert_allclose(table, emb + emb @ down[0] @ up[0], atol=1e-5)
  assert np.abs(table - emb).max() > 1e-4


def _load(config_file):
  namespace = {}
  exec(open(config_file).read(), namespace)  # pylint: disable=exec-used
  return namespace['get_config']()


def test_export_unknown_task_name_lists_the_bank(bank_run, tmp_path):
  r = _export(bank_run['config'], bank_run['workdir'], tmp_path, '--fold',
              '--task=coco_captions')
  assert r.returncode != 0
  assert ("--task: task 'coco_captions' is not in this adapter bank; it holds ['vqav2' (id 2), "
          "'okvqa' (id 3), 'textvqa' (id 4), 'stvqa' (id 5), 'docvqa' (id 6)]") in r.stderr
  r = _export(bank_run['config'], bank_run['workdir'], tmp_path, '--fold')
  assert r.returncode != 0 and '--fold on a bank of 5 adapters needs --task=NAME' in r.stderr
  assert not os.path.exists(tmp_path / 'adapter_card.json')  # nothing half-written
