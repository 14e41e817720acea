"""SDXL UNet: the sgm `UNetModel` (Stability-AI/generative-models) in its SDXL configuration.

Module attribute names equal the checkpoint keys after the `model.diffusion_model.` prefix, so
loading a single-file checkpoint is `load_state_dict(strict=True)` on the prefix-stripped keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.attention import attention

# sgm `normalization()`: GroupNorm32 with 32 groups; ResBlocks use eps 1e-5, SpatialTransformer 1e-6.
NORM_GROUPS = 32
RES_NORM_EPS = 1e-5
ATTN_NORM_EPS = 1e-6
# sgm UNetModel: time_embed_dim = model_channels * 4.
TIME_EMBED_MULT = 4
# sgm FeedForward(glu=True): inner dim = 4 * dim.
FF_MULT = 4


# ---------------------------------------------------------------- config


@dataclass
class UNetConfig:
    """Hyperparameters of the sgm UNetModel (field names as in `sd_xl_base.yaml`)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    # transformer blocks per attention layer at each level; 0 = no attention at that level
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    transformer_depth_middle: int = 10
    num_head_channels: int = 64
    context_dim: int = 2048
    adm_in_channels: int = 2816

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.transformer_depth = tuple(self.transformer_depth)
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth {self.transformer_depth} needs one entry per level of "
                f"channel_mult {self.channel_mult}"
            )
        for mult, depth in zip(self.channel_mult, self.transformer_depth):
            ch = self.model_channels * mult
            if ch % NORM_GROUPS:
                raise ValueError(f"level width {ch} must be a multiple of {NORM_GROUPS} (GroupNorm groups)")
            if depth and ch % self.num_head_channels:
                raise ValueError(f"level width {ch} is not a multiple of num_head_channels={self.num_head_channels}")


TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(0, 1, 1),
                  transformer_depth_middle=1, num_head_channels=8, context_dim=64, adm_in_channels=32 + 6 * 256)
# Two levels, one res block each: the fewest tensors with SDXL's structure (tests of distributed paths, where the
# cost is per tensor, not per parameter).
MICRO = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                   transformer_depth_middle=1, num_head_channels=8, context_dim=64, adm_in_channels=32 + 6 * 256)
PRESETS: dict[str, UNetConfig] = {"base": UNetConfig(), "tiny": TINY, "micro": MICRO}


# ---------------------------------------------------------------- embeddings


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """sgm sinusoidal embedding, cos first; [N] -> [N, dim] (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # sgm pads odd dims with a zero column
        emb = F.pad(emb, (0, 1))
    return emb


# ---------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding added in between (no scale-shift norm in SDXL)."""

    def __init__(self, ch: int, emb_ch: int, out_ch: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, ch, RES_NORM_EPS), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        # index 2 is Dropout in sgm; keeping it keeps `out_layers.3` as the checkpoint key.
        self.out_layers = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, out_ch, RES_NORM_EPS), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)  # (B, out, H, W)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Strided 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention; keys/values from `context` (cross) or from `x` (self)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(p, "b n (h d) -> b h n d", h=self.heads)
                   for p in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v)  # (B, heads, N, head_dim); scale = head_dim**-0.5
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Linear to 2x inner, value * gelu(gate) (exact gelu as in sgm)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP; `net.1` is Dropout in sgm, kept so the output layer is `net.2`."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * FF_MULT), nn.Dropout(0.0), nn.Linear(dim * FF_MULT, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, HW, C)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, linear proj_in, transformer blocks over the H*W tokens, linear proj_out, residual."""

    def __init__(self, ch: int, depth: int, context_dim: int, head_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(NORM_GROUPS, ch, ATTN_NORM_EPS)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ch, context_dim, ch // head_dim, head_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        _, _, h, w = x.shape
        t = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))  # (B, HW, C)
        for block in self.transformer_blocks:
            t = block(t, context)
        return x + rearrange(self.proj_out(t), "b (h w) c -> b c h w", h=h, w=w)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands `emb` to ResBlocks and `context` to SpatialTransformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------- model


