"""AutoencoderKL of SDXL (4 latent channels) and SD3/3.5 (16 latent channels).

Module names equal the original checkpoint keys under `first_stage_model.` (sgm / ldm
`Encoder` / `Decoder`, Stability-AI/sd3.5 `sd3_impls.VAE`), so loading is a strict
`load_state_dict` with the prefix removed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import attention

# sgm `Normalize`: GroupNorm with 32 groups, eps 1e-6.
NORM_GROUPS = 32
NORM_EPS = 1e-6
# sgm `DiagonalGaussianDistribution`: logvar clamp keeps exp(logvar) finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# Latent constants: SDXL `sd_xl_base.yaml` scale_factor; SD3 `sd3_impls.SD3LatentFormat`.
SDXL_SCALING_FACTOR = 0.13025
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609
# Tiny random-weight presets (tests, demo): chosen so latents of natural images have about unit std,
# like real SDXL / SD3 latents (measured: raw posterior-mean std 0.22 (4 ch) / 0.32 (16 ch) over seeds 0-2).
TINY_SCALING_FACTOR = 4.5
TINY16_SCALING_FACTOR = 3.0
# Fraction of a tile shared with each neighbour in tiled encode: the blend hides the zero-padding
# artefacts at tile borders and the jumps of per-tile GroupNorm statistics.
TILE_OVERLAP = 0.25


@dataclass
class VAEConfig:
    """Hyperparameters of the original `ddconfig` (names as in sgm)."""

    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    use_quant_conv: bool = True
    scaling_factor: float = SDXL_SCALING_FACTOR  # SDXL; SD3: 1.5305
    shift_factor: float = 0.0  # SD3: 0.0609

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each axis (one stride-2 conv per level but the last)."""
        return 2 ** (len(self.ch_mult) - 1)


PRESETS: dict[str, VAEConfig] = {
    "sdxl": VAEConfig(),
    "sd3": VAEConfig(z_channels=16, use_quant_conv=False, scaling_factor=SD3_SCALING_FACTOR, shift_factor=SD3_SHIFT_FACTOR),
    # Tiny test models: four levels keep the 8x downsampling; 32 channels is the GroupNorm minimum.
    "tiny": VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, scaling_factor=TINY_SCALING_FACTOR),
    "tiny16": VAEConfig(
        ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16, use_quant_conv=False,
        scaling_factor=TINY16_SCALING_FACTOR, shift_factor=0.0,
    ),
}


def config_from_shapes(
    shapes: Mapping[str, Sequence[int]], scaling_factor: float | None = None, shift_factor: float | None = None
) -> VAEConfig:
    """Derive the VAEConfig from checkpoint key -> shape (keys without `first_stage_model.`)."""
    required = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight")
    missing = [k for k in required if k not in shapes]
    if missing:
        sample = sorted(shapes)[:5]
        raise ValueError(
            f"not a VAE state dict: missing {missing} (keys must be given without the 'first_stage_model.' prefix; "
            f"first keys seen: {sample})"
        )
    ch, in_channels = int(shapes["encoder.conv_in.weight"][0]), int(shapes["encoder.conv_in.weight"][1])
    z_channels = int(shapes["decoder.conv_in.weight"][1])
    if int(shapes["encoder.conv_out.weight"][0]) != 2 * z_channels:
        raise ValueError(
            f"encoder.conv_out has {shapes['encoder.conv_out.weight'][0]} outputs, expected 2 * z_channels = "
            f"{2 * z_channels} (mean and logvar)"
        )
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"encoder.down.N levels must be numbered 0..N-1, found {levels}")
    ch_mult = tuple(int(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]) // ch for i in levels)
    num_res_blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    use_quant_conv = "quant_conv.weight" in shapes
    structure = (in_channels, ch, ch_mult, num_res_blocks, z_channels, use_quant_conv)
    same = [p for p in PRESETS.values()
            if (p.in_channels, p.ch, p.ch_mult, p.num_res_blocks, p.z_channels, p.use_quant_conv) == structure]
    if scaling_factor is None or shift_factor is None:
        if same:  # a preset's own constants (tiny ones included)
            default_scale, default_shift = same[0].scaling_factor, same[0].shift_factor
        elif z_channels == 16:
            default_scale, default_shift = SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR
        elif z_channels == 4:
            default_scale, default_shift = SDXL_SCALING_FACTOR, 0.0
        else:
            raise ValueError(
                f"no default latent scaling for a {z_channels}-channel VAE (known: 4 = SDXL, 16 = SD3); "
                "pass scaling_factor and shift_factor"
            )
        scaling_factor = default_scale if scaling_factor is None else scaling_factor
        shift_factor = default_shift if shift_factor is None else shift_factor
    return VAEConfig(
        in_channels=in_channels,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        use_quant_conv=use_quant_conv,
        scaling_factor=float(scaling_factor),
        shift_factor=float(shift_factor),
    )


# ---------------------------------------------------------------------------------------------
# Building blocks (sgm `sgm/modules/diffusionmodules/model.py`)
# ---------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm as sgm `Normalize`."""
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without timestep input."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # 1x1 projection of the residual only where the width changes (key `nin_shortcut`).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (keys q, k, v, proj_out)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(p(h), "b c h w -> b 1 (h w) c") for p in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = attention(q, k, v)  # default scale C^-0.5 as the original
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (right/bottom) zero pad, as the original."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution (keys block_1, attn_1, block_2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` list plus an optional `downsample` / `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], downsample: nn.Module | None = None, upsample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample


