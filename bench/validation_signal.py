#!/usr/bin/env python
"""Does the validation loss say what it should? Two runs of train.py on the demo's coloured shapes, several seeds:

- learning: many images (a quarter held out), the demo's settings: the validation loss falls while training;
- overfitting: a few training images, many steps at a high learning rate: the training loss keeps falling while
  the validation loss turns and rises (the model memorises its few images).

    python bench/validation_signal.py                          # both, seeds 0 1 2, SD3 demo model
    python bench/validation_signal.py --family sdxl --seeds 0 1 2 3 --only overfit
    python bench/validation_signal.py --short --seeds 0 1 2 3 4   # the suite's shortened forms

Prints, per run, the validation curve and the training loss (window means), and what the tests check
(tests/test_validation_signal.py runs a shortened form of each). CPU, one process; a minute or two per run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIGS = {"sd3": "configs/shapes_sd3.toml", "sdxl": "configs/shapes_sdxl.toml"}


@dataclass
class Scenario:
    """One kind of run: the data (images generated, the share held out) and the training settings."""

    images: int
    split: float
    steps: int
    every: int
    lr: float
    batch_size: int = 4
    extra: list[str] = field(default_factory=list)


# The demo's own settings (configs/shapes_*.toml: 64 px, the trained tiny VAE), a quarter held out.
LEARN = Scenario(images=48, split=0.25, steps=120, every=20, lr=2e-3)
# 4 training images (8 generated, half held out) seen 300 times each at batch 4: memorised.
OVERFIT = Scenario(images=8, split=0.5, steps=300, every=25, lr=3e-3)
# The suite's shortened forms (tests/test_validation_signal.py): `--short` runs them over the seeds.
SHORT = {"learn": Scenario(images=48, split=0.25, steps=60, every=15, lr=2e-3),
         "overfit": Scenario(images=8, split=0.5, steps=140, every=20, lr=5e-3)}


@dataclass
class Curves:
    """A run's validation losses and training losses by step."""

    val: list[tuple[int, float]]
    train: list[tuple[int, float]]

    def train_mean(self, lo: int, hi: int) -> float:
        """The training loss's mean over steps lo < step <= hi."""
        xs = [v for s, v in self.train if lo < s <= hi]
        return sum(xs) / len(xs)


def main_ok(entry: str, argv: list[str]) -> None:
    """`entry`.main(argv) in this process (cache / train), which must return 0."""
    import importlib

    from core import dist
    try:
        code = importlib.import_module(entry).main([str(a) for a in argv])
    finally:
        dist.shutdown()
    if code != 0:
        raise SystemExit(f"{entry}.main exited {code}")


def make_data(root: str, images: int, seed: int = 0) -> str:
    """The demo's images (64 px, data/demo.py) in root/data."""
    from data.demo import make_demo_dataset

    d = os.path.join(root, "data")
    if not os.path.isdir(d):
        make_demo_dataset(d, n=images, size=(64, 64), seed=seed)
    return d


def run(root: str, family: str, sc: Scenario, seed: int, out_name: str = "run") -> Curves:
    """cache.py once per data folder, then train.py in this process; the curves from metrics.jsonl."""
    data = make_data(root, sc.images)
    base = [CONFIGS[family], f"data.image_dirs=['{data}']", f"cache.cache_dir={os.path.join(root, 'cache')}",
            "data.max_dataloader_n_workers=0", "cache.num_workers=0"]
    if not os.path.isdir(os.path.join(root, "cache", "shards")):
        main_ok("cache", base)
    out = os.path.join(root, f"{out_name}-{seed}")
    main_ok("train", [*base, f"output_dir={out}", f"seed={seed}", f"train.max_train_steps={sc.steps}",
                      f"optimizer.learning_rate={sc.lr}", "optimizer.lr_scheduler=constant",
                      "optimizer.lr_warmup_steps=0", f"data.batch_size={sc.batch_size}",
                      "sample.sample_every_n_steps=0", "save.save_on_train_end=false", "save.save_every_n_steps=0",
                      f"validation.validation_split={sc.split}", f"validation.validate_every_n_steps={sc.every}",
                      "validation.timesteps_per_image=8", *sc.extra])
    return read_curves(out)


def read_curves(out: str) -> Curves:
    """The validation and training losses a run wrote to logs/metrics.jsonl."""
    val, train = [], []
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "val/loss" in r:
                val.append((r["step"], r["val/loss"]))
            if "loss" in r:
                train.append((r["step"], r["loss"]))
    return Curves(val, train)


def falls(c: Curves) -> bool:
    """The learning signal: the last validation loss below the first, and the training loss of the last quarter
    of the run below its first quarter's."""
    n = c.train[-1][0]
    return c.val[-1][1] < c.val[0][1] and c.train_mean(3 * n // 4, n) < c.train_mean(0, n // 4)


def turns_up(c: Curves) -> bool:
    """The overfitting signal: the validation loss reaches its minimum at least two passes before the end and ends
    above it (the curve turned up and stayed up), while the training loss still falls (its last quarter below the
    quarter before)."""
    n = c.train[-1][0]
    vals = [v for _, v in c.val]
    low = min(range(len(vals)), key=vals.__getitem__)
    return low <= len(vals) - 3 and vals[-1] > vals[low] \
        and c.train_mean(3 * n // 4, n) < c.train_mean(n // 2, 3 * n // 4)


def describe(name: str, c: Curves) -> str:
    """One line: the validation curve, the training loss per quarter of the run, and the signal's size: the
    validation loss's change from its first pass to its last, and from its minimum (step) to its last."""
    n = c.train[-1][0]
    q = [c.train_mean(i * n // 4, (i + 1) * n // 4) for i in range(4)]
    vals = [v for _, v in c.val]
    low = min(range(len(vals)), key=vals.__getitem__)
    return (f"{name}: val " + " ".join(f"{s}:{v:.4f}" for s, v in c.val)
            + " | train quarters " + " ".join(f"{v:.4f}" for v in q)
            + f" | val first->last {100 * (vals[-1] / vals[0] - 1):+.1f}%, min at step {c.val[low][0]}, "
            f"min->last {100 * (vals[-1] / vals[low] - 1):+.1f}%, train q1->q4 {100 * (q[3] / q[0] - 1):+.1f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=tuple(CONFIGS), default="sd3")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=("learn", "overfit"), default=None)
    ap.add_argument("--short", action="store_true", help="the suite's shortened forms (SHORT)")
    ap.add_argument("--steps", type=int, default=None, help="override the scenario's steps")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--every", type=int, default=None)
    args = ap.parse_args()
    import dataclasses
    import torch
    torch.set_num_threads(1)
    for name, sc, check in (("learn", LEARN, falls), ("overfit", OVERFIT, turns_up)):
        if args.only and args.only != name:
            continue
        sc = SHORT[name] if args.short else sc
        sc = dataclasses.replace(sc, **{k: v for k, v in (("steps", args.steps), ("lr", args.lr),
                                                          ("images", args.images), ("every", args.every))
                                        if v is not None})
        with tempfile.TemporaryDirectory() as root:
            for seed in args.seeds:
                t = time.perf_counter()
                c = run(root, args.family, sc, seed)
                print(describe(f"{name} seed {seed} ({time.perf_counter() - t:.0f} s)", c), "->",
                      "signal" if check(c) else "NO SIGNAL", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
