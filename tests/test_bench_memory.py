"""bench/train_memory.py on the tiny presets: the parts add up from the shapes as its docstring says."""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import train_memory as tm  # noqa: E402


def test_estimate_parts_from_shapes():
    for model, preset, res in (("sdxl", "tiny", 64), ("sd3", "tiny", 128)):
        net, _ = tm.build_meta(model, preset)
        params = list(net.parameters())
        n = sum(p.numel() for p in params)
        plain = tm.estimate(tm.Setting(model, resolution=res, optimizer="adamw", weights="fp32"), preset)
        lean = tm.estimate(tm.Setting(model, resolution=res, optimizer="adafactor", weights="bf16", fused=True,
                                      ckpt=True), preset)
        assert plain["params"] == n and plain["weights"] == 4 * n and plain["grads"] == 4 * n
        assert plain["optimizer"] == 8 * n  # exp_avg + exp_avg_sq in fp32
        assert lean["weights"] == 2 * n and lean["grads"] == 2 * max(p.numel() for p in params)
        fact = sum(4 * (math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]) if p.dim() >= 2
                   else 4 * p.numel() for p in params)
        assert lean["optimizer"] == fact
        assert 0 < lean["activations"] < plain["activations"]  # checkpointing keeps block inputs only
        big = tm.estimate(tm.Setting(model, batch=2, resolution=res), preset)
        # nearly all of it scales with the batch (a few batch-independent tensors, e.g. frequency tables, do not)
        assert 1.9 * plain["activations"] < big["activations"] <= 2 * plain["activations"]
