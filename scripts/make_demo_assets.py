#!/usr/bin/env python3
"""Makes the demo's vocabulary and tiny frozen backbone ahead of time (the demo does it on first use).

  python scripts/make_demo_assets.py [--assets_dir=DIR]

Writes DIR/spm.model (word-level SentencePiece trained on the demo sentences) and DIR/backbone/
(a tiny ViT + T5 pre-trained from scratch on rendered shapes; see adalink_jax/demo.py).
"""
import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--assets_dir', default='')
  args = p.parse_args()
  from adalink_jax import demo_assets, logs  # pylint: disable=g-import-not-at-top
  logs.setup_logging()
  spec = importlib.util.spec_from_file_location('demo_config',
                                                os.path.join(ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.assets_dir = args.assets_dir
  print(demo_assets.ensure(config, module.pretrain_config(config)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
