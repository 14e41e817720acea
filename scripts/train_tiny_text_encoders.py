#!/usr/bin/env python
"""Train the demo's tiny CLIP text encoders as CLIP itself was trained, contrastively (caption vs image), on generated
shape images, and write them as the shipped assets models/assets/tiny_clip_{l,g}.safetensors.

    python scripts/train_tiny_text_encoders.py                  # both files into models/assets
    python scripts/train_tiny_text_encoders.py --steps 300 --out /tmp/te   # elsewhere

Why: the demo's SD3-structured model starts from random weights except the VAE. Random text encoders give the 12
demo captions nearly the same features (in the pooled vector the part all captions share is ~4x the colours' spread;
in the CLIP token features the differences are small too), so the diffusion model sees a weak text signal and drew
some samples in a neighbouring colour of the tiny VAE's latent space (red as yellow, green as blue). Released SD
models start from pretrained text encoders in which the words of a caption make large, consistent differences; these
are that at the demo's size (measured in tests/test_demo.py and docs/demo.md).

The networks are the tiny SD3 preset's CLIP-L and CLIP-G (models/text_encoders.py `tiny_l`, `tiny_g`; drawn with
models.build's seed as the preset does), trained with the symmetric InfoNCE loss of CLIP (Radford et al. 2021) on
their pooled outputs as SD3 uses them (CLIP-L's final-norm end-of-text state, CLIP-G's projected one) against a small
convolutional image encoder (thrown away afterwards). A batch is one image of every colour x shape pair (12 distinct
captions, so every other caption is a true negative), drawn on the fly by data.demo.draw_shape (the demo's
distribution, a stream of its own), each caption in one of several phrasings so that a colour or shape word,
not a whole sentence, carries the meaning. The token embeddings of words that never occur keep their random values.
Deterministic on CPU (one thread): the same arguments give the same files (checked: two runs, identical bytes).
About 2.5 minutes on one core of the shared 2-core box (1500 steps); held-out caption accuracy 1.000.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
from data.demo import COLOURS, SHAPES, caption_for, draw_shape, random_background  # noqa: E402
from models.checkpoint import save_safetensors_atomic  # noqa: E402
from models.sd3 import PREFIX  # noqa: E402

ASSET = os.path.join(ROOT, "models", "assets", "tiny_clip_{part}.safetensors")
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
# Phrasings the captions are drawn in (the demo's own first): colour and shape words in several places and contexts.
PHRASINGS = (caption_for, lambda c, s: f"a {c} {s}", lambda c, s: f"{c} {s}", lambda c, s: f"a {s}, {c}",
             lambda c, s: f"{c}, {s}, simple background", lambda c, s: f"a {s} in {c} on a light background")
SIDES = (32, 40, 48)
HELD_OUT_SEED = 7  # the accuracy report's images (never the training stream)


class ImageEncoder(nn.Module):
    """A small CNN: 3 stride-2 convolutions, global mean, one linear head per text encoder."""

    def __init__(self, dims: list[int], width: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, width // 2, 3, 2, 1), nn.GELU(), nn.Conv2d(width // 2, width, 3, 2, 1),
                                   nn.GELU(), nn.Conv2d(width, width, 3, 2, 1), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(width, d) for d in dims)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x).mean(dim=(2, 3))  # (B, width)
        return [head(h) for head in self.heads]


def image_tensor(im) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1]."""
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return t.permute(2, 0, 1).float() / 127.5 - 1


def batch(rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """One image of every colour x shape pair (one size per batch) and its caption in a random phrasing."""
    w, h = rng.choice(SIDES), rng.choice(SIDES)
    images = [image_tensor(draw_shape(rng, w, h, c, s, random_background(rng))) for c, s in PAIRS]
    return torch.stack(images), [rng.choice(PHRASINGS)(c, s) for c, s in PAIRS]


def text_features(comp, captions: list[str]) -> list[torch.Tensor]:
    """The pooled vectors SD3 conditions on: CLIP-L's (not projected) and CLIP-G's (projected)."""
    tok = comp.tokenize(captions)
    return [comp.clip_l(tok["ids_l"], layer=-2)[1], comp.clip_g(tok["ids_g"], layer=-2)[1]]


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over cosine similarities; pair i is the positive of row / column i."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def accuracy(comp, enc: ImageEncoder, rounds: int = 8) -> float:
    """Share of held-out images whose nearest caption (demo phrasing, both encoders' similarities summed) is theirs."""
    rng, hits, total = random.Random(HELD_OUT_SEED), 0, 0
    txt = [F.normalize(t, dim=-1) for t in text_features(comp, [caption_for(c, s) for c, s in PAIRS])]
    for _ in range(rounds):
        x, _caps = batch(rng)
        sim = sum(F.normalize(i, dim=-1) @ t.T for i, t in zip(enc(x), txt))
        hits += (sim.argmax(dim=1) == torch.arange(len(PAIRS))).sum().item()
        total += len(PAIRS)
    return hits / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warm-up, then cosine)")
    ap.add_argument("--seed", type=int, default=0, help="initial weights (models.build's seed) and image stream")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log_every", type=int, default=100)
    ap.add_argument("--out", default=ASSET, help="output file pattern ('{part}' = l / g) or folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    comp = models.build("sd3", "tiny", seed=args.seed, parts=["clip_l", "clip_g"])
    for m in (comp.clip_l, comp.clip_g):
        m.train().requires_grad_(True)
    dims = [comp.clip_l.cfg.hidden_size, comp.clip_g.cfg.projection_dim]
    enc = ImageEncoder(dims)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    params = [*comp.clip_l.parameters(), *comp.clip_g.parameters(), *enc.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    print(f"before: held-out caption accuracy {accuracy(comp, enc):.3f}", flush=True)
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        x, caps = batch(rng)
        loss = sum(clip_loss(i, t, logit_scale) for i, t in zip(enc(x), text_features(comp, caps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} held-out caption accuracy {accuracy(comp, enc):.3f}"
                  f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    for part, module in (("l", comp.clip_l), ("g", comp.clip_g)):
        prefix = PREFIX[f"clip_{part}"]  # written without it: ComfyUI's separate clip_l / clip_g files
        sd = {k[len(prefix):]: v.detach().to(torch.float16).contiguous()
              for k, v in comp.export_state_dict().items() if k.startswith(prefix)}
        path = args.out.format(part=part) if "{part}" in args.out else os.path.join(args.out, f"tiny_clip_{part}.safetensors")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_safetensors_atomic(sd, path, {"sdtrain.trained_by": "scripts/train_tiny_text_encoders.py",
                                           "sdtrain.seed": str(args.seed), "sdtrain.steps": str(args.steps)})
        print(f"wrote {path} ({os.path.getsize(path) / 2**20:.2f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
