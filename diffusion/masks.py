"""Masked loss: train only the subject.

A loss mask is a weight in [0, 1] per latent position ([B, 1, h, w], at latent resolution: the pixel mask averaged
over each 8 x 8 block, as kohya's `interpolate(mode="area")` of its pixel-resolution alpha mask). The per-element
loss is multiplied by it before the mean over the latent, so every objective (eps / v / flow) and every per-sample
weighting (min-SNR, flow weighting, loss_weight) work unchanged on top of it.

Options follow OneTrainer (`modules/util/loss/masked_loss.py` masked_losses): `unmasked_weight` raises the weight of
masked-out positions to at least that value (clamp, so 0 = kohya's `--masked_loss`, which multiplies by the mask);
`normalize_masked_area_loss` divides each sample's loss by the mean of its (clamped) mask, so a small subject is
not trained more weakly than a large one.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

LATENT_FACTOR = 8  # the VAE downsamples by 8 (SDXL and SD3)


def masked_elementwise(loss: Tensor, mask: Tensor, unmasked_weight: float = 0.0, normalize: bool = False) -> Tensor:
    """Per-element loss [B, C, h, w] weighted by the loss mask [B, 1, h, w] (or [B, h, w]) clamped to
    [unmasked_weight, 1]; with `normalize`, each sample divided by the mean of its clamped mask."""
    m = mask.to(device=loss.device, dtype=loss.dtype)
    if m.ndim == loss.ndim - 1:
        m = m.unsqueeze(1)
    if m.shape[0] != loss.shape[0] or m.shape[2:] != loss.shape[2:]:
        raise ValueError(f"loss mask shape {tuple(mask.shape)} does not match the latents {tuple(loss.shape)}")
    m = m.clamp(min=unmasked_weight, max=1.0)
    out = loss * m
    if normalize:
        area = m.mean(dim=tuple(range(1, m.ndim)), keepdim=True)  # [B, 1, 1, 1]
        out = out / area.clamp(min=torch.finfo(area.dtype).tiny)
    return out


def latent_mask(pixel_mask: np.ndarray, factor: int = LATENT_FACTOR) -> np.ndarray:
    """A pixel mask [H, W] (uint8 0..255 or float 0..1) -> float32 [H / factor, W / factor], the mean of each block
    (area downsampling; H and W are multiples of factor, as every bucket is)."""
    m = np.asarray(pixel_mask)
    m = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else m.astype(np.float32)
    h, w = m.shape
    if h % factor or w % factor:
        raise ValueError(f"mask size {w}x{h} is not a multiple of {factor}")
    return m.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def to_stored(mask: np.ndarray) -> torch.Tensor:
    """A latent mask in [0, 1] as the latent store keeps it: float16 [h, w] (0 and 1 exact; 2 bytes a position,
    1/8 of a 4-channel bf16 latent). One mask per record: the flipped latent's is its mirror (`from_stored`)."""
    return torch.from_numpy(np.clip(np.asarray(mask, np.float32), 0.0, 1.0)).to(torch.float16)


def from_stored(t: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """A stored mask -> float32 [h, w] in [0, 1], mirrored left-right for a flipped latent (block means commute
    with the mirror: bucket widths are multiples of 8)."""
    m = t.float()
    return torch.flip(m, dims=[-1]) if flip else m
