#!/usr/bin/env python
"""Generate images from a finished SDXL or SD3 single-file checkpoint.

    python generate.py --model ckpt.safetensors --prompt "1girl, solo" --out out/ [--negative ...]
                       [--w 1024 --h 1024 --steps 28 --cfg 7 --seed 1 --sampler euler --n 4] [--vae vae.safetensors]
    python generate.py --model ckpt.safetensors --prompt_file prompts.txt --out out/

Prompt files use kohya's syntax (one prompt per line, `--n` negative, `--w`/`--h` size, `--d` seed,
`--l` CFG scale, `--s` steps, `--ss` sampler, `--sigmas karras`) or TOML / JSON lists. PNGs carry the settings in the
A1111 "parameters" text chunk.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

import models
from core.cli import one_line_errors
from core.hashes import short_hash
from diffusion.preview import generate, size_multiple
from diffusion.prompts import MAX_SIDE, MAX_STEPS, SamplePrompt, a1111_parameters, load_prompts, save_png
from diffusion.sampling import canonical_sampler_name
from training.preflight import check_prompt_sizes, network_max_side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (one prompt source, positive sizes and counts, a known sampler)."""
    ap = argparse.ArgumentParser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint (SDXL or SD3): single-file .safetensors, .ckpt / .pt, or a diffusers folder (model_index.json)")
    ap.add_argument("--vae", default=None, help="separate VAE file")
    ap.add_argument("--clip_l", default=None, help="separate CLIP-L file (SD3)")
    ap.add_argument("--clip_g", default=None, help="separate CLIP-G file (SD3)")
    ap.add_argument("--t5xxl", default=None, help="separate T5-XXL file (SD3)")
    ap.add_argument("--prompt", default=None, help="the prompt")
    ap.add_argument("--prompt_file", default=None, help="prompt file (.txt kohya syntax, .toml, .json)")
    ap.add_argument("--negative", default="", help="negative prompt")
    ap.add_argument("--w", type=int, default=None, help="width in pixels (default: the previews' of the run that wrote "
                    "the file, else 1024, tiny models 128)")
    ap.add_argument("--h", type=int, default=None, help="height in pixels")
    ap.add_argument("--steps", type=int, default=28, help="sampling steps")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the previews' of the "
                    "run that wrote the file, else 7 SDXL, 5 SD3)")
    ap.add_argument("--rescale", type=float, default=0.0, help="guidance rescale (0 = off)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    ap.add_argument("--sampler", default="euler", help="euler, euler_a, ddim, heun, dpmpp_2m, dpmpp_2m_sde, lms, dpm_2, dpm_2_ancestral, dpm_solver_2m, "
                    "dpmpp_2s or a kohya / A1111 name (k_lms, k_dpm_2_a, dpmsolver, dpmsingle, DPM2 a, ...)")
    ap.add_argument("--sigmas", default="normal", choices=("normal", "karras"),
                    help="sigma spacing: the schedule's own, or Karras et al. 2022 (A1111's 'Karras' schedule type)")
    ap.add_argument("--n", type=int, default=1, help="images per prompt")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32", choices=("fp32", "fp16", "bf16"),
                    help="weight precision of the network and text encoders (the VAE stays fp32)")
    ap.add_argument("--v_parameterization", action="store_true",
                    help="SDXL v-prediction model (default: read from the file's modelspec.prediction_type)")
    ap.add_argument("--max_token_length", type=int, default=75, choices=(75, 150, 225))
    ap.add_argument("--clip_skip", type=int, default=None, help="CLIP layer from the end the prompt is read from "
                    "(1 = last, 2 = penultimate); default: the model's own (2). Use the clip_skip a LoRA was trained with "
                    "(its ss_clip_skip)")
    ap.add_argument("--lora", nargs="+", default=[], metavar="FILE[:WEIGHT]",
                    help="kohya-format LoRA file(s) merged into the model before sampling (weight default 1)")
    args = ap.parse_args(argv)
    if bool(args.prompt) == bool(args.prompt_file):
        ap.error("give exactly one of --prompt or --prompt_file")
    for name, top in (("n", None), ("steps", MAX_STEPS), ("w", MAX_SIDE), ("h", MAX_SIDE)):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name} must be >= 1, got {value}")
        if value is not None and top is not None and value > top:  # the limits of diffusion/prompts.py
            ap.error(f"--{name} {value} is larger than {top}, the most a generation takes")
    try:  # prompt files canonicalise their sampler names; --prompt gets the same check
        args.sampler = canonical_sampler_name(args.sampler)
    except ValueError as e:
        ap.error(str(e))
    return args


