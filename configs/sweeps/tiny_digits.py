"""A tiny scaling grid on the built-in digits (runs here on 2 CPU cores in minutes):

  python -m launch.sweep --sweep=configs/sweeps/tiny_digits.py --workdir=/tmp/sweep_digits

TarFlow on 16x16 digits, two blocks of one layer, widths 16 / 32 / 64 (heads of width/2) x 40 / 80 /
160 steps of batch 32; the held-out bits/dim on 512 test digits. Writes WORKDIR/sweep.md, .json, .png.
"""
STEPS = (40, 80, 160)
WIDTHS = (16, 32, 64)


def get_sweep():
  return {
      "base": "tarflow_digits",
      "metric": "bpd",
      "overrides": {
          "model.layers_per_block": [1, 1],
          "train.batch_size": 32,
          "train.warmup": 10,
          "log.every": 20,
          "log.sample_every": 0,
          "log.num_samples": 0,
          "log.eval_examples": 512,
          "checkpoint.every": 1000,
      },
      "sizes": {f"w{w}": {"model.width": w, "model.head_dim": w // 2} for w in WIDTHS},
      "budgets": {f"s{n}": {"train.steps": n} for n in STEPS},
  }
