#!/usr/bin/env python
"""The built-in demo: generate a tiny dataset, cache it with 2 processes, train with 2 processes,
then generate from the exported checkpoint. CPU is enough; nothing is downloaded.

    python scripts/demo.py [--nproc 2] [--steps 120]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes for cache.py and train.py (gloo on CPU)")
    ap.add_argument("--steps", type=int, default=120, help="training steps")
    ap.add_argument("--images", type=int, default=48, help="generated training images")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from data.demo import make_demo_dataset

    data_dir = os.path.join(ROOT, "demo_out", "data")
    if not os.path.isdir(data_dir) or not os.listdir(data_dir):
        make_demo_dataset(data_dir, n=args.images)
        print(f"wrote {args.images} demo images to {data_dir}")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    run(launcher + ["cache.py", "configs/demo.toml"])
    run(launcher + ["train.py", "configs/demo.toml", f"train.max_train_steps={args.steps}"])
    ckpt = os.path.join("demo_out", "run", "models", "demo.safetensors")
    run([sys.executable, "generate.py", "--model", ckpt, "--prompt", "a red circle, simple background, red, circle",
         "--n", "2", "--steps", "20", "--cfg", "4", "--out", os.path.join("demo_out", "generated")])
    print("\ndemo done: samples in demo_out/run/samples, generated images in demo_out/generated, "
          "checkpoint demo_out/run/models/demo.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
