#!/usr/bin/env python
"""The built-in demo: generate a tiny dataset of coloured shapes (every colour x shape pair equally often), cache it
with 2 processes, train a tiny model on it with 2 processes (preview grids every 100 steps), then generate from the
exported checkpoint with generate.py's defaults. CPU is enough; nothing is downloaded. The trained parts it starts from
are the assets in models/assets (the tiny VAE, scripts/train_tiny_vae.py; for SD3 also the tiny CLIP text encoders,
scripts/train_tiny_text_encoders.py); the rest starts random (drawn from --seed).

    python scripts/demo.py [--family sd3|sdxl] [--nproc 2] [--steps N] [--images 48] [--seed 0]

Writes demo_out/: the data, the latent store, the run folder and demo_out/demo_<family>.png (the preview grids of the
run: one row per preview step) and demo_out/generated/<family>/ (generate.py's images of a red circle, then a blue
square, 2 seeds each).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
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


def ensure_dataset(data_dir: str, n: int) -> None:
    """The demo's images in data_dir (make_demo_dataset, balanced, seed 0), rewritten unless exactly those files are
    there (a folder from an older demo holds other images)."""
    from data.demo import demo_images, make_demo_dataset
    want = [f"{i:04d}_{c}_{s}.png" for i, (_im, c, s) in enumerate(demo_images(n, (64, 64), 0, balanced=True))]
    have = sorted(f for f in os.listdir(data_dir) if f.endswith(".png")) if os.path.isdir(data_dir) else []
    if have != want:
        shutil.rmtree(data_dir, ignore_errors=True)
        make_demo_dataset(data_dir, n=n, size=(64, 64), seed=0, balanced=True)
        print(f"wrote {n} demo images to {data_dir}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=tuple(FAMILIES), default="sd3",
                    help="sd3: flow matching (configs/shapes_sd3.toml); sdxl: epsilon prediction (configs/shapes_sdxl.toml)")
    ap.add_argument("--nproc", type=int, default=2, help="processes for cache.py and train.py (gloo on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--images", type=int, default=48, help="generated training images (a multiple of 12: every colour "
                    "x shape pair equally often)")
    ap.add_argument("--seed", type=int, default=0, help="run seed: the random weights (MMDiT / UNet, T5) and the "
                    "training noise")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from data.demo import caption_for

    config, run_dir, name = FAMILIES[args.family]
    data_dir = os.path.join(ROOT, "demo_out", "shapes")
    ensure_dataset(data_dir, args.images)
    data = [f"data.image_dirs=['{data_dir}']", f"seed={args.seed}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    run(launcher + ["cache.py", config, *data])
    run(launcher + ["train.py", config, *data] + ([f"train.max_train_steps={args.steps}"] if args.steps else []))
    ckpt = os.path.join("demo_out", run_dir, "models", f"{name}.safetensors")
    gen_dir = os.path.join("demo_out", "generated", args.family)
    os.makedirs(os.path.join(ROOT, gen_dir), exist_ok=True)
    prompts = os.path.join(gen_dir, "prompts.txt")  # one generate.py run (one start-up) for both prompts
    with open(os.path.join(ROOT, prompts), "w", encoding="utf-8") as f:
        f.write(f"{caption_for('red', 'circle')}\n{caption_for('blue', 'square')}\n")
    # generate.py's defaults: 28 steps; size and CFG those of the run's previews, which the file records
    run([sys.executable, "generate.py", "--model", ckpt, "--prompt_file", prompts, "--n", "2", "--seed", "1",
         "--out", gen_dir])
    grids = sorted(glob.glob(os.path.join(ROOT, "demo_out", run_dir, "samples", "*_grid.png")))
    generated = sorted(glob.glob(os.path.join(ROOT, gen_dir, "*.png")))
    summary = os.path.join(ROOT, "demo_out", f"demo_{args.family}.png")
    if grids:
        rows(grids, summary)
    print(f"\ndemo done: preview grids by step in {os.path.relpath(summary, ROOT)} (and demo_out/{run_dir}/samples), "
          f"generated images {', '.join(os.path.relpath(p, ROOT) for p in generated)}, checkpoint {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
