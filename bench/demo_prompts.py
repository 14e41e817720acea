#!/usr/bin/env python
"""Does the demo follow its prompts? A shortened demo (configs/shapes_sd3.toml or shapes_sdxl.toml, 1 process, in this
process: cache, train, export every --every steps) and, for every exported checkpoint, the number of 8 seeded samples
(4 colour prompts x seeds 1, 2) whose shape colour data.demo.classify_colour reads as the prompt's colour.

    python bench/demo_prompts.py [--family sd3] [--steps 300] [--images 48] [--seed 0] [--cfg 1] [--vae ""] [-- overrides]

Prints one line per checkpoint: matches / 8 and what was read. --vae "" trains with the random-VAE preset (control).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SEEDS = (1, 2)


def colour_matches(comp, scale: float, size: int, steps: int = 20) -> tuple[int, dict]:
    from diffusion.preview import generate
    from diffusion.prompts import SamplePrompt
    from data.demo import COLOURS, caption_for, classify_colour
    got = {}
    for colour in COLOURS:
        for seed in SEEDS:
            p = SamplePrompt(prompt=caption_for(colour, "circle"), seed=seed, width=size, height=size, steps=steps,
                             scale=scale, sampler="euler")
            got[(colour, seed)] = classify_colour(generate(comp, p, "cpu"))
    return sum(got[(c, s)] == c for c, s in got), got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("sd3", "sdxl"), default="sd3")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100, help="export (and classify) every N steps; 0 = the final model only")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="run seed (also the random text encoders' weights)")
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--vae", default=None, help="model.vae override ('' = the random-VAE preset)")
    ap.add_argument("overrides", nargs="*", help="more config overrides (key=value)")
    args = ap.parse_args()
    os.chdir(ROOT)
    import torch
    torch.set_flush_denormal(True)
    import cache
    import models
    import train
    from data.demo import make_demo_dataset
    config = f"configs/shapes_{args.family}.toml"
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_dataset(os.path.join(tmp, "data"), n=args.images, size=(args.size, args.size))
        common = [config, f"data.image_dirs=['{tmp}/data']", f"cache.cache_dir={tmp}/cache", f"data.resolution={args.size}",
                  f"seed={args.seed}", *([f"model.vae={args.vae}"] if args.vae is not None else []), *args.overrides]
        t0 = time.perf_counter()
        if cache.main(common) != 0:
            return 1
        t1 = time.perf_counter()
        if train.main([*common, f"output_dir={tmp}/run", f"train.max_train_steps={args.steps}", "save.save_state=false",
                       "sample.sample_every_n_steps=0", f"save.save_every_n_steps={args.every}"]) != 0:
            return 1
        t2 = time.perf_counter()
        print(f"\n{config} {' '.join(common[1:])}: cache {t1 - t0:.1f} s, train {args.steps} steps {t2 - t1:.1f} s")
        for path in sorted(glob.glob(f"{tmp}/run/models/*.safetensors")):
            comp = models.load(path)
            comp.network.eval()
            n, got = colour_matches(comp, args.cfg, args.size)
            print(f"{os.path.basename(path)}: {n}/8 match  {' '.join(f'{c}{s}->{g}' for (c, s), g in got.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
