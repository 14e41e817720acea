#!/usr/bin/env python
"""Training memory estimate for the SDXL UNet and the SD3 MMDiT: weights, gradients, optimizer state, activations.

    python bench/train_memory.py                                  # the standard table (SDXL and SD3-medium, 1024 px)
    python bench/train_memory.py --model sdxl --batch 1 --optimizer adafactor --weights bf16 --fused --ckpt

Everything comes from the real shapes, with no weights in memory: the networks are built on the meta device
(models/unet_sdxl.py `PRESETS["base"]`, models/mmdit.py `PRESETS["sd3_medium"]`) and run forward there.

  weights    = sum of numel x bytes of the weight dtype (fp32 4, bf16 2).
  gradients  = the same for every trained parameter; with the fused backward pass (train.fused_backward_pass)
               only one parameter's gradient is alive at a time: the largest parameter.
  optimizer  = AdamW: exp_avg + exp_avg_sq per element (in the weight dtype; fp32 when stepped in fp32, which
               full_bf16 + stochastic_rounding does); AdamW8bit: 2 x 1 byte + one fp32 absmax per 2048-element
               block x 2 (bitsandbytes' blockwise quantisation); Adafactor (training/optim.py, beta1 = None): fp32 row
               and column second moments for >= 2-D tensors (shape[:-1] + shape[:-2] + shape[-1:]), a full fp32
               second moment for 1-D ones: computed per tensor.
  activations = bytes of the tensors autograd saves for backward, counted by a saved_tensors_hooks pack hook during
               a meta-device forward at the real size (bf16 activations as under bf16 autocast; parameters and
               views of them excluded; a tensor saved by several ops counted once; attention as flash / cuDNN SDPA
               keeps it: q, k, v, output, log-sum-exp, no attention matrix). With gradient checkpointing
               (train.gradient_checkpointing, per block) the checkpointed blocks save only their inputs during the
               forward, and the backward recomputes one block at a time: saved outside the blocks + the block inputs
               + the largest single block's own saved tensors.
  transient  = 2 x the largest saved activation: the gradient flowing back through it and one temporary (an
               allowance, not a measurement; the allocator's fragmentation and the CUDA context, ~0.5-1 GiB, are
               not counted).

The estimate is checked against torch.cuda.max_memory_allocated by bench/gpu_suite.py (full fine-tune rows).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import mmdit, unet_sdxl  # noqa: E402

GB = 1e9
GIB = 2**30
BNB_BLOCK = 2048  # bitsandbytes 8-bit optimizer quantisation block (elements per fp32 absmax)
VAE_FACTOR = 8
SDXL_TOKENS = 77
SD3_TOKENS = 154  # 77 CLIP + 77 T5 tokens (the reference default)
BYTES = {"fp32": 4, "bf16": 2}


@functools.lru_cache(maxsize=None)
def build_meta(model: str, preset: str = "") -> tuple[nn.Module, list[nn.Module]]:
    """The network on the meta device and its checkpointed blocks."""
    with torch.device("meta"):
        if model == "sdxl":
            net = unet_sdxl.UNet(unet_sdxl.PRESETS[preset or "base"])
            blocks = [*net.input_blocks, net.middle_block, *net.output_blocks]
        else:
            net = mmdit.MMDiT(mmdit.PRESETS[preset or "sd3_medium"])
            blocks = list(net.joint_blocks)
    return net.to(torch.bfloat16), blocks


def meta_inputs(net: nn.Module, model: str, batch: int, resolution: int) -> tuple:
    side = resolution // VAE_FACTOR
    kw = dict(device="meta", dtype=torch.bfloat16)
    cfg = net.cfg
    if model == "sdxl":
        return (torch.empty(batch, cfg.in_channels, side, side, **kw), torch.empty(batch, device="meta"),
                torch.empty(batch, SDXL_TOKENS, cfg.context_dim, **kw), torch.empty(batch, cfg.adm_in_channels, **kw))
    return (torch.empty(batch, cfg.in_channels, side, side, **kw), torch.empty(batch, device="meta"),
            torch.empty(batch, cfg.adm_in_channels, **kw), torch.empty(batch, SD3_TOKENS, cfg.context_in_dim, **kw))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _FlashLikeAttention(torch.autograd.Function):
    """What flash / cuDNN / memory-efficient SDPA keep for backward: q, k, v, the output and a [B, H, N] fp32
    log-sum-exp; never the N x M attention matrix the math kernel (and the meta device) would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - never run (meta tensors, no backward)
        raise NotImplementedError


def _flash_like_sdpa(q, k, v, *args, **kwargs):
    return _FlashLikeAttention.apply(q, k, v)


