#!/usr/bin/env python
"""Graph breaks and compiles of the trainer's compile (training/speed.compile_network) per family and bucket shape.

    python bench/compile_check.py                              # inductor on the CPU, tiny SDXL UNet and MMDiT
    python bench/compile_check.py --backend aot_eager --preset micro   # seconds: what tests/test_compile.py runs

Each family's network is compiled as train.py compiles it (every block and the middle block a region of its own,
static shapes, tail batches padded) and trained for a few steps (forward, MSE, backward, SGD): three bucket shapes,
the first one again, then a tail batch (batch 1 of 2). Printed per step: the graphs compiled by that step, graph breaks,
seconds, the loss. Expected: no graph break anywhere; new graphs only at a new bucket shape; none at a repeat or at the
tail; and the compiled loss equal to the eager loss of the same step (same weights, same batch). Exit status 1 if not.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
from training import speed  # noqa: E402

BATCH = 2
# (batch, latent h, latent w): three buckets, a repeat, the tail of a bucket. SD3's 8x12 and 12x8 are different
# images but the same token count: the joint blocks see one shape for both (their compile is shared).
STEPS = [(BATCH, 8, 8), (BATCH, 8, 12), (BATCH, 12, 8), (BATCH, 8, 8), (1, 8, 12)]
CONTEXT_TOKENS = {"sdxl": 77, "sd3": 20}


@dataclass
class Row:
    family: str
    shape: tuple[int, int, int]
    new_graphs: int
    graph_breaks: int
    seconds: float
    loss: float
    eager_loss: float

    @property
    def kind(self) -> str:
        return "tail" if self.shape[0] < BATCH else "new"


def _inputs(family: str, cfg, b: int, h: int, w: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)
    t = torch.rand(b, generator=g) * 999
    if family == "sdxl":
        return x, t, torch.randn(b, CONTEXT_TOKENS[family], cfg.context_dim, generator=g), \
            torch.randn(b, cfg.adm_in_channels, generator=g)
    return x, t, torch.randn(b, cfg.adm_in_channels, generator=g), \
        torch.randn(b, CONTEXT_TOKENS[family], cfg.context_in_dim, generator=g)


def _step(net: torch.nn.Module, opt: torch.optim.Optimizer, args: tuple) -> float:
    out = net(*args)
    loss = F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32) + 0.1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def check(family: str, preset: str = "tiny", backend: str = "inductor", steps: list = STEPS,
          checkpointing: bool = False) -> list[Row]:
    """Train the compiled network and an eager copy side by side through `steps`; one Row per step."""
    from torch import _dynamo
    from torch._dynamo.utils import counters

    _dynamo.reset()
    counters.clear()
    part = models.family(family).network
    eager = models.build(family, preset, parts=[part], seed=0).network.train()
    net = copy.deepcopy(eager)
    eager.gradient_checkpointing = net.gradient_checkpointing = checkpointing
    speed.compile_network(net, lambda m: None, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (net, eager)]
    rows = []
    for i, (b, h, w) in enumerate(steps):
        args = _inputs(family, net.cfg, b, h, w, seed=i)
        graphs0 = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        loss = _step(net, opts[0], args)
        seconds = time.perf_counter() - t0
        rows.append(Row(family, (b, h, w), counters["stats"]["unique_graphs"] - graphs0,
                        sum(counters["graph_break"].values()), seconds, loss, _step(eager, opts[1], args)))
    _dynamo.reset()
    return rows


def problems(rows: list[Row], rtol: float = 1e-3) -> list[str]:
    """What breaks the contract: graph breaks, compiles at a repeat or tail, no compile at a new shape, loss drift."""
    out, seen = [], set()
    for r in rows:
        key = r.shape[1:] if r.family == "sdxl" else (r.shape[1] * r.shape[2],)  # what the regions see
        if r.graph_breaks:
            out.append(f"{r.family} {r.shape}: {r.graph_breaks} graph breaks")
        if r.kind == "tail" or key in seen:
            if r.new_graphs:
                out.append(f"{r.family} {r.shape}: {r.new_graphs} graphs compiled at a shape seen before (recompile)")
        elif not r.new_graphs:
            out.append(f"{r.family} {r.shape}: a new bucket shape compiled nothing (not compiled?)")
        seen.add(key)
        if abs(r.loss - r.eager_loss) > rtol * abs(r.eager_loss):
            out.append(f"{r.family} {r.shape}: compiled loss {r.loss:.6g} != eager {r.eager_loss:.6g}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="sdxl,sd3")
    ap.add_argument("--preset", default="tiny", help="tiny, or micro for SDXL (SD3 then uses tiny)")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on (as train.py can run it)")
    args = ap.parse_args(argv)
    print(f"compile_check: torch {torch.__version__}, backend {args.backend}, device cpu, batch {BATCH}")
    bad: list[str] = []
    for family in args.families.split(","):
        preset = args.preset if family == "sdxl" else "tiny"  # micro is an SDXL preset
        rows = check(family, preset, args.backend, checkpointing=args.checkpointing)
        print(f"{family} ({preset}):")
        print(f"  {'step':>4} {'shape (b,h,w)':>14} {'kind':>6} {'new graphs':>10} {'graph breaks':>12} {'seconds':>8} "
              f"{'loss':>10} {'eager loss':>10}")
        seen: set = set()
        for i, r in enumerate(rows):
            kind = r.kind if r.kind == "tail" or r.shape not in seen else "repeat"
            seen.add(r.shape)
            print(f"  {i:>4} {str(r.shape):>14} {kind:>6} {r.new_graphs:>10} {r.graph_breaks:>12} {r.seconds:>8.1f} "
                  f"{r.loss:>10.6f} {r.eager_loss:>10.6f}")
        bad += problems(rows)
    for line in bad:
        print("PROBLEM", line)
    print(f"compile_check: {'OK' if not bad else f'{len(bad)} problems'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