class Encoder(nn.Module):
    """Images -> 2 * z_channels moments at 1/8 resolution."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width))
                block_in = width
            last = i == len(widths) - 1
            self.down.append(Level(blocks, downsample=None if last else Downsample(block_in)))
        self.mid = MidBlock(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)  # (B, C, H/8, W/8)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, H/8, W/8)


class Decoder(nn.Module):
    """z_channels latents -> images; `up.0` is the full-resolution level (run last)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        levels: list[Level] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[i]))
                block_in = widths[i]
            levels.insert(0, Level(blocks, upsample=Upsample(block_in) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, C, h, w)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 8h, 8w)


# ---------------------------------------------------------------------------------------------
# AutoencoderKL
# ---------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder; state_dict keys equal the original `first_stage_model.*` keys."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
            self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights; inputs are cast to it."""
        return self.encoder.conv_in.weight.dtype

    def _check_images(self, images: Tensor) -> None:
        """Clear errors for inputs the network cannot map to exact latents."""
        f = self.cfg.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.cfg.in_channels:
            raise ValueError(f"images must be [B, {self.cfg.in_channels}, H, W], got {list(images.shape)}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {images.shape[2]}x{images.shape[3]}")

    def _moments(self, images: Tensor) -> Tensor:
        """Images -> concatenated (mean, logvar) before the clamp."""
        h = self.encoder(images.to(self.dtype))
        return self.quant_conv(h) if self.cfg.use_quant_conv else h

    def encode(self, images: Tensor, tile_size: int | None = None) -> tuple[Tensor, Tensor]:
        """images [B,3,H,W] in [-1,1] -> (mean, logvar) of the posterior in the raw latent space [B,z,H/8,W/8].

        tile_size (pixels, multiple of 8) encodes overlapping tiles and blends them, so large images fit in memory.
        """
        self._check_images(images)
        if tile_size is None or (images.shape[2] <= tile_size and images.shape[3] <= tile_size):
            moments = self._moments(images)
        else:
            moments = self._tiled_moments(images, tile_size)
        mean, logvar = moments.chunk(2, dim=1)  # (B, z, H/8, W/8) each
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def _tiled_moments(self, images: Tensor, tile_size: int) -> Tensor:
        """Encode overlapping tiles; overlaps are blended with linear ramps (weights sum to 1 everywhere)."""
        f = self.cfg.downsample_factor
        if tile_size % f or tile_size < 8 * f:
            raise ValueError(f"tile_size must be a multiple of {f} and at least {8 * f} pixels, got {tile_size}")
        overlap = max(f, int(tile_size * TILE_OVERLAP) // f * f)
        b, _, height, width = images.shape
        out = None
        weight_sum = images.new_zeros((1, 1, height // f, width // f), dtype=torch.float32)
        for top, tile_h in _tile_starts(height, tile_size, overlap, f):
            for left, tile_w in _tile_starts(width, tile_size, overlap, f):
                moments = self._moments(images[:, :, top : top + tile_h, left : left + tile_w]).float()
                if out is None:
                    out = moments.new_zeros((b, moments.shape[1], height // f, width // f))
                wy = _ramp(tile_h // f, overlap // f, top > 0, top + tile_h < height, moments.device)
                wx = _ramp(tile_w // f, overlap // f, left > 0, left + tile_w < width, moments.device)
                w = wy[:, None] * wx[None, :]  # (h, w)
                ys, xs = slice(top // f, (top + tile_h) // f), slice(left // f, (left + tile_w) // f)
                out[:, :, ys, xs] += moments * w
                weight_sum[:, :, ys, xs] += w
        assert out is not None
        return (out / weight_sum).to(self.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Raw latents [B,z,h,w] -> images [B,3,8h,8w] in about [-1,1] (not clamped)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.z_channels:
            raise ValueError(f"latents must be [B, {self.cfg.z_channels}, h, w], got {list(z.shape)}")
        z = z.to(self.dtype)
        if self.cfg.use_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def to_latents(self, z: Tensor) -> Tensor:
        """Raw VAE latents -> the diffusion model's latent space: (z - shift) * scale."""
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def from_latents(self, latents: Tensor) -> Tensor:
        """Diffusion latents -> raw VAE latents: latents / scale + shift."""
        return latents / self.cfg.scaling_factor + self.cfg.shift_factor


def _tile_starts(length: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """(start, size) of tiles covering [0, length), evenly spread, starts aligned, overlaps >= about `overlap`."""
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (n - 1)
    return [(round(i * step / align) * align, tile) for i in range(n)]


def _ramp(size: int, ramp: int, fade_start: bool, fade_end: bool, device: torch.device) -> Tensor:
    """1-D blend weight: linear fade over `ramp` latents on sides that overlap a neighbour, 1 at image borders."""
    pos = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(size, device=device)
    if fade_start:
        w = torch.minimum(w, pos / ramp)
    if fade_end:
        w = torch.minimum(w, (size - pos) / ramp)
    return w