@functools.lru_cache(maxsize=None)
def activation_bytes(model: str, batch: int, resolution: int, ckpt: bool, preset: str = "") -> dict[str, int]:
    """Saved-for-backward bytes of one forward (see the module doc) -> {"activations", "largest"}."""
    net, blocks = build_meta(model, preset)
    net.train()
    params = {id(p) for p in net.parameters()}
    current: list[int | None] = [None]  # index of the top-level block running now
    per_block = [0] * len(blocks)
    outside, largest = [0], [0]
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # meta tensors, no memory: keeps ids unique

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params or id(base) in seen:
            return t
        seen.add(id(base))
        keep.append(base)
        n = _nbytes(base)
        largest[0] = max(largest[0], n)
        if current[0] is None:
            outside[0] += n
        else:
            per_block[current[0]] += n
        return t

    block_inputs = [0]
    inputs_seen: set[int] = set()

    def pre(i):
        def hook(_m, args):
            current[0] = i
            for a in args:
                if torch.is_tensor(a) and id(a) not in inputs_seen:
                    inputs_seen.add(id(a))
                    keep.append(a)
                    block_inputs[0] += _nbytes(a)
        return hook

    def post(_m, _a, _o):
        current[0] = None

    handles = [b.register_forward_pre_hook(pre(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post) for b in blocks]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_like_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(*meta_inputs(net, model, batch, resolution))
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    for h in handles:
        h.remove()
    if ckpt:
        act = outside[0] + block_inputs[0] + max(per_block)
    else:
        act = outside[0] + sum(per_block)
    return {"activations": act, "largest": largest[0]}


def optimizer_bytes(params: list[nn.Parameter], optimizer: str, state_bytes: int) -> int:
    total = 0
    for p in params:
        n = p.numel()
        if optimizer == "adamw":
            total += 2 * n * state_bytes
        elif optimizer == "adamw8bit":
            total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK))
        elif optimizer == "adafactor":
            s = p.shape
            total += 4 * (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]) if p.dim() >= 2 else 4 * n
        else:
            raise ValueError(optimizer)
    return total


@dataclass
class Setting:
    model: str
    batch: int = 1
    resolution: int = 1024
    optimizer: str = "adamw"
    weights: str = "fp32"
    fused: bool = False
    ckpt: bool = False
    sr: bool = False  # full_bf16 + stochastic rounding: stepped in fp32, fp32 optimizer state

    def label(self) -> str:
        return (f"{self.model} b{self.batch} {self.resolution}px {self.optimizer} {self.weights} weights"
                + (" +fused" if self.fused else "") + (" +ckpt" if self.ckpt else "") + (" +SR" if self.sr else ""))


def estimate(s: Setting, preset: str = "") -> dict[str, float]:
    """Bytes of each part for one setting."""
    net, _ = build_meta(s.model, preset)
    params = list(net.parameters())
    wb = BYTES[s.weights]
    n = sum(p.numel() for p in params)
    grads = max(p.numel() for p in params) * wb if s.fused else n * wb
    state_b = 4 if (s.weights == "fp32" or s.sr) else wb
    opt = optimizer_bytes(params, s.optimizer, state_b)
    act = activation_bytes(s.model, s.batch, s.resolution, s.ckpt, preset)
    sr_tmp = max(p.numel() for p in params) * 4 * 2 if s.sr else 0  # one parameter + its gradient in fp32
    out = {"params": n, "weights": n * wb, "grads": grads, "optimizer": opt, "activations": act["activations"],
           "transient": 2 * act["largest"] + sr_tmp}
    out["total"] = sum(out[k] for k in ("weights", "grads", "optimizer", "activations", "transient"))
    return out


STANDARD = [
    Setting("sdxl", optimizer="adamw", weights="fp32"),
    Setting("sdxl", optimizer="adamw", weights="fp32", ckpt=True),
    Setting("sdxl", optimizer="adamw8bit", weights="bf16", ckpt=True),
    Setting("sdxl", optimizer="adafactor", weights="bf16", ckpt=True),
    Setting("sdxl", optimizer="adafactor", weights="bf16", fused=True, ckpt=True),
    Setting("sdxl", optimizer="adafactor", weights="bf16", fused=True, ckpt=True, sr=True),
    Setting("sdxl", batch=4, optimizer="adafactor", weights="bf16", fused=True, ckpt=True, sr=True),
    Setting("sd3", optimizer="adamw", weights="fp32"),
    Setting("sd3", optimizer="adamw", weights="fp32", ckpt=True),
    Setting("sd3", optimizer="adafactor", weights="bf16", fused=True, ckpt=True, sr=True),
]


def table(settings: list[Setting], preset: str = "") -> list[tuple[Setting, dict[str, float]]]:
    rows = [(s, estimate(s, preset)) for s in settings]
    print(f"{'setting':62s} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'transnt':>8} {'total GB':>9}"
          f" {'24 GB?':>6}")
    for s, r in rows:
        print(f"{s.label():62s} " + " ".join(f"{r[k] / GB:8.2f}" for k in
              ("weights", "grads", "optimizer", "activations", "transient"))
              + f" {r['total'] / GB:9.2f} {'yes' if r['total'] < 24 * GB else 'no':>6}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("sdxl", "sd3"))
    ap.add_argument("--preset", default="", help="model preset (default: base / sd3_medium; tiny for a smoke run)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "adafactor"))
    ap.add_argument("--weights", default="fp32", choices=tuple(BYTES))
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--sr", action="store_true", help="full_bf16 + stochastic rounding (fp32 steps and state)")
    a = ap.parse_args()
    if a.model is None:
        table(STANDARD, a.preset)
    else:
        table([Setting(a.model, a.batch, a.resolution, a.optimizer, a.weights, a.fused, a.ckpt, a.sr)], a.preset)


if __name__ == "__main__":
    main()
