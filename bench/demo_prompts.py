#!/usr/bin/env python
"""Does the demo follow its prompts? Trains the demo (configs/shapes_sd3.toml or shapes_sdxl.toml, on the demo's
images: data.demo.make_demo_dataset(balanced=True) as scripts/demo.py makes them) in this process (1 process, batch
8 = the demo's 2 processes x 4; or --model: an already trained checkpoint, e.g. scripts/demo.py's), then runs
`python generate.py --model M --prompt_file P --n N --seed S --out D` as a user does (its defaults unless --gen adds
options) on colour x shape prompts (data.demo.caption_for, or --template) and counts the samples whose shape colour the
fixed classifier data.demo.classify_colour reads as the prompt's colour.

    python bench/demo_prompts.py [--family sd3] [--steps N] [--seed 0] [--every 0] [--n 16] [--first-seed 0]
                                 [--combos all|red:circle,blue:square] [--template "a {colour} {shape}"]
                                 [--gen "--cfg 1"] [-- overrides]
    python bench/demo_prompts.py --model demo_out/run_sd3/models/demo_sd3.safetensors [--n 16] ...

Prints one table per checkpoint (prompt -> matches / n and what was read) and a last line
`<checkpoint>: <matches>/<samples> match`.
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_combos(text: str) -> list[tuple[str, str]]:
    """'all' or 'red:circle,blue:square' -> [(colour, shape), ...]."""
    from data.demo import COLOURS, SHAPES
    if text == "all":
        return [(c, s) for c in COLOURS for s in SHAPES]
    out = [tuple(item.split(":")) for item in text.split(",")]
    for c, s in out:
        if c not in COLOURS or s not in SHAPES:
            raise SystemExit(f"--combos: unknown colour / shape {c}:{s}")
    return out


def prompt_following(model: str, combos: list[tuple[str, str]], n: int, first_seed: int, gen_args: list[str],
                     out_dir: str, template: str | None = None) -> tuple[int, int, dict]:
    """generate.py on one prompt file (the combos' prompts; seeds first_seed .. first_seed + n - 1 each), run as a
    command, then classify_colour on every image. Returns (matches, samples, {(colour, shape): Counter of reads})."""
    import subprocess

    from PIL import Image

    from data.demo import caption_for, classify_colour
    prompts = os.path.join(out_dir, "prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.writelines((template.format(colour=c, shape=s) if template else caption_for(c, s)) + "\n" for c, s in combos)
    images = os.path.join(out_dir, "images")
    subprocess.run([sys.executable, "generate.py", "--model", model, "--prompt_file", prompts, "--n", str(n),
                    "--seed", str(first_seed), "--out", images, *gen_args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    paths = sorted(glob.glob(os.path.join(images, "*.png")))  # generate.py numbers them in prompt order
    assert len(paths) == n * len(combos), (len(paths), n, len(combos))
    read: dict = {}
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            read.setdefault(combos[i // n], Counter())[classify_colour(im)] += 1
    matches = sum(cnt[c] for (c, _s), cnt in read.items())
    return matches, len(paths), read


def report(name: str, matches: int, total: int, read: dict) -> None:
    for (c, s), cnt in read.items():
        print(f"  {c} {s}: {cnt[c]}/{sum(cnt.values())}  ({', '.join(f'{k}={v}' for k, v in cnt.most_common())})")
    print(f"{name}: {matches}/{total} match", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("sd3", "sdxl"), default="sd3")
    ap.add_argument("--model", default=None, help="classify this checkpoint instead of training one")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--every", type=int, default=0, help="export (and classify) every N steps too; 0 = the final model")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the generated training images (the demo's: 0)")
    ap.add_argument("--seed", type=int, default=0, help="run seed (also draws the random weights)")
    ap.add_argument("--combos", default="all", help="colour:shape list, or all (4 colours x 3 shapes)")
    ap.add_argument("--n", type=int, default=16, help="sample seeds per prompt")
    ap.add_argument("--first-seed", type=int, default=0, help="first sample seed (generate.py --seed)")
    ap.add_argument("--template", default=None, help="prompt template with {colour} and {shape} (default: the captions)")
    ap.add_argument("--gen", default="", help="extra generate.py arguments (default: none, its defaults)")
    ap.add_argument("--keep", default=None, help="keep the run and images in this folder")
    ap.add_argument("overrides", nargs="*", help="more config overrides (key=value)")
    args = ap.parse_args()
    os.chdir(ROOT)
    import torch
    torch.set_flush_denormal(True)  # as generate.py's __main__ does (the in-process training's previews too)
    combos, gen_args = parse_combos(args.combos), shlex.split(args.gen)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        if args.model:
            checkpoints = [args.model]
        else:
            import cache
            import train
            from data.demo import make_demo_dataset
            config = f"configs/shapes_{args.family}.toml"
            make_demo_dataset(os.path.join(work, "data"), n=args.images, size=(64, 64), seed=args.data_seed,
                              balanced=True)
            common = [config, f"data.image_dirs=['{work}/data']", f"cache.cache_dir={work}/cache", f"seed={args.seed}",
                      "data.batch_size=8", *args.overrides]
            steps = [f"train.max_train_steps={args.steps}"] if args.steps else []
            t0 = time.perf_counter()
            if cache.main(common) != 0:
                return 1
            t1 = time.perf_counter()
            if train.main([*common, *steps, f"output_dir={work}/run", "save.save_state=false",
                           "sample.sample_every_n_steps=0", f"save.save_every_n_steps={args.every}"]) != 0:
                return 1
            print(f"\n{' '.join(common)}: cache {t1 - t0:.1f} s, train {time.perf_counter() - t1:.1f} s", flush=True)
            checkpoints = sorted(glob.glob(f"{work}/run/models/*.safetensors"), key=os.path.getmtime)
        for i, path in enumerate(checkpoints):
            out = os.path.join(work, f"gen{i}")
            os.makedirs(out, exist_ok=True)
            t0 = time.perf_counter()
            matches, total, read = prompt_following(path, combos, args.n, args.first_seed, gen_args, out, args.template)
            print(f"generate.py {' '.join(gen_args)}: {total} images in {time.perf_counter() - t0:.1f} s")
            report(os.path.basename(path), matches, total, read)
    return 0


if __name__ == "__main__":
    sys.exit(main())
