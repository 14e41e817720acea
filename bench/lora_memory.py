#!/usr/bin/env python
"""Memory estimate of a LoRA run, on the CPU, without allocating the model: SDXL (or SD3) built on the meta device.

    python bench/lora_memory.py [--family sdxl] [--resolution 1024] [--batch 1] [--dim 32] [--network lora|locon]

Counts bytes, not a measurement of a GPU allocator:
  weights      base network in the chosen precision (bf16 = full_bf16), plus the parts loaded for training;
  adapters     fp32 LoRA weights, their fp32 gradients and AdamW's two fp32 moments (16 bytes per parameter);
  activations  with gradient checkpointing, the tensors autograd saves at the block boundaries (the inputs of every
               checkpointed block and the UNet's skip connections) plus the largest single block's saved tensors,
               which exist while that block is recomputed in the backward pass. Counted with saved-tensor hooks on
               meta tensors in bf16 (autocast's compute precision). Attention is counted as the flash /
               memory-efficient kernels store it (output + logsumexp), not the math path's T x T matrix.
Prints one row per configuration and the total against the 12 GiB target (a 12 GB consumer GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
from core.config import NetworkConfig  # noqa: E402
from networks import lora  # noqa: E402

GIB = 2**30


@contextlib.contextmanager
def counting(acc: dict[str, int]):
    """Sum the bytes of the tensors autograd saves for backward (each tensor object once)."""
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        if id(t) not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(id(t))
            acc["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """SDPA as the fused kernels save it: the output and a float32 logsumexp per query row, no T x T matrix."""
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        out = _Saved.apply(q, k, v, out, lse)
    return out


class _Saved(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, out, lse):
        ctx.save_for_backward(q, k, v, out, lse)
        return out.clone()

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - never run (meta)
        return None, None, None, None, None


def block_saved_bytes(family: str, comp, res: int, batch: int) -> tuple[int, int, int]:
    """(boundary bytes, largest block bytes, number of blocks) of one training forward."""
    net = comp.network
    lat = res // 8
    acc = {"bytes": 0}
    per_block: list[int] = []
    bf = torch.bfloat16
    if family == "sdxl":
        c = net.cfg
        x = torch.empty(batch, c.in_channels, lat, lat, device="meta", dtype=bf, requires_grad=True)
        context = torch.empty(batch, 77, c.context_dim, device="meta", dtype=bf)
        y = torch.empty(batch, c.adm_in_channels, device="meta", dtype=bf)
        t = torch.zeros(batch, device="meta")
        blocks = list(net.input_blocks) + [net.middle_block] + list(net.output_blocks)
        # boundary tensors: each block's input h (and the skip connections it concatenates) in bf16
        orig = [b.forward for b in blocks]

        def wrap(b, f):
            def run(h, *a, **k):
                nonlocal acc
                outer = acc["bytes"]
                acc["bytes"] = 0
                with counting(acc):
                    out = f(h, *a, **k)
                per_block.append(acc["bytes"])
                acc["bytes"] = outer + h.numel() * h.element_size()
                return out
            return run
        for b, f in zip(blocks, orig):
            b.forward = wrap(b, f)
        net(x, t, context, y)
        for b in blocks:
            b.__dict__.pop("forward", None)
    else:
        c = net.cfg
        x = torch.empty(batch, c.in_channels, lat, lat, device="meta", dtype=bf, requires_grad=True)
        context = torch.empty(batch, 77 + 256, c.context_in_dim, device="meta", dtype=bf)
        y = torch.empty(batch, c.adm_in_channels, device="meta", dtype=bf)
        t = torch.zeros(batch, device="meta")
        for b in net.joint_blocks:
            f = b.forward

            def run(*a, _f=f, **k):
                outer = acc["bytes"]
                acc["bytes"] = 0
                with counting(acc):
                    out = _f(*a, **k)
                per_block.append(acc["bytes"])
                acc["bytes"] = outer + sum(v.numel() * v.element_size() for v in a if torch.is_tensor(v))
                return out
            b.forward = run
        net(x, t, context=context, y=y)
        for b in net.joint_blocks:
            b.__dict__.pop("forward", None)
    return acc["bytes"], max(per_block), len(per_block)


def estimate(family: str, preset: str, res: int, batch: int, network: str, dim: int, train_te: bool) -> dict:
    fam = models.family(family)
    parts = [fam.network] + (list(fam.text_encoders)[:2] if train_te else [])
    comp = models.build(family, preset, device="meta", dtype=torch.bfloat16, parts=parts)
    ncfg = NetworkConfig(network_module=network, network_dim=dim, network_alpha=dim / 2, network_train_unet_only=not train_te)
    with torch.device("meta"):
        net = lora.create_network(comp, ncfg, unet=True, text=train_te)
    n_adapter = sum(p.numel() for p in net.parameters())
    weights = sum(p.numel() * 2 for p in comp.network.parameters())
    te = sum(p.numel() * 2 for name in parts[1:] for p in getattr(comp, name).parameters())
    net.to(torch.bfloat16).apply_to()  # activations in autocast's precision
    comp.network.train()
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_sdpa
    try:
        boundary, largest, nblocks = block_saved_bytes(family, comp, res, batch)
    finally:
        F.scaled_dot_product_attention = orig
        net.remove()
    # one block recomputed during backward: its saved tensors plus about as much again for their gradients
    act = boundary + 2 * largest
    total = weights + te + 16 * n_adapter + act
    return {"weights": weights, "text": te, "adapters": n_adapter, "optimizer+grads": 12 * n_adapter,
            "boundary": boundary, "largest_block": largest, "activations": act, "total": total, "blocks": nblocks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sdxl", choices=("sdxl", "sd3"))
    ap.add_argument("--preset", default=None, help="model preset (default: base / sd3_medium)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    preset = args.preset or ("base" if args.family == "sdxl" else "sd3_medium")
    print(f"{args.family} {preset}, {args.resolution}px, batch {args.batch}, bf16 base, gradient checkpointing, AdamW")
    print("| network | dim | text encoders | base weights | text encoders | adapters (params) | adapters + grads + AdamW "
          "| activations | total | fits 12 GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for network, dim, te in (("lora", 16, False), ("lora", 32, False), ("lora", 32, True), ("locon", 32, False)):
        if args.family == "sd3" and network == "locon":
            continue
        r = estimate(args.family, preset, args.resolution, args.batch, network, dim, te)
        print(f"| {network} | {dim} | {'trained' if te else 'cached'} | {r['weights'] / GIB:.2f} GiB | "
              f"{r['text'] / GIB:.2f} GiB | {r['adapters'] / 1e6:.1f}M | {16 * r['adapters'] / GIB:.2f} GiB | "
              f"{r['activations'] / GIB:.2f} GiB | {r['total'] / GIB:.2f} GiB | {'yes' if r['total'] < 12 * GIB else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
