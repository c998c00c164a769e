"""Results -> targets, a markdown report and a PNG plot (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import Any, Optional

MiB, GiB = float(2 ** 20), float(2 ** 30)

# Targets (reported, never asserted): name -> (threshold, direction).
STEP_RATIO_MAX = 0.70     # AdaLink step time / full-FT step time
MEMORY_RATIO_MAX = 0.50   # AdaLink peak memory / full-FT (AdamW) peak memory
MFU_MIN = 0.50            # train-step FLOP/s / measured matmul FLOP/s at T5-base, seq 512
SCALE_GIB_MAX = 16.0      # per-device memory of each simulated AdaLink step (PaLI-X, ...)


def _ok(rows: list[dict]) -> list[dict]:
  return [r for r in rows if 'error' not in r]


def _find(rows: list[dict], model: str, method: str) -> Optional[dict]:
  for r in _ok(rows):
    if r['model'] == model and r['method'] == method:
      return r
  return None


def _target(name: str, value: Optional[float], limit: float, upper: bool, unit: str,
            detail: str = '') -> dict:
  """One target row; ``miss_by`` is how far past the limit (same unit), 0 when met."""
  if value is None:
    return dict(name=name, value=None, limit=limit, met=None, miss_by=None, detail=detail,
                text=f'{name}: not measured')
  met = value <= limit if upper else value >= limit
  miss = 0.0 if met else abs(value - limit)
  cmp = '<=' if upper else '>='
  fmt = (lambda x: f'{100 * x:.1f}%') if unit == '%' else (lambda x: f'{x:.3g}{unit}')
  verdict = 'met' if met else f'MISSED by {fmt(miss)}'
  return dict(name=name, value=value, limit=limit, met=met, miss_by=miss, detail=detail,
              text=f'{name}: {fmt(value)} (target {cmp} {fmt(limit)}) -- {verdict}')


def targets(results: dict) -> list[dict]:
  """The run's targets with values, whether met, and by how much they were missed."""
  out = []
  rows = results.get('train', [])
  peak = (results.get('peak') or {}).get('flops_per_s')
  models = list(dict.fromkeys(r['model'] for r in _ok(rows)))
  for model in models:
    ft, ada = _find(rows, model, 'ft'), _find(rows, model, 'adalink')
    if not (ft and ada):
      continue
    out.append(_target(f'{model}: AdaLink step / FT step', ada['step_s'] / ft['step_s'],
                       STEP_RATIO_MAX, True, 'x'))
    if ft['xla_memory'].get('total'):
      out.append(_target(f'{model}: AdaLink / FT memory (XLA plan: args+outputs+temps)',
                         ada['xla_memory']['total'] / ft['xla_memory']['total'],
                         MEMORY_RATIO_MAX, True, 'x'))
    # At tiny sizes the high-water mark may not rise above the runtime baseline at all.
    if ft['rss_above_baseline_bytes'] > 0:
      out.append(_target(f'{model}: AdaLink / FT peak RSS above the runtime baseline',
                         ada['rss_above_baseline_bytes'] / ft['rss_above_baseline_bytes'],
                         MEMORY_RATIO_MAX, True, 'x'))
  mfu_model = results.get('settings', {}).get('mfu_model')
  for method in ('adalink', 'ft'):
    r = _find(rows, mfu_model, method) if mfu_model else None
    if r is not None and peak and r.get('flops_per_s'):
      out.append(_target(f'{mfu_model} ({r["text_len"]} tokens) {method}: MFU vs matmul peak',
                         r['flops_per_s'] / peak, MFU_MIN, False, '%'))
  for s in _ok(results.get('scale', [])):
    if s.get('primary'):
      out.append(_target(f'scale sim {s["model"]} on {s["num_devices"]} devices: GiB per device',
                         s['xla_memory']['total'] / GiB, SCALE_GIB_MAX, True, ' GiB',
                         detail=s.get('note', '')))
  return out


# ------------------------------------------------------------------ markdown


def _n(x: Optional[float], digits: int = 3) -> str:
  return '-' if x is None else f'{x:.{digits}g}'


