"""Shared helpers: child processes, timing, XLA cost/memory analysis, random weights, machine.

Every measured configuration runs in its own Python process (:func:`run_child`), so the RSS
high-water mark (``ru_maxrss``) belongs to that configuration alone and one config's compile
caches or leaked buffers cannot slow or bloat the next. Children print nothing we parse: they
write one JSON file (:func:`child_main`). A child gets the host-allocator setting our train and
evaluate commands use (``spec['host_allocator']``, default ``'auto'``:
:func:`adalink_jax.env.reuse_freed_host_memory`), so a benchmark times the step those commands
run; the peer benchmark's PyTorch children pass ``'system'``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Optional

GiB = float(2 ** 30)
_DEVICE_COUNT_FLAG = re.compile(r'--xla_force_host_platform_device_count=\d+')


# ------------------------------------------------------------------ processes


def child_env(num_devices: Optional[int] = None, cpu_only: bool = False) -> dict[str, str]:
  """The environment for a child: ours, with the fake-CPU-device count set (or removed).

  ``num_devices=None`` removes ``--xla_force_host_platform_device_count`` so timing runs see one
  CPU device that owns every core (the test suite's conftest sets 8 for the parent process).
  """
  env = dict(os.environ)
  flags = _DEVICE_COUNT_FLAG.sub('', env.get('XLA_FLAGS', '')).strip()
  if num_devices is not None:
    flags = f'{flags} --xla_force_host_platform_device_count={int(num_devices)}'.strip()
  if flags:
    env['XLA_FLAGS'] = flags
  else:
    env.pop('XLA_FLAGS', None)
  if cpu_only:
    env['JAX_PLATFORMS'] = 'cpu'
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  # The repo root on the path, so `python -m bench.x` works from anywhere.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([root] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


def run_child(module: str, spec: Mapping[str, Any], *, timeout_s: float,
              num_devices: Optional[int] = None, cpu_only: bool = False) -> dict:
  """Runs ``python -m <module> --spec=<json> --out=<json>`` and returns the child's result.

  Never raises for a failed or timed-out child: returns ``{'error': ..., 'spec': spec}`` so one
  broken configuration does not lose the rest of a run. ``wall_s`` is the child's whole life
  (interpreter start, imports, init, compile, timing).
  """
  with tempfile.TemporaryDirectory(prefix='adalink_bench_') as tmp:
    spec_path, out_path = os.path.join(tmp, 'spec.json'), os.path.join(tmp, 'out.json')
    with open(spec_path, 'w') as f:
      json.dump(dict(spec), f)
    cmd = [sys.executable, '-m', module, f'--spec={spec_path}', f'--out={out_path}']
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, env=child_env(num_devices, cpu_only), capture_output=True,
                            text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
      return dict(error=f'timed out after {timeout_s:.0f} s', spec=dict(spec),
                  wall_s=time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(out_path):
      tail = (proc.stderr or proc.stdout or '')[-3000:]
      return dict(error=f'{module} exited with {proc.returncode}: {tail}', spec=dict(spec),
                  wall_s=wall)
    with open(out_path) as f:
      result = json.load(f)
  result['wall_s'] = wall
  return result


def child_main(run: Callable[[dict], dict]) -> None:
  """Entry point of a child: ``--spec=<json file>`` in, ``--out=<json file>`` out."""
  parser = argparse.ArgumentParser()
  parser.add_argument('--spec', required=True)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  with open(args.spec) as f:
    spec = json.load(f)
  from adalink_jax import env  # pylint: disable=import-outside-toplevel
  reused = env.reuse_freed_host_memory(spec.get('host_allocator', 'auto'))
  result = run(spec)
  result.setdefault('host_memory_reused', reused)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1, default=_json_default)


def _json_default(x: Any) -> Any:
  if hasattr(x, 'item'):
    return x.item()
  return str(x)


# ------------------------------------------------------------------ measurements


def timed(fn: Callable[[], Any], reps: int) -> list[float]:
  """Wall seconds of ``reps`` calls of ``fn`` (which must block until its results are ready)."""
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def median(xs) -> float:
  return float(statistics.median(xs))


def flops_of(compiled: Any) -> Optional[float]:
  """FLOPs XLA counts for a compiled program (``cost_analysis()`` is a dict, or a list of one
  dict per program in older jax); None when the backend reports none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or cost.get('flops') is None:
    return None
  return float(cost['flops'])


def memory_of(compiled: Any) -> dict[str, int]:
  """Bytes from ``compiled.memory_analysis()`` (per device for SPMD programs).

  ``total = argument + output - alias + temp``: what must be live at once (donated inputs alias
  their outputs, so they count once). Generated code is reported but not added.
  """
  m = compiled.memory_analysis()
  if m is None:
    return {}
  get = lambda name: int(getattr(m, name, 0) or 0)
  out = dict(argument=get('argument_size_in_bytes'), output=get('output_size_in_bytes'),
             alias=get('alias_size_in_bytes'), temp=get('temp_size_in_bytes'),
             generated_code=get('generated_code_size_in_bytes'))
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def peak_rss_bytes() -> int:
  """High-water resident set size of this process, in bytes.

  Linux: ``VmHWM`` of /proc/self/status, which belongs to this address space. ``ru_maxrss``
  is not used there: after fork + exec it keeps the *parent's* high-water mark, so a child
  started from a large parent (e.g. a long pytest run) would report the parent's peak.
  """
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r if sys.platform == 'darwin' else r * 1024)


