"""The demo's tiny VAE assets (models/assets/tiny_vae_{sdxl,sd3}.safetensors, written by scripts/train_tiny_vae.py).

Reference: the images themselves - held-out demo images (data/demo.py's distribution with a seed the training
stream never uses) encoded and decoded by the asset loaded the way a user's `model.vae` file is, PSNR against the
originals; the latent statistics against the family's latent format constants."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(ROOT, "models", "assets", "tiny_vae_{}.safetensors")
MIN_PSNR_DB = 25.0
MAX_BYTES = 2 * 2**20


def _held_out(tmp_path, n=12):
    from data.demo import make_demo_dataset
    out = []
    for p in make_demo_dataset(str(tmp_path), n=n, seed=7):  # the demo uses seed 0; training draws its own stream
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"))
        a = a[: a.shape[0] // 8 * 8, : a.shape[1] // 8 * 8]
        out.append(torch.from_numpy(a.copy()).permute(2, 0, 1).float()[None] / 127.5 - 1)
    return out


@pytest.mark.parametrize("family, channels", [("sdxl", 4), ("sd3", 16)])
def test_vae_asset_reconstructs_held_out_demo_images(tmp_path, family, channels):
    import models
    path = ASSET.format(family)
    assert os.path.getsize(path) <= MAX_BYTES
    comp = models.load(None, family, vae=path, parts=("vae",))  # as [model] vae = path loads it
    vae = comp.vae.float().eval()  # fp16 file; float32 compute (fp16 convolutions are slow on CPU)
    assert vae.cfg.z_channels == channels and vae.cfg.downsample_factor == 8
    psnrs, latents = [], []
    with torch.no_grad():
        for x in _held_out(tmp_path):
            z = comp.encode_images(x)
            y = comp.decode_latents(z).clamp(-1, 1)
            mse = ((y - x) / 2).pow(2).mean().item()
            psnrs.append(10 * math.log10(1 / mse))
            latents.append(z.flatten(2))
    assert min(psnrs) > MIN_PSNR_DB - 3 and np.mean(psnrs) >= MIN_PSNR_DB, psnrs
    z = torch.cat(latents, dim=2)  # scaled latents: about zero mean, unit std per channel, as the diffusion model expects
    assert z.mean(dim=(0, 2)).abs().max() < 0.5 and ((z.std(dim=(0, 2)) - 1).abs() < 0.35).all(), \
        (z.mean(dim=(0, 2)), z.std(dim=(0, 2)))
