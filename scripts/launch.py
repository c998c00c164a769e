#!/usr/bin/env python3
"""Launch adalink_jax training on Cloud TPU VMs or GPU nodes (single node or SLURM multi-node).

Every subcommand builds the exact shell commands first; ``--dry_run`` prints them and exits,
otherwise they run one after another and the first failure stops the launch.

  # Cloud TPU VM (all workers run the same command; jax.distributed finds its peers)
  python scripts/launch.py tpu-create --name=adalink --zone=us-central2-b --accelerator=v4-32
  python scripts/launch.py tpu-setup  --name=adalink --zone=us-central2-b
  python scripts/launch.py tpu-run    --name=adalink --zone=us-central2-b \
      --config=configs/coco_mmit.py --workdir=gs://bucket/runs/coco -- --config.peft.rank=16
  python scripts/launch.py tpu-delete --name=adalink --zone=us-central2-b
  # GPU: one node, or N nodes under SLURM (one process per node, all local GPUs each)
  python scripts/launch.py gpu-run --config=configs/coco_mmit.py --workdir=/runs/coco --gpus=0,1
  python scripts/launch.py slurm --nodes=4 --gpus_per_node=8 --config=... --workdir=... --dry_run
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

TPU_INSTALL = 'cd adalink_jax && pip install -U "jax[tpu]>=0.10.2,<0.11" && pip install -e .'
GPU_INSTALL = 'pip install -U "jax[cuda12]>=0.10.2,<0.11" && pip install -e .'


def _train_cmd(args, extra: list[str], multihost: bool) -> str:
  cmd = ['python', '-m', 'adalink_jax.train', f'--config={args.config}', f'--workdir={args.workdir}']
  if multihost:
    cmd.append('--multihost')
  return shlex.join(cmd + extra)


def _gcloud_tpu(verb: str, args, *rest: str) -> str:
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, args.name, f'--zone={args.zone}']
  if args.project:
    cmd.append(f'--project={args.project}')
  return shlex.join(cmd + list(rest))


def tpu_commands(args, extra: list[str]) -> list[str]:
  """The gcloud commands for one TPU subcommand."""
  if args.cmd == 'tpu-create':
    rest = [f'--accelerator-type={args.accelerator}', f'--version={args.runtime}']
    if args.spot:
      rest.append('--spot')
    return [_gcloud_tpu('create', args, *rest)]
  if args.cmd == 'tpu-setup':
    # Ship this checkout (code and configs) to every worker, then install there.
    scp = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse', args.source,
           f'{args.name}:adalink_jax', f'--zone={args.zone}', '--worker=all']
    if args.project:
      scp.append(f'--project={args.project}')
    return [shlex.join(scp),
            _gcloud_tpu('ssh', args, '--worker=all', f'--command={TPU_INSTALL}')]
  if args.cmd == 'tpu-run':
    remote = f'cd adalink_jax && {_train_cmd(args, extra, multihost=True)}'
    return [_gcloud_tpu('ssh', args, '--worker=all', f'--command={remote}')]
  if args.cmd == 'tpu-delete':
    return [_gcloud_tpu('delete', args, '--quiet')]
  raise ValueError(args.cmd)


def gpu_commands(args, extra: list[str]) -> list[str]:
  """A single-node GPU run: the chosen GPUs are made visible, jax uses them all."""
  env = f'CUDA_VISIBLE_DEVICES={shlex.quote(args.gpus)} ' if args.gpus else ''
  return [env + _train_cmd(args, extra, multihost=False)]


# Values written into '#SBATCH' lines: sbatch reads them with its own parser (not a shell),
# so quoting cannot protect them; a newline would start a new line of the job script.
_SBATCH_SAFE = re.compile(r'[A-Za-z0-9_.,:/@%+=-]+')


def _sbatch_value(flag: str, value) -> str:
  value = str(value)
  if not _SBATCH_SAFE.fullmatch(value):
    raise SystemExit(f'error: --{flag}={value!r} goes into an #SBATCH line and may only contain '
                     'letters, digits and _.,:/@%+=- (no spaces, quotes, newlines or shell '
                     'characters); choose a plainer value')
  return value


def slurm_script(args, extra: list[str]) -> str:
  """An sbatch script: one task per node; jax.distributed reads SLURM's variables."""
  v = _sbatch_value
  lines = [
      '#!/bin/bash',
      f'#SBATCH --job-name={v("job_name", args.job_name)}',
      f'#SBATCH --nodes={v("nodes", args.nodes)}',
      '#SBATCH --ntasks-per-node=1',
      f'#SBATCH --gpus-per-node={v("gpus_per_node", args.gpus_per_node)}',
      f'#SBATCH --time={v("time", args.time)}',
      f'#SBATCH --output={v("workdir", args.workdir)}/slurm-%j.out',
  ]
  if args.partition:
    lines.append(f'#SBATCH --partition={v("partition", args.partition)}')
  lines += ['set -euo pipefail', f'srun {_train_cmd(args, extra, multihost=True)}', '']
  return '\n'.join(lines)