def device_memory_stats() -> Optional[dict]:
  """``device.memory_stats()`` of the first device (GPU/TPU); None on CPU, which has none."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  keep = ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit')
  return {k: int(stats[k]) for k in keep if k in stats}


def tree_bytes(tree: Any) -> int:
  """Sum of ``size * itemsize`` over the array (or ShapeDtypeStruct) leaves of a tree."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree) if hasattr(x, 'shape')))


def random_params(shapes: Any, seed: int = 0) -> Any:
  """Real arrays for a tree of ``ShapeDtypeStruct`` params, filled fast with numpy.

  Timing does not depend on the values, and ``jax.random`` init of a 250M-parameter model takes
  ~1 min on 2 CPU cores. Norm scales are 1, biases and the zero-initialised up-projections
  (AdaLink ``up``, LoRA ``lora_b``, bottleneck ``up_kernel``) are 0, token embeddings N(0, 1),
  everything else N(0, 0.02^2): finite and far from denormals. Leaves are put on the device one
  at a time so the host never holds a second full copy (it would show in the RSS high-water).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)

  def one(path, x):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    last = name.rsplit('/', 1)[-1]
    shape, dtype = tuple(x.shape), np.dtype(x.dtype)
    if not np.issubdtype(dtype, np.floating):
      return jax.device_put(np.zeros(shape, dtype))
    if last == 'scale':
      a = np.ones(shape, np.float32)
    elif 'bias' in last or last in ('up', 'lora_b', 'up_kernel'):
      a = np.zeros(shape, np.float32)
    else:
      std = 1.0 if 'token_embedder' in name else 0.02
      a = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return jax.device_put(a.astype(dtype))

  return jax.tree_util.tree_map_with_path(one, shapes)


# ------------------------------------------------------------------ machine


def load_average() -> list[float]:
  """1, 5 and 15 minute load averages (what ``uptime`` prints)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def uptime_line() -> str:
  try:
    return subprocess.run(['uptime'], capture_output=True, text=True, timeout=10).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    return ''


def machine_info() -> dict:
  """CPU model, core count, memory, python / jax versions (recorded with every run)."""
  info = dict(platform=platform.platform(), python=platform.python_version(),
              cpu_count=os.cpu_count())
  try:
    with open('/proc/cpuinfo') as f:
      names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
    info['cpu_model'] = names[0] if names else platform.processor()
  except OSError:
    info['cpu_model'] = platform.processor()
  try:
    import psutil  # pylint: disable=import-outside-toplevel
    info['memory_gib'] = round(psutil.virtual_memory().total / GiB, 1)
  except ImportError:
    pass
  try:
    import jax  # pylint: disable=import-outside-toplevel
    import jaxlib  # pylint: disable=import-outside-toplevel
    info['jax'] = jax.__version__
    info['jaxlib'] = jaxlib.__version__
  except ImportError:
    pass
  return info
