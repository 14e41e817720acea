"""Turning prompts into images with a model family's components: used by training previews and generate.py."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import models
from core import dist
from diffusion.prompts import SamplePrompt, a1111_parameters, save_png
from diffusion.sampling import sample

LABEL_PAD = 2  # pixels around grid labels


def size_multiple(comp: Any) -> int:
    """Pixel multiple the family's network accepts (SDXL UNet 8 * 2**(levels-1), MMDiT 8 * patch)."""
    return comp.pixel_multiple()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.inference_mode()
def generate(comp: Any, p: SamplePrompt, device: torch.device | str, autocast_dtype: torch.dtype | None = None,
             progress: bool = False) -> Image.Image:
    """One image for one prompt; seed -> identical image on any rank / run."""
    m = size_multiple(comp)
    width, height = max(m, p.width // m * m), max(m, p.height // m * m)
    seed = p.seed if p.seed is not None else 0
    g = torch.Generator(device="cpu").manual_seed(seed)
    channels = comp.vae.cfg.z_channels
    noise = torch.randn(1, channels, height // 8, width // 8, generator=g, dtype=torch.float32).to(device)
    amp = torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with amp:
        text = comp.encode_text([p.prompt], device=device)
        if models.family(comp.family).zero_empty_negative and not p.negative_prompt:
            neg = comp.uncond_text(text)  # as the original SDXL samplers: zeroed text embeddings
        else:
            neg = comp.encode_text([p.negative_prompt], device=device)
        size = torch.tensor([[height, width]], device=device, dtype=torch.float32)
        crop = torch.zeros_like(size)
        cond = comp.conditioning(text, size, crop, size)
        uncond = comp.conditioning(neg, size, crop, size)
        latents = sample(comp.sample_schedule(), comp.network, noise, steps=p.steps, sampler=p.sampler,
                         sigma_kind=p.sigmas,
                         cond=cond, uncond=uncond, cfg_scale=p.scale, rescale=p.rescale, generator=g, progress=progress)
    return to_pil(comp.decode_latents(latents.float()))[0]


def short_prompt(prompt: str) -> str:
    """The part of a prompt before the first comma (tags after it are usually quality / style words)."""
    return prompt.split(",")[0].strip() or prompt.strip()


def labelled(img: Image.Image, prompt: str, step: int | None = None) -> Image.Image:
    """The tile with the shortened prompt in a strip under it (cut with '...' to fit) and the step in the top-left
    corner, so a grid reads without its PNG metadata. PIL's default font, no font files."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    top, bottom = draw.textbbox((0, 0), "Ag", font=font)[1::2]
    line = bottom + LABEL_PAD
    out = Image.new("RGB", (img.width, img.height + line + LABEL_PAD), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    text = short_prompt(prompt)
    room = img.width - 2 * LABEL_PAD
    if draw.textlength(text, font=font) > room:
        while text and draw.textlength(text + "...", font=font) > room:
            text = text[:-1]
        text = text.rstrip() + "..."
    draw.text((LABEL_PAD, img.height + LABEL_PAD - top), text, fill="black", font=font)
    if step is not None:
        tag = f"step {step}"
        box = draw.textbbox((LABEL_PAD, LABEL_PAD), tag, font=font)
        draw.rectangle((0, 0, box[2] + LABEL_PAD, box[3] + LABEL_PAD), fill="black")
        draw.text((LABEL_PAD, LABEL_PAD), tag, fill="white", font=font)
    return out


def grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for n, img in enumerate(images):
        out.paste(img, ((n % cols) * w, (n // cols) * h))
    return out


def sample_round(comp: Any, prompts: Sequence[SamplePrompt], out_dir: str, step: int, device: torch.device | str,
                 autocast_dtype: torch.dtype | None = None, model_name: str = "",
                 log: Callable[[str], None] | None = None, split: bool = True, model_hash: str = "") -> list[str]:
    """Prompts split across ranks (split=False: every rank runs every prompt, as sharded FSDP forwards need);
    rank 0 writes {step:06d}_{index}_{seed}[_{name}].png and a grid (carrying the first image's parameters, as A1111's
    grids do); `model_hash`: of the file these weights were exported to, when there is one. Touches no training RNG: every image draws from
    its own seeded generator, and the global RNG is restored."""
    mine = [p for i, p in enumerate(prompts) if i % dist.world_size() == dist.rank()] if split else list(prompts)
    net = comp.network
    was_training = net.training
    net.eval()
    results = []
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        for p in mine:
            img = generate(comp, p, device, autocast_dtype)
            results.append((p.index, p, img))
    net.train(was_training)
    gathered = dist.all_gather_object(results) if split else [results]
    written = []
    if dist.is_main():
        allr = sorted((r for part in gathered for r in part), key=lambda r: r[0])
        for index, p, img in allr:
            path = os.path.join(out_dir, p.file_name(f"{step:06d}"))
            save_png(img, path, a1111_parameters(p, model_name, {"Training step": str(step)}, model_hash))
            written.append(path)
        if allr:
            gpath = os.path.join(out_dir, f"{step:06d}_grid.png")
            save_png(grid([labelled(img, p.prompt, step) for _, p, img in allr]), gpath,
                     a1111_parameters(allr[0][1], model_name, {"Training step": str(step)}, model_hash))
            written.append(gpath)
        if log:
            log(f"samples: wrote {len(written)} image(s) for step {step} to {out_dir}")
    dist.barrier()
    return written
