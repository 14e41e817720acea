#!/usr/bin/env python
"""Train the demo's tiny VAEs on generated shape images and write them as the shipped assets.

    python scripts/train_tiny_vae.py                       # both: models/assets/tiny_vae_{sdxl,sd3}.safetensors
    python scripts/train_tiny_vae.py --family sd3 --steps 600 --out /tmp/vae   # one family, elsewhere

The networks are models/vae.py's AutoencoderKL with a tiny config (ch 32, ch_mult (2, 1, 1, 2): 4 levels = 8x
downsampling; one ResNet block per level): 4 latent channels with quant_conv as SDXL, 16 without as SD3. Training
data is drawn on the fly by data/demo.py's `draw_shape` (the demo's own distribution: random shape, colour, light
background; never the demo's seed-0 images), whole images of 32-56 px sides. Residual branches start at zero,
Adam with warm-up and cosine decay, loss: MSE of the reconstruction from the posterior mean (the latent
encode_images hands the diffusion model; no sampling, no KL term: only the reconstruction matters here). Then
the latent space is calibrated to the family's latent format (SDXL scale 0.13025; SD3 scale 1.5305, shift
0.0609: a separate VAE file of either layout gets those constants), so the diffusion model sees latents of about
zero mean and unit variance as with the real VAEs; the encoder is then frozen and the decoder fine-tuned on the
calibrated latents. Prints the held-out PSNR (tests/test_demo_vae.py's images and measure) as it goes.

Deterministic on CPU: the same arguments (and --threads) give the same file; one family per process gives the
same file as --family both. About 25 minutes per family on one core.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.demo import COLOURS, SHAPES, demo_images, draw_shape, random_background  # noqa: E402
from models import vae as vae_mod  # noqa: E402
from models.checkpoint import save_safetensors_atomic  # noqa: E402

# Tiny structure: 4 levels keep SDXL / SD3's 8x downsampling. GroupNorm has 32 groups (as the original layers), so
# a 32-wide layer normalises each channel on its own over the image, which keeps no absolute level of a flat
# region (a light background's tint): the layers in front of the two final norms (the encoder's lowest level,
# the decoder's full-resolution level) are 64 wide, 2 channels per group. The other levels stay 32 wide: file
# under 2 MB, a step about 0.4 s on one core.
TINY = dict(ch=32, ch_mult=(2, 1, 1, 2), num_res_blocks=1)
# Training image sides (pixels): a new width and height per step, whole images so every GroupNorm sees a full
# image's statistics as at encode time (the shape is a third of the short side at every size, so the statistics
# are about the same). Smaller than the demo's 64-128 px to keep a step cheap; the convolutions carry over.
SIDES = (32, 40, 48, 56)
WARMUP_STEPS = 100
CONFIGS = {
    "sdxl": vae_mod.VAEConfig(**TINY, z_channels=4, use_quant_conv=True, scaling_factor=vae_mod.SDXL_SCALING_FACTOR),
    "sd3": vae_mod.VAEConfig(**TINY, z_channels=16, use_quant_conv=False, scaling_factor=vae_mod.SD3_SCALING_FACTOR,
                             shift_factor=vae_mod.SD3_SHIFT_FACTOR),
}
ASSET = os.path.join(ROOT, "models", "assets", "tiny_vae_{family}.safetensors")
CALIBRATION_IMAGES = 64
# Posterior std in the scaled latent space: the logvar rows of the moments conv are a constant (zero weights, not
# trained), set after calibration; training and encode_images use the posterior mean.
LATENT_STD = 0.02
HELD_OUT_SEED = 7  # images of the PSNR report (as tests/test_demo.py: never the training stream)


def render_batch(rng: random.Random, n: int, sides: tuple[int, ...] = SIDES) -> torch.Tensor:
    """n freshly drawn demo images (random colour, shape, background and position) of one random size from SIDES,
    in [-1, 1]. Whole images, not crops: every GroupNorm then sees a whole image's statistics, as at encode time."""
    w, h = rng.choice(sides), rng.choice(sides)
    return torch.stack([image_tensor(draw_shape(rng, w, h, rng.choice(list(COLOURS)), rng.choice(SHAPES),
                                                random_background(rng))) for _ in range(n)])


