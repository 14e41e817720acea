"""Merge kohya-format LoRA files into a single-file checkpoint, written in the original layout.

    python -m tools.merge_lora BASE.safetensors LORA.safetensors[:WEIGHT] ... --out merged.safetensors [--precision fp16]

Each layer: W += weight * alpha / dim * up @ down (computed in fp32). bigG's q / k / v deltas go into their thirds
of the fused in_proj_weight; `lora_unet_` names in diffusers naming are mapped to the original paths.
"""
from __future__ import annotations

import argparse
import os
import sys

import models
from networks.lora import merge_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.merge_lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="single-file SDXL or SD3 checkpoint")
    ap.add_argument("loras", nargs="+", metavar="LORA[:WEIGHT]", help="LoRA file(s), each with an optional weight")
    ap.add_argument("--out", required=True, help="merged checkpoint (.safetensors)")
    ap.add_argument("--precision", default="fp16", choices=tuple(models.DTYPES), help="precision of the merged file")
    args = ap.parse_args(argv)
    if os.path.abspath(args.out) == os.path.abspath(args.base):
        ap.error("--out must differ from the base checkpoint")
    try:
        comp = models.load(args.base)
        merge_files(comp, args.loras, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        models.save(comp, args.out, args.precision,
                    extra_metadata={"sdtrain.merged_loras": ",".join(os.path.basename(s) for s in args.loras)})
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"merge_lora: {e}") from None
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