def recorded_defaults(path: str) -> dict[str, float]:
    """The preview settings of the training run that wrote the file (train.py records its config as sdtrain.config:
    [sample] sample_params width / height / scale), so a model is sampled by default as its run previewed it. Empty
    for other files (released checkpoints, diffusers folders); a value missing or not a number is left out."""
    import json
    meta = getattr(models.open_checkpoint(path), "metadata", None) or {}
    try:
        params = json.loads(meta["sdtrain.config"])["sample"]["sample_params"]
    except (KeyError, TypeError, ValueError):
        return {}
    return {k: params[k] for k in ("width", "height", "scale")
            if isinstance(params, dict) and isinstance(params.get(k), (int, float)) and not isinstance(params[k], bool)}


@one_line_errors("generate.py")
def main(argv: list[str] | None = None) -> int:
    """Images for the prompts (module docstring); 0 when done."""
    args = parse_args(argv)
    dt = models.DTYPES[args.precision]
    defaults = {"steps": args.steps, "sampler": args.sampler, "negative_prompt": args.negative, "rescale": args.rescale,
                "sigmas": args.sigmas, **({"width": args.w} if args.w else {}), **({"height": args.h} if args.h else {})}
    if args.prompt_file:  # read once before the model loads (seconds to minutes): a bad file is one line at once
        read_prompts(args.prompt_file, defaults)
    try:
        comp = models.load(args.model, vae=args.vae, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl,
                           device=args.device, dtype={"network": dt, "text": dt, "vae": torch.float32},
                           v_parameterization=True if args.v_parameterization else None,  # None: the file's modelspec
                           max_token_length=args.max_token_length, clip_skip=args.clip_skip)
    except (models.CheckpointError, ValueError) as e:  # a missing / damaged / foreign file: one line, no traceback
        raise SystemExit(f"model error: {' '.join(str(e).split())}") from None
    if args.lora:
        from networks.lora import merge_files
        try:
            merge_files(comp, args.lora, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        except (ValueError, OSError) as e:  # missing / foreign / mismatched LoRA file: one line, no traceback
            raise SystemExit(f"lora error: {e}") from None
    comp.network.eval()
    small = comp.vae.cfg.ch < 128  # tiny test models: default to small images
    size = 128 if small else 1024
    recorded = recorded_defaults(args.model) if os.path.isfile(args.model) else {}
    defaults.update(width=args.w or int(recorded.get("width", size)), height=args.h or int(recorded.get("height", size)),
                    scale=args.cfg if args.cfg is not None else recorded.get("scale", models.family(comp.family).cfg_scale))
    if recorded:
        print(f"generate.py: defaults from the file's training previews: "
              f"{', '.join(f'{k} {v:g}' for k, v in recorded.items())}", file=sys.stderr)
    if args.prompt_file:
        prompts = read_prompts(args.prompt_file, defaults)
    else:
        prompts = [SamplePrompt(prompt=args.prompt, seed=args.seed, **defaults)]
    try:
        check_prompt_sizes(prompts, network_max_side(comp.network.cfg), args.prompt_file or "--w / --h")
    except ValueError as e:
        raise SystemExit(f"prompt error: {e}") from None
    os.makedirs(args.out, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.model))[0]
    # A1111's "Model hash" of the file, so A1111 / Civitai link the images to it (a diffusers folder has none)
    model_hash = short_hash(args.model) if os.path.isfile(args.model) else ""
    m = size_multiple(comp)
    count = 0
    for p in prompts:
        base_seed = p.seed if p.seed is not None else args.seed
        # The size `generate` renders (rounded down to what the network accepts), so the PNG metadata matches it.
        p = dataclasses.replace(p, width=max(m, p.width // m * m), height=max(m, p.height // m * m))
        for i in range(args.n):
            q = dataclasses.replace(p, seed=base_seed + i)
            img = generate(comp, q, args.device, progress=True)
            path = os.path.join(args.out, f"{count:05d}_{q.seed}.png")
            save_png(img, path, a1111_parameters(q, name, model_hash=model_hash))
            print(path)
            count += 1
    return 0


def read_prompts(path: str, defaults: dict) -> list[SamplePrompt]:
    """The prompts of --prompt_file; a missing, unreadable or malformed file is one line naming it."""
    try:
        return load_prompts(path, defaults)
    except (ValueError, OSError) as e:
        raise SystemExit(f"prompt file error: {e}") from None


if __name__ == "__main__":
    # A CPU flag (no effect on GPUs): subnormal floats in the activations made a 3-step generate of the demo model
    # take 18.4 s instead of 5.3 s on the 2-core box; values under 1.2e-38 flushed to zero change no pixel.
    torch.set_flush_denormal(True)
    sys.exit(main())