def calibration_images(seed: int, side: int = 64) -> torch.Tensor:
    """CALIBRATION_IMAGES side x side demo images of their own stream, in [-1, 1]."""
    rng = random.Random(seed)
    return torch.stack([image_tensor(draw_shape(rng, side, side, rng.choice(list(COLOURS)), rng.choice(SHAPES),
                                                random_background(rng))) for _ in range(CALIBRATION_IMAGES)])


def image_tensor(im) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1]."""
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return t.permute(2, 0, 1).float() / 127.5 - 1


def held_out_images(n: int = 12, seed: int = HELD_OUT_SEED) -> list[torch.Tensor]:
    """make_demo_dataset's images of another seed (as tests/test_demo_vae.py), sides cropped to multiples of 8."""
    return [image_tensor(im.crop((0, 0, im.width // 8 * 8, im.height // 8 * 8))) for im, _, _ in demo_images(n, seed=seed)]


@torch.no_grad()
def psnr(vae: vae_mod.AutoencoderKL, images: list[torch.Tensor]) -> float:
    """Mean PSNR (dB, images in [0, 1]) of encode (posterior mean) -> decode."""
    vals = []
    for x in images:
        y = vae.decode(vae.encode(x[None])[0]).clamp(-1, 1)
        mse = ((y - x[None]) / 2).pow(2).mean().item()
        vals.append(10 * math.log10(1 / max(mse, 1e-12)))
    return sum(vals) / len(vals)


def vae_loss(vae: vae_mod.AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """MSE of the reconstruction from the posterior mean (what encode_images hands the diffusion model)."""
    return F.mse_loss(vae.decode(vae.encode(x)[0]), x)


@torch.no_grad()
def zero_init_residuals(vae: vae_mod.AutoencoderKL) -> None:
    """Every residual branch (ResNet conv2, attention proj_out) starts at zero: each block starts as the identity,
    so the untrained network is a short chain of convolutions that learns the coarse image at once."""
    for m in vae.modules():
        if isinstance(m, vae_mod.ResnetBlock):
            m.conv2.weight.zero_(), m.conv2.bias.zero_()
        elif isinstance(m, vae_mod.AttnBlock):
            m.proj_out.weight.zero_(), m.proj_out.bias.zero_()


@torch.no_grad()
def calibrate(vae: vae_mod.AutoencoderKL, images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Rescale the encoder's mean output (and the decoder's input to match) per channel so that the family's
    to_latents() ((z - shift) * scale) of these images has zero mean and unit std. The scale is exact; the shift
    is exact through 1x1 post_quant_conv (SDXL), and through the 3x3 decoder.conv_in (SD3) except at the zero-padded
    border, which the decoder fine-tune that follows absorbs. Returns the raw per-channel (mean, std) before."""
    cfg, zc = vae.cfg, vae.cfg.z_channels
    mean = vae.encode(images)[0]  # (B, z, h, w)
    m = mean.mean(dim=(0, 2, 3))
    s = mean.std(dim=(0, 2, 3))
    gain = 1 / (s * cfg.scaling_factor)         # z' = gain * z + offset, per channel
    offset = cfg.shift_factor - m * gain
    enc = vae.quant_conv if cfg.use_quant_conv else vae.encoder.conv_out
    enc.weight[:zc] *= gain.view(-1, 1, 1, 1)
    enc.bias[:zc] = enc.bias[:zc] * gain + offset
    enc.bias[zc:] += 2 * torch.log(gain)       # logvar of z' = logvar + 2 log gain
    dec = vae.post_quant_conv if cfg.use_quant_conv else vae.decoder.conv_in
    # the decoder's first layer sees z = (z' - offset) / gain
    dec.bias += (dec.weight * (-offset / gain).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    dec.weight /= gain.view(1, -1, 1, 1)
    return m.tolist(), s.tolist()


def lr_scale(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    return min(1.0, step / warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))


def train(family: str, args: argparse.Namespace) -> str:
    cfg = dataclasses.replace(CONFIGS[family], ch_mult=args.ch_mult) if args.ch_mult else CONFIGS[family]
    torch.manual_seed(args.seed)
    vae = vae_mod.AutoencoderKL(cfg)
    zero_init_residuals(vae)
    moments = vae.quant_conv if cfg.use_quant_conv else vae.encoder.conv_out  # (mean, logvar) rows
    with torch.no_grad():  # constant logvar (set after calibration); training uses the posterior mean only
        moments.weight[cfg.z_channels:] = 0
        moments.bias[cfg.z_channels:] = 0
    rng = random.Random(args.seed)
    held = held_out_images()
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr, betas=(0.9, 0.99))
    total = args.steps + args.decoder_steps
    t0 = time.perf_counter()
    for step in range(1, total + 1):
        if step == args.steps + 1:  # calibrate the latent format, then train the decoder alone
            m, s = calibrate(vae, calibration_images(args.seed + 1))
            with torch.no_grad():  # posterior std LATENT_STD in the scaled latent space
                moments.bias[cfg.z_channels:] = 2 * math.log(LATENT_STD / cfg.scaling_factor)
            print(f"{family}: calibrated latents (raw mean {[round(v, 3) for v in m]}, std {[round(v, 3) for v in s]})"
                  f"; PSNR {psnr(vae, held):.2f} dB", flush=True)
            vae.encoder.requires_grad_(False)
            if cfg.use_quant_conv:
                vae.quant_conv.requires_grad_(False)
            opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=args.lr * 0.1, betas=(0.9, 0.99))
        if step <= args.steps:
            scale = lr_scale(step, args.steps, WARMUP_STEPS)
        else:
            scale = 0.5 * (1 + math.cos(math.pi * (step - args.steps) / max(args.decoder_steps, 1)))
        for g in opt.param_groups:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * scale
        loss = vae_loss(vae, render_batch(rng, args.batch, args.sides))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if moments.weight.grad is not None:
            moments.weight.grad[cfg.z_channels:] = 0
            moments.bias.grad[cfg.z_channels:] = 0
        opt.step()
        if step % args.log_every == 0 or step == total:
            print(f"{family}: step {step}/{total} loss {loss.item():.5f} held-out PSNR {psnr(vae, held):.2f} dB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    vae.eval()
    path = args.out.format(family=family) if "{family}" in args.out else os.path.join(args.out, f"tiny_vae_{family}.safetensors")
    sd = {k: v.detach().to(torch.float16) for k, v in vae.state_dict().items()}
    meta = {"sdtrain.trained_by": "scripts/train_tiny_vae.py", "sdtrain.family": family, "sdtrain.seed": str(args.seed),
            "sdtrain.steps": f"{args.steps}+{args.decoder_steps}"}
    save_safetensors_atomic(sd, path, meta)
    vae.load_state_dict({k: v.float() for k, v in sd.items()})  # report what the fp16 file reconstructs
    print(f"{family}: wrote {path} ({os.path.getsize(path) / 2**20:.2f} MiB), held-out PSNR {psnr(vae, held):.2f} dB "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("sdxl", "sd3", "both"), default="both")
    ap.add_argument("--steps", type=int, default=3200, help="steps of encoder + decoder training")
    ap.add_argument("--decoder_steps", type=int, default=300, help="steps of decoder-only training after calibration")
    ap.add_argument("--batch", type=int, default=4, help="images per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (warm-up, then cosine)")
    ap.add_argument("--seed", type=int, default=1, help="training stream seed (the demo's images use seed 0)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (results are reproducible per thread count)")
    ap.add_argument("--log_every", type=int, default=250)
    ap.add_argument("--sides", type=lambda v: tuple(int(x) for x in v.split(",")), default=SIDES,
                    help="training image sides to draw from, comma-separated pixels (multiples of 8)")
    ap.add_argument("--ch_mult", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                    help="channel multipliers per level (default: the shipped structure)")
    ap.add_argument("--out", default=ASSET, help="output file ('{family}' is replaced) or folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    for family in (("sdxl", "sd3") if args.family == "both" else (args.family,)):
        train(family, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