def _run(command: str) -> int:
  """Runs one printed command without a shell: ``VAR=value`` prefixes become the environment.

  The commands are built with shlex quoting, so splitting them back gives exactly the argv
  that was printed; no user value is ever interpreted by a shell here.
  """
  argv = shlex.split(command)
  env = dict(os.environ)
  while argv and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', argv[0], re.S):
    key, _, value = argv.pop(0).partition('=')
    env[key] = value
  try:
    return subprocess.call(argv, env=env)
  except FileNotFoundError:
    print(f'error: {argv[0]!r} is not installed or not on PATH (needed to run: {command})',
          file=sys.stderr)
    return 127


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra: list[str] = []
  if '--' in argv:  # everything after -- goes to adalink_jax.train (config overrides)
    i = argv.index('--')
    argv, extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest='cmd', required=True)
  for name in ('tpu-create', 'tpu-setup', 'tpu-run', 'tpu-delete'):
    s = sub.add_parser(name)
    s.add_argument('--name', required=True)
    s.add_argument('--zone', required=True)
    s.add_argument('--project', default='')
    if name == 'tpu-create':
      s.add_argument('--accelerator', default='v4-8')
      s.add_argument('--runtime', default='tpu-ubuntu2204-base')
      s.add_argument('--spot', action='store_true')
    if name == 'tpu-setup':
      s.add_argument('--source', default='.', help='local checkout to copy to the workers')
    if name == 'tpu-run':
      s.add_argument('--config', required=True)
      s.add_argument('--workdir', required=True)
  g = sub.add_parser('gpu-run')
  g.add_argument('--config', required=True)
  g.add_argument('--workdir', required=True)
  g.add_argument('--gpus', default='')
  s = sub.add_parser('slurm')
  s.add_argument('--config', required=True)
  s.add_argument('--workdir', required=True)
  s.add_argument('--nodes', type=int, default=2)
  s.add_argument('--gpus_per_node', type=int, default=8)
  s.add_argument('--time', default='24:00:00')
  s.add_argument('--partition', default='')
  s.add_argument('--job_name', default='adalink')
  s.add_argument('--script_path', default='adalink_job.sbatch')
  for s in sub.choices.values():
    s.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  args = p.parse_args(argv)

  if args.cmd.startswith('tpu-'):
    commands = tpu_commands(args, extra)
  elif args.cmd == 'gpu-run':
    commands = gpu_commands(args, extra)
  else:
    script = slurm_script(args, extra)
    if args.dry_run:
      print(f'# {args.script_path}\n{script}')
    else:
      with open(args.script_path, 'w', encoding='utf-8') as f:
        f.write(script)
    commands = [shlex.join(['sbatch', args.script_path])]

  for c in commands:
    print(c, flush=True)
    if not args.dry_run:
      rc = _run(c)
      if rc:
        print(f'command failed with exit code {rc}: {c}', file=sys.stderr)
        return rc
  return 0


if __name__ == '__main__':
  sys.exit(main())
