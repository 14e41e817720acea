#!/usr/bin/env python
"""The built-in demo: generate a tiny dataset of coloured shapes, cache it with 2 processes, train a tiny model on it
with 2 processes (preview grids every 100 steps), then generate from the exported checkpoint. CPU is enough; nothing is
downloaded. The tiny VAE is the trained asset in models/assets (scripts/train_tiny_vae.py); the rest starts random.

    python scripts/demo.py [--family sd3|sdxl] [--nproc 2] [--steps N] [--images 48]

Writes demo_out/: the data, the latent store, the run folder and demo_out/demo_<family>.png (the preview grids of the
run: one row per preview step) and demo_out/generated/<family>/ (generate.py's images of a red circle, a blue square).
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {  # config, run folder, output name
    "sd3": ("configs/shapes_sd3.toml", "run_sd3", "demo_sd3"),
    "sdxl": ("configs/shapes_sdxl.toml", "run", "demo"),
}


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def rows(grids: list[str], out: str, tiles: int = 4) -> None:
    """The preview grids (2 x 2 labelled tiles each) as one row of `tiles` per step, one row under another, 2x
    enlarged (nearest), written atomically."""
    from PIL import Image

    from core.fsio import atomic_write
    from diffusion.preview import grid
    cells = []
    for path in grids:
        with Image.open(path) as g:
            g = g.convert("RGB")
        w, h = g.width // 2, g.height // 2
        cells += [g.crop((x * w, y * h, (x + 1) * w, (y + 1) * h)) for y in range(2) for x in range(2)][:tiles]
    canvas = grid(cells, cols=tiles)
    canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
    atomic_write(out, lambda f: canvas.save(f, format="PNG"), suffix=".png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=tuple(FAMILIES), default="sd3",
                    help="sd3: flow matching (configs/shapes_sd3.toml); sdxl: epsilon prediction (configs/shapes_sdxl.toml)")
    ap.add_argument("--nproc", type=int, default=2, help="processes for cache.py and train.py (gloo on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--images", type=int, default=48, help="generated training images")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from data.demo import caption_for, make_demo_dataset

    config, run_dir, name = FAMILIES[args.family]
    data_dir = os.path.join(ROOT, "demo_out", "shapes")
    if not os.path.isdir(data_dir) or not os.listdir(data_dir):
        make_demo_dataset(data_dir, n=args.images, size=(64, 64))
        print(f"wrote {args.images} demo images to {data_dir}")
    data = [f"data.image_dirs=['{data_dir}']"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    run(launcher + ["cache.py", config, *data])
    run(launcher + ["train.py", config, *data] + ([f"train.max_train_steps={args.steps}"] if args.steps else []))
    ckpt = os.path.join("demo_out", run_dir, "models", f"{name}.safetensors")
    gen_dir = os.path.join("demo_out", "generated", args.family)
    for what in ("red circle", "blue square"):
        colour, shape = what.split()
        run([sys.executable, "generate.py", "--model", ckpt, "--prompt", caption_for(colour, shape), "--n", "2",
             "--w", "64", "--h", "64", "--steps", "20", "--cfg", "1", "--seed", "1",
             "--out", os.path.join(gen_dir, what.replace(" ", "_"))])
    grids = sorted(glob.glob(os.path.join(ROOT, "demo_out", run_dir, "samples", "*_grid.png")))
    generated = sorted(glob.glob(os.path.join(ROOT, gen_dir, "*", "*.png")))
    summary = os.path.join(ROOT, "demo_out", f"demo_{args.family}.png")
    if grids:
        rows(grids, summary)
    print(f"\ndemo done: preview grids by step in {os.path.relpath(summary, ROOT)} (and demo_out/{run_dir}/samples), "
          f"generated images {', '.join(os.path.relpath(p, ROOT) for p in generated)}, checkpoint {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
