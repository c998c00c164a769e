"""bench.profile_step: per-op times from a real jax.profiler trace, matched to the compiled HLO's
dots (FLOPs counted from their shapes), at tiny size."""
import json
import math

import jax
import jax.numpy as jnp

from bench import profile_step


def test_dot_flops_are_read_from_the_optimised_hlo():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  hlo = jax.jit(lambda x, y: jnp.tanh(x @ y) @ y.T).lower(a, b).compile().as_text()
  dots = profile_step.fusion_dots(hlo)
  flops = sorted(f for f, _ in dots.values() if f)
  assert flops == [2 * 64 * 16 * 32, 2 * 64 * 32 * 16]
  assert all(name in profile_step.instructions(hlo) for name in dots)
  assert any('k=32' in d for _, d in dots.values()) and any('k=16' in d for _, d in dots.values())


def test_tiny_step_profile_accounts_for_the_ops(tmp_path):
  res = profile_step.main([f'--out={tmp_path}', '--size=tiny', '--steps=2'])
  groups = res['groups']
  assert groups and math.isclose(sum(g['share'] for g in groups), 1.0, rel_tol=1e-9)
  assert res['op_s_per_step'] > 0 and res['step_s'] > 0
  # Every FLOP-carrying group is a dot; the dots carry most of the step's compiled FLOPs.
  assert all(g['op'].startswith('dot [') for g in groups if g['gflop'])
  assert 0.5 * res['compiled_gflop'] < res['dot_gflop'] <= 1.01 * res['compiled_gflop']
  on_disk = json.loads((tmp_path / 'profile.json').read_text())
  assert on_disk['groups'][0]['op'] == groups[0]['op'] and on_disk['peak']['flops_per_s'] > 0
  assert (tmp_path / 'profile.md').read_text().startswith('# Step profile: t5_tiny adalink')
