#!/usr/bin/env python
"""The built-in demo: generate a tiny dataset, cache it with 2 processes, train with 2 processes,
then generate from the exported checkpoint. CPU is enough; nothing is downloaded.

    python scripts/demo.py [--nproc 2] [--steps 120] [--family sdxl|sd3]
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
    ap.add_argument("--family", choices=("sdxl", "sd3"), default="sdxl",
                    help="sdxl: configs/demo.toml; sd3: configs/demo_sd3.toml (cached T5 / CLIP outputs)")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from data.demo import make_demo_dataset

    data_dir = os.path.join(ROOT, "demo_out", "data")
    if not os.path.isdir(data_dir) or not os.listdir(data_dir):
        make_demo_dataset(data_dir, n=args.images)
        print(f"wrote {args.images} demo images to {data_dir}")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    config, run_dir, name = {"sdxl": ("configs/demo.toml", "run", "demo"),
                             "sd3": ("configs/demo_sd3.toml", "run_sd3", "demo_sd3")}[args.family]
    run(launcher + ["cache.py", config])
    run(launcher + ["train.py", config, f"train.max_train_steps={args.steps}"])
    ckpt = os.path.join("demo_out", run_dir, "models", f"{name}.safetensors")
    run([sys.executable, "generate.py", "--model", ckpt, "--prompt", "a red circle, simple background, red, circle",
         "--n", "2", "--steps", "20", "--cfg", "4", "--out", os.path.join("demo_out", "generated", args.family)])
    print(f"\ndemo done: samples in demo_out/{run_dir}/samples, generated images in demo_out/generated/{args.family}, "
          f"checkpoint {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