def _train_table(results: dict) -> list[str]:
  rows = results.get('train', [])
  peak = (results.get('peak') or {}).get('flops_per_s')
  head = ('| model | method | trainable params | step ms | step vs FT | compile s | tokens/s | '
          'GFLOP/step | FLOPs vs FT | GFLOP/s | MFU | XLA mem MiB | mem vs FT | peak RSS MiB | '
          'RSS - base MiB | vs FT | AdamW state MiB | checkpoint KiB |')
  out = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    if 'error' in r:
      s = r.get('spec', {})
      out.append(f'| {s.get("model", {}).get("name", "?")} | {s.get("method", "?")} | ERROR: '
                 f'{r["error"][:120]!s} |')
      continue
    ft = _find(rows, r['model'], 'ft')
    rel = lambda a, b: '-' if not (a and b) else f'{a / b:.2f}x'
    mem = r['xla_memory'].get('total')
    out.append('| ' + ' | '.join([
        r['model'], r['method'], f'{r["params_trainable"]:,}', f'{1e3 * r["step_s"]:.1f}',
        rel(r['step_s'], ft and ft['step_s']), f'{r["lower_s"] + r["compile_s"]:.1f}',
        f'{r["tokens_per_s"]:.0f}', _n(r['flops'] and r['flops'] / 1e9),
        rel(r['flops'], ft and ft['flops']), _n(r['flops_per_s'] and r['flops_per_s'] / 1e9),
        '-' if not (peak and r['flops_per_s']) else f'{100 * r["flops_per_s"] / peak:.0f}%',
        _n(mem and mem / MiB, 4), rel(mem, ft and ft['xla_memory'].get('total')),
        f'{r["rss_peak_bytes"] / MiB:.0f}', f'{r["rss_above_baseline_bytes"] / MiB:.0f}',
        rel(r['rss_above_baseline_bytes'], ft and ft['rss_above_baseline_bytes']),
        f'{r["opt_state_bytes"] / MiB:.2f}', f'{r["checkpoint_bytes"] / 1024:,.0f}']) + ' |')
  return out


def _decode_table(results: dict) -> list[str]:
  dec = results.get('decode') or {}
  if 'error' in dec:
    return [f'decoding: ERROR {dec["error"][:300]}']
  rows = dec.get('rows', [])
  if not rows:
    return []
  out = ['| search | batch | KV cache | tokens/s | ms per call | cache speed-up | compile s |',
         '|---|---|---|---|---|---|---|']
  for r in rows:
    other = [o for o in rows if o['search'] == r['search'] and o['batch'] == r['batch']
             and o['kv_cache'] != r['kv_cache']]
    speed = (f'{other[0]["time_s"] / r["time_s"]:.1f}x' if r['kv_cache'] and other else '')
    out.append(f'| {r["search"]} | {r["batch"]} | {"yes" if r["kv_cache"] else "no"} | '
               f'{r["tokens_per_s"]:.0f} | {1e3 * r["time_s"]:.1f} | {speed} | '
               f'{r["compile_s"]:.1f} |')
  out.append('')
  out.append(f'Model {dec.get("model")}, encoder length {rows[0]["text_len"]}, '
             f'{rows[0]["max_len"]} tokens decoded per sequence (EOS disabled). Greedy tokens '
             f'with and without the cache identical: {dec.get("cache_matches_nocache")}.')
  return out


def _layers(s: dict) -> str:
  """Stack depths of a scale row: ``ViT 48 / T5 32 + 32`` or ``ViT 27 / Gemma 42 (21 local)``."""
  if 'gemma_layers' in s:
    return (f'ViT {s["vit_depth"]} / Gemma {s["gemma_layers"]} '
            f'({s.get("gemma_local_layers", 0)} local)')
  return f'ViT {s["vit_depth"]} / T5 {s["t5_encoder_layers"]} + {s["t5_decoder_layers"]}'


def _scale_table(results: dict) -> list[str]:
  rows = results.get('scale', [])
  if not rows:
    return []
  out = ['| model | run | layers (ViT / LM: T5 enc + dec, or Gemma) | mesh | params | '
         'activation constraints | compile s | args GiB | temps GiB | total GiB/device |',
         '|---|---|---|---|---|---|---|---|---|---|']
  for s in rows:
    if 'error' in s:
      out.append(f'| {s.get("model", "?")} | {s.get("label", "?")} | ERROR: {s["error"][:160]} |')
      continue
    m = s['xla_memory']
    mesh = 'x'.join(f'{k}={v}' for k, v in s['mesh'].items())
    out.append(f'| {s["model"]} | {s.get("label", "")} | {_layers(s)} | {mesh} | '
               f'{s["params_total"] / 1e9:.2f}B | '
               f'{"yes" if s.get("activation_constraints") else "no"} | '
               f'{s.get("compile_s", 0):.0f} | {_n(m["argument"] / GiB)} | {_n(m["temp"] / GiB)} | '
               f'{_n(m["total"] / GiB)} |')
  for s in rows:
    if s.get('note'):
      out.append(f'\n{s.get("model")} {s.get("label")}: {s["note"]}')
  return out


