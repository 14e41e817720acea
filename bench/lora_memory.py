#!/usr/bin/env python
"""Memory of LoRA runs at full size, from the memory planner (training/planner.py): no weights are loaded.

    python bench/lora_memory.py [--family sdxl|sd3] [--preset base|sd3_medium|sd35_medium|sd35_large]
                                [--resolution 1024] [--batch 1] [--only REGEX]

One row per adapter setting (rank, text encoders cached or trained, LoCon / LoHa / LoKr / DoRA, fp8 base, block
swap; --only picks rows by a regex over their labels), each the planner's estimate for a CUDA device: base weights
(bf16 = full_bf16, or fp8), the trained parameters and the adapters' weights + gradients + AdamW state (fp32), the
simulated step's activations (gradient checkpointing), and the total without the CUDA reserve.
This script and bench/train_memory.py both print the planner's numbers (they used to count activations two
different ways: 1.32 GiB here against 0.07 GB there for the same UNet at 256 px).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.config import config_from_dict  # noqa: E402
from training import planner  # noqa: E402

GIB = 2**30
ROWS = [  # label, [network], [model], [train] extras
    ("lora 16, text cached", {"network_dim": 16}, {}, {}),
    ("lora 32, text cached", {"network_dim": 32}, {}, {}),
    ("lora 32, text encoders trained", {"network_dim": 32, "network_train_unet_only": False}, {}, {}),
    ("locon 32, text cached", {"network_module": "locon", "network_dim": 32}, {}, {}),
    # LyCORIS algorithms at our defaults (alpha 16, LoKr factor -1 = the most balanced split)
    ("loha 32, text cached", {"network_module": "loha", "network_dim": 32}, {}, {}),
    ("lokr 32, text cached", {"network_module": "lokr", "network_dim": 32}, {}, {}),
    ("lora 32 + dora, text cached", {"network_dim": 32, "dora_wd": True}, {}, {}),
    ("lora 32, fp8 base", {"network_dim": 32}, {"fp8_base": True}, {}),
    ("lora 32, fp8 base, 8 blocks swapped", {"network_dim": 32}, {"fp8_base": True}, {"blocks_to_swap": 8}),
]


def config(family: str, preset: str, resolution: int, batch: int, network: dict, model: dict,
           train: dict) -> Any:
    text_cached = network.get("network_train_unet_only", True)
    return config_from_dict({
        "model": {"model_family": family, "model_preset": preset, **model},
        "data": {"resolution": resolution, "batch_size": batch},
        "cache": {"cache_dir": "<cache>", "cache_text_encoder_outputs": text_cached},
        "train": {"mixed_precision": "bf16", "full_bf16": True, "gradient_checkpointing": True, **train},
        "optimizer": {"optimizer_type": "AdamW"},
        "network": {"network_module": "lora", "network_alpha": 16, "network_train_unet_only": True, **network}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sdxl", choices=("sdxl", "sd3"))
    ap.add_argument("--preset", default=None, help="model preset (default: base / sd3_medium)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--only", default="", help="regex (search) over the row labels: only those rows")
    a = ap.parse_args(argv)
    preset = a.preset or ("base" if a.family == "sdxl" else "sd3_medium")
    print(f"{a.family} {preset}, {a.resolution}px, batch {a.batch}, gradient checkpointing, AdamW (planner, CUDA "
          "policy; totals without the CUDA reserve)")
    print("| adapters | base weights | text encoders | trained params | adapters + grads + AdamW | activations "
          "| total |")
    print("|---|---|---|---|---|---|---|")
    cache: dict = {}
    for label, network, model, train in ROWS:
        if (a.family == "sd3" and network.get("network_module") == "locon") or not re.search(a.only, label):
            continue
        try:
            p = planner.estimate(config(a.family, preset, a.resolution, a.batch, network, model, train), cache=cache)
        except ValueError as e:  # e.g. more blocks to swap than a tiny preset has
            print(f"| {label} | {e} |")
            continue
        net = sum(t.bytes for t in p.terms if t.name == f"weights: {'unet' if a.family == 'sdxl' else 'mmdit'}")
        text = sum(t.bytes for t in p.terms if t.name.startswith("weights:") and t.name.split(": ")[1] not in
                   ("unet", "mmdit", "vae", "adapters"))
        total = sum(t.bytes for t in p.terms)
        grads = p.term("gradients")  # fp32 adapters: 4 bytes a parameter
        print(f"| {label} | {net / GIB:.2f} GiB | {text / GIB:.2f} GiB | {grads / 4 / 1e6:.1f}M | "
              f"{(p.term('weights: adapters') + grads + p.term('optimizer')) / GIB:.2f} GiB | {p.term('activations') / GIB:.2f} GiB "
              f"| {total / GIB:.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