class UNet(nn.Module):
    """The SDXL UNet: eps/v prediction from (x, timesteps, context, y)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mc, hd, cd = cfg.model_channels, cfg.num_head_channels, cfg.context_dim
        emb_ch = mc * TIME_EMBED_MULT
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        # sgm num_classes="sequential": label_emb is a Sequential wrapping one MLP, hence `label_emb.0.0`.
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch = [mc], mc
        for level, (mult, depth) in enumerate(zip(cfg.channel_mult, cfg.transformer_depth)):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, mc * mult)]
                ch = mc * mult
                if depth:
                    layers.append(SpatialTransformer(ch, depth, cd, hd))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_ch, ch),
            SpatialTransformer(ch, cfg.transformer_depth_middle, cd, hd),
            ResBlock(ch, emb_ch, ch),
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            mult, depth = cfg.channel_mult[level], cfg.transformer_depth[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_ch, mc * mult)]
                ch = mc * mult
                if depth:
                    layers.append(SpatialTransformer(ch, depth, cd, hd))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, ch, RES_NORM_EPS), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1)
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Variance-preserving normal init; output convs are NOT zeroed (real weights come from checkpoints)."""
        if self.out[2].weight.is_meta:  # shapes only (loading, key checks): nothing to draw
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=(m.weight[0].numel()) ** -0.5)  # std = fan_in^-1/2
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_inputs(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor) -> None:
        """Fail early with a readable message instead of a shape error deep inside the network."""
        cfg, down = self.cfg, 2 ** (len(self.cfg.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        if x.shape[2] % down or x.shape[3] % down:
            raise ValueError(f"latent H and W must be multiples of {down}, got {x.shape[2]}x{x.shape[3]}")
        b = x.shape[0]
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must be [B]=[{b}], got {list(timesteps.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be [B={b}, T, {cfg.context_dim}], got {list(context.shape)}")
        if y.shape != (b, cfg.adm_in_channels):
            raise ValueError(f"y must be [B={b}, {cfg.adm_in_channels}], got {list(y.shape)}")

    def _run(self, block: nn.Module, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor) -> Tensor:
        """x [B, C, H, W], timesteps [B] (0..999), context [B, T, context_dim], y [B, adm] -> [B, out, H, W]."""
        self._check_inputs(x, timesteps, context, y)
        dtype = self.time_embed[0].weight.dtype  # pure-half weights need half inputs; under autocast this is fp32
        x, context, y = x.to(dtype), context.to(dtype), y.to(dtype)
        # The sinusoid is computed in fp32: half precision cannot resolve timesteps near 1000.
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(dtype)  # (B, mc)
        emb = self.time_embed(t_emb) + self.label_emb(y)  # (B, 4 mc)

        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)  # (B, C_max, H/2^L, W/2^L)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)  # (B, out_channels, H, W)


# ---------------------------------------------------------------- config from checkpoint shapes


def _count(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    """Number of transformer blocks under `prefix.transformer_blocks.N`."""
    ids = {k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)}
    return len(ids)


def config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> UNetConfig:
    """Infer the config from key->shape (keys WITHOUT the model.diffusion_model. prefix).

    Raises ValueError with a clear message if the layout is not an SDXL UNet.

    `num_head_channels` does not show in any weight shape: it is taken from the preset whose
    shape-derived fields match, else sgm's SDXL value 64.
    """
    required = ("input_blocks.0.0.weight", "out.2.weight", "label_emb.0.0.weight", "time_embed.0.weight",
                "middle_block.1.proj_in.weight", "input_blocks.1.0.in_layers.2.weight")
    missing = [k for k in required if k not in shapes]
    if missing:
        sample = sorted(shapes)[:3]
        raise ValueError(f"not an SDXL (sgm) UNet state dict: missing {missing} (keys must have the "
                         f"'model.diffusion_model.' prefix removed; first keys given: {sample})")
    try:
        mc = int(shapes["input_blocks.0.0.weight"][0])
        # Walk the input blocks: ResBlocks until a Downsample (`.0.op`) closes a level.
        chans: list[int] = []
        depths: list[int] = []
        res_per_level: list[int] = []
        i, n_res = 1, 0
        while f"input_blocks.{i}.0.op.weight" in shapes or f"input_blocks.{i}.0.in_layers.2.weight" in shapes:
            if f"input_blocks.{i}.0.op.weight" in shapes:
                res_per_level.append(n_res)
                n_res = 0
            else:
                if n_res == 0:
                    chans.append(int(shapes[f"input_blocks.{i}.0.in_layers.2.weight"][0]))
                    depths.append(_count(shapes, f"input_blocks.{i}.1.transformer_blocks."))
                n_res += 1
            i += 1
        res_per_level.append(n_res)
        if len(set(res_per_level)) != 1 or any(c % mc for c in chans):
            raise ValueError(f"irregular level layout: res blocks per level {res_per_level}, widths {chans}")
        shape_cfg = UNetConfig(
            in_channels=int(shapes["input_blocks.0.0.weight"][1]),
            out_channels=int(shapes["out.2.weight"][0]),
            model_channels=mc,
            channel_mult=tuple(c // mc for c in chans),
            num_res_blocks=res_per_level[0],
            transformer_depth=tuple(depths),
            transformer_depth_middle=_count(shapes, "middle_block.1.transformer_blocks."),
            num_head_channels=NORM_GROUPS,  # placeholder that divides every width; replaced below
            context_dim=int(shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]),
            adm_in_channels=int(shapes["label_emb.0.0.weight"][1]),
        )
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"not an SDXL (sgm) UNet layout: {e}") from e

    head_channels = 64  # sgm sd_xl_base.yaml num_head_channels
    shape_fields = [f.name for f in fields(UNetConfig) if f.name != "num_head_channels"]
    for preset in PRESETS.values():
        if all(getattr(preset, n) == getattr(shape_cfg, n) for n in shape_fields):
            head_channels = preset.num_head_channels
    cfg = replace(shape_cfg, num_head_channels=head_channels)

    # Verify every key and shape against a model built on the meta device (free: no memory).
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    got = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [f"{k}: {list(got[k])} != expected {list(v)}" for k, v in expected.items() if k in got and got[k] != v]
    if problems:
        raise ValueError(
            f"state dict does not match an SDXL UNet with {cfg}: {len(problems)} problems, e.g. {problems[:5]}"
        )
    return cfg