def markdown(results: dict) -> str:
  """The whole report as markdown."""
  peak = results.get('peak') or {}
  mach = results.get('machine', {})
  lines = [f'# adalink_jax benchmarks ({results.get("size")})', '',
           f'Machine: {mach.get("cpu_model")}, {mach.get("cpu_count")} cores, '
           f'{mach.get("memory_gib")} GiB; jax {mach.get("jax")}, backend '
           f'{results.get("backend", "cpu")}.',
           f'Load average before: {results.get("load_before")}; after: '
           f'{results.get("load_after")} (uptime: `{results.get("uptime_before")}` / '
           f'`{results.get("uptime_after")}`).',
           f'Total wall time: {results.get("total_s", 0):.0f} s.', '']
  if peak.get('flops_per_s'):
    lines.append(f'Matmul peak ({peak.get("dtype")} {peak.get("n")}^3 jnp.dot, median): '
                 f'{peak["flops_per_s"] / 1e9:.1f} GFLOP/s (start '
                 f'{_n((peak.get("start") or {}).get("flops_per_s", 0) / 1e9)}, end '
                 f'{_n((peak.get("end") or {}).get("flops_per_s", 0) / 1e9)}; the larger is used).')
    lines.append('')
  tg = results.get('targets', [])
  if tg:
    lines += ['## Targets', ''] + [f'- {t["text"]}' for t in tg] + ['']
  if results.get('train'):
    st = results.get('settings', {})
    lines += ['## Train step (AdamW, fp32, one device)', '',
              f'Median of {st.get("steps")} steps after {st.get("warmup")} warm-up call(s). '
              'Shapes: ' + '; '.join(f'{k}: batch {v["batch"]}, text {v["text_len"]}, target '
                                    f'{v["target_len"]}' for k, v in st.get('models', {}).items())
              + '.', ''] + _train_table(results) + ['']
  if results.get('decode'):
    lines += ['## Decoding', ''] + _decode_table(results) + ['']
  if results.get('scale'):
    lines += ['## Scale by simulation (compiled, never run)', ''] + _scale_table(results) + ['']
  return '\n'.join(lines)


# ------------------------------------------------------------------ plot


def plot(results: dict, path: str) -> Optional[str]:
  """Step time and memory per method, one row of panels per model; returns the path."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = _ok(results.get('train', []))
  if not rows:
    return None
  models = list(dict.fromkeys(r['model'] for r in rows))
  fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.2 * len(models)), squeeze=False)
  for i, model in enumerate(models):
    rs = [r for r in rows if r['model'] == model]
    names = [r['method'] for r in rs]
    ax = axes[i][0]
    ax.bar(names, [1e3 * r['step_s'] for r in rs], color='tab:blue')
    ax.set_ylabel('step time (ms)')
    ax.set_title(f'{model}: median train step')
    ax = axes[i][1]
    x = range(len(rs))
    ax.bar([j - 0.2 for j in x], [r['xla_memory'].get('total', 0) / MiB for r in rs], 0.4,
           label='XLA plan (args+out+temp)', color='tab:orange')
    ax.bar([j + 0.2 for j in x], [r['rss_above_baseline_bytes'] / MiB for r in rs], 0.4,
           label='peak RSS above runtime baseline', color='tab:gray')
    ax.set_xticks(list(x))
    ax.set_xticklabels(names)
    ax.set_ylabel('MiB')
    ax.set_title(f'{model}: memory')
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def summary_lines(results: dict) -> list[str]:
  """Short console summary (targets)."""
  return [t['text'] for t in results.get('targets', [])]


def write_all(results: dict, out_dir: str) -> dict[str, Any]:
  """Writes ``results.md`` and ``train.png`` (JSON is written by the caller); returns paths."""
  md = os.path.join(out_dir, 'results.md')
  with open(md, 'w') as f:
    f.write(markdown(results))
  png = plot(results, os.path.join(out_dir, 'train.png'))
  return dict(markdown=md, plot=png)
