"""What every model family shares: the VAE side (images <-> scaled latents) and the prefixed file layout."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn


def strip_prefix(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    """The part of a checkpoint's key -> shape map under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


class FamilyBase:
    """Mixin for the SDXL / SD3 component dataclasses: one field per part, named as the keys of `prefix`
    (the family's PREFIX)."""

    vae: nn.Module | None
    prefix: Mapping[str, str] = {}

    def parts(self) -> dict[str, nn.Module]:
        """The loaded parts, in file-layout order."""
        return {name: m for name in self.prefix if (m := getattr(self, name)) is not None}

    def uncond_text(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unconditional branch: zeroed text embeddings, as the original SDXL samplers do. (The SD3 reference
        encodes the empty negative prompt instead; there this serves caption dropout of cached embeddings.)"""
        return {k: torch.zeros_like(v) for k, v in text.items()}

    def encode_images(self, images: Tensor, tile_size: int | None = None) -> Tensor:
        """Images in [-1, 1] -> scaled latents (posterior mean); the VAE runs in its own dtype."""
        assert self.vae is not None, "the VAE is not loaded"
        mean, _ = self.vae.encode(images.to(next(self.vae.parameters()).dtype), tile_size=tile_size)
        return self.vae.to_latents(mean.float())

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] (float32)."""
        assert self.vae is not None, "the VAE is not loaded"
        z = self.vae.from_latents(latents).to(next(self.vae.parameters()).dtype)
        return self.vae.decode(z).float()

    def prefixed_state_dict(self) -> dict[str, Tensor]:
        """Every loaded part's weights under its file prefix."""
        return {self.prefix[name] + k: v for name, module in self.parts().items() for k, v in module.state_dict().items()}
