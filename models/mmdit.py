"""MMDiT of SD3-medium, SD3.5-medium (MMDiT-X) and SD3.5-large.

Follows Stability-AI/sd3.5 `mmditx.py`: module attribute names equal the checkpoint keys after
`model.diffusion_model.`, so load/save is `load_state_dict(strict=True)` / `state_dict()`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.attention import attention as sdpa

# Released configs derive width and heads from depth (mmditx.py: "this defines a head_size of 64").
HEAD_DIM = 64
MLP_RATIO = 4.0
# Sinusoidal timestep features fed to t_embedder (mmditx.py TimestepEmbedder default).
FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000.0
# eps of the parameter-free LayerNorms and of the qk RMSNorm (mmditx.py).
NORM_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMDiTConfig:
    """Hyperparameters of one MMDiT; field names as in the sd3.5 reference."""

    depth: int = 24  # hidden_size = 64 * depth, num_heads = depth (released configs)
    patch_size: int = 2
    in_channels: int = 16
    pos_embed_max_size: int = 192
    adm_in_channels: int = 2048
    context_in_dim: int = 4096
    qk_norm: str | None = None  # None | "rms"
    x_block_self_attn_layers: tuple[int, ...] = ()  # MMDiT-X (SD3.5-medium: 0..12)

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"MMDiTConfig.depth must be >= 1, got {self.depth}")
        if self.qk_norm not in (None, "rms"):
            raise ValueError(f"MMDiTConfig.qk_norm must be None or 'rms', got {self.qk_norm!r}")
        object.__setattr__(self, "x_block_self_attn_layers", tuple(sorted(self.x_block_self_attn_layers)))
        bad = [i for i in self.x_block_self_attn_layers if not 0 <= i < self.depth - 1]
        if bad:
            raise ValueError(
                f"x_block_self_attn_layers {bad} out of range: allowed 0..{self.depth - 2} "
                f"(the last block has no attn2)"
            )

    @property
    def hidden_size(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def num_heads(self) -> int:
        return self.depth


PRESETS: dict[str, MMDiTConfig] = {
    "sd3_medium": MMDiTConfig(depth=24),
    "sd35_medium": MMDiTConfig(
        depth=24, pos_embed_max_size=384, qk_norm="rms", x_block_self_attn_layers=tuple(range(13))
    ),
    "sd35_large": MMDiTConfig(depth=38, qk_norm="rms"),
    "tiny": MMDiTConfig(depth=2, pos_embed_max_size=32, context_in_dim=64, adm_in_channels=64),
}
PRESETS["tiny_qk"] = replace(PRESETS["tiny"], qk_norm="rms")
PRESETS["tiny_x"] = replace(PRESETS["tiny_qk"], x_block_self_attn_layers=(0,))


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> list[int]:
    if key not in shapes:
        raise KeyError(f"MMDiT checkpoint lacks '{key}' (keys are expected without 'model.diffusion_model.')")
    return list(shapes[key])


def config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> MMDiTConfig:
    """Derive the config from checkpoint key -> shape (keys without `model.diffusion_model.`)."""
    hidden, in_channels, patch, _ = _shape(shapes, "x_embedder.proj.weight")
    if hidden % HEAD_DIM:
        raise ValueError(f"x_embedder width {hidden} is not a multiple of {HEAD_DIM}: not a released MMDiT layout")
    num_pos, pos_hidden = _shape(shapes, "pos_embed")[1:]
    max_size = math.isqrt(num_pos)
    if max_size * max_size != num_pos or pos_hidden != hidden:
        raise ValueError(f"pos_embed shape {_shape(shapes, 'pos_embed')} is not [1, max^2, {hidden}]")
    depth = hidden // HEAD_DIM
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")}
    if blocks != set(range(depth)):
        raise ValueError(f"checkpoint has joint_blocks {sorted(blocks)}, expected 0..{depth - 1} for width {hidden}")
    return MMDiTConfig(
        depth=depth,
        patch_size=patch,
        in_channels=in_channels,
        pos_embed_max_size=max_size,
        adm_in_channels=_shape(shapes, "y_embedder.mlp.0.weight")[1],
        context_in_dim=_shape(shapes, "context_embedder.weight")[1],
        qk_norm="rms" if any(".attn.ln_q." in k for k in shapes) else None,
        x_block_self_attn_layers=tuple(sorted({int(k.split(".")[1]) for k in shapes if ".attn2." in k})),
    )


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample affine after a parameter-free norm."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (they are absent from the checkpoints)."""
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features [B] -> [B, dim], cos first, computed in fp32 (mmditx.py)."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm over the head dim with a learned scale; statistics in fp32 for bf16 stability."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), NORM_EPS).to(x.dtype)


class MLPEmbedder(nn.Module):
    """Linear-SiLU-Linear embedder (`t_embedder.mlp`, `y_embedder.mlp`)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (`x_embedder.proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b c h w -> b (h w) c")


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Fused qkv projection with optional per-head RMS qk-norm; `proj` absent when pre_only."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, pre_only: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        if qk_norm == "rms":
            self.ln_q = RMSNorm(dim // num_heads)
            self.ln_k = RMSNorm(dim // num_heads)
        else:
            self.ln_q = nn.Identity()
            self.ln_k = nn.Identity()

    def pre_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L, D] -> q, k, v each [B, heads, L, head_dim]."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        return self.ln_q(q), self.ln_k(k), v


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA over [B, heads, L, head_dim] -> [B, L, heads * head_dim]."""
    return rearrange(sdpa(q, k, v), "b h l d -> b l (h d)")


class DismantledBlock(nn.Module):
    """One stream (context or x) of a joint block: adaLN-Zero modulated attention + MLP."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, self_attn2: bool = False) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.pre_only = pre_only
        self.self_attn2 = self_attn2
        # pre_only (last context block): shift, scale; normal: + gate_msa, shift/scale/gate_mlp;
        # MMDiT-X: + shift/scale/gate of attn2.
        self.n_mods = 2 if pre_only else 9 if self_attn2 else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mods * dim))
        self.attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, pre_only=pre_only)
        if self_attn2:
            self.attn2 = SelfAttention(dim, cfg.num_heads, cfg.qk_norm)
        if not pre_only:
            self.mlp = Mlp(dim, int(dim * MLP_RATIO))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], list[Tensor]]:
        """Modulated qkv of the joint attention and the modulation terms for post_attention."""
        mods = list(self.adaLN_modulation(c).chunk(self.n_mods, dim=1))  # each [B, D]
        return self.attn.pre_attention(modulate(layer_norm(x), mods[0], mods[1])), mods

    def post_attention(self, x: Tensor, attn: Tensor, mods: list[Tensor]) -> Tensor:
        """Residual attention (+ MMDiT-X self-attention) and MLP, gated."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if self.self_attn2:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            # attn2 reads the block input (normed before the joint-attention residual), as in mmditx.py.
            q2, k2, v2 = self.attn2.pre_attention(modulate(layer_norm(x), shift_msa2, scale_msa2))
            attn2 = self.attn2.proj(attention(q2, k2, v2))
            x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn) + gate_msa2.unsqueeze(1) * attn2
        else:
            x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Context and image tokens attend jointly, each stream keeps its own weights."""

    def __init__(self, cfg: MMDiTConfig, index: int) -> None:
        super().__init__()
        self.context_block = DismantledBlock(cfg, pre_only=index == cfg.depth - 1)
        self.x_block = DismantledBlock(cfg, self_attn2=index in cfg.x_block_self_attn_layers)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        n_ctx = context.shape[1]
        (cq, ck, cv), c_mods = self.context_block.pre_attention(context, c)  # [B, H, T, d]
        (xq, xk, xv), x_mods = self.x_block.pre_attention(x, c)  # [B, H, N, d]
        attn = attention(torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2))  # [B, T+N, D]
        x = self.x_block.post_attention(x, attn[:, n_ctx:], x_mods)
        # The last context block only feeds keys/values; its own output is discarded.
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, attn[:, :n_ctx], c_mods), x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to patch pixels."""

    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """SD3 / SD3.5 multimodal diffusion transformer predicting the flow velocity."""

    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        dim = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, dim)
        self.t_embedder = MLPEmbedder(FREQUENCY_EMBEDDING_SIZE, dim)
        self.y_embedder = MLPEmbedder(cfg.adm_in_channels, dim)
        self.context_embedder = nn.Linear(cfg.context_in_dim, dim)
        # Stored in the checkpoint (fixed 2D sin-cos table), cropped around the centre per bucket.
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size**2, dim))
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        # On the meta device there is nothing to fill: a meta build stays free (weights come by assign-load).
        if not any(t.is_meta for t in self.parameters()):
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Random-weight init as DiT `initialize_weights`, pos_embed = the fixed 2D sin-cos table of mmditx.py."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # Patch embedding initialised like an nn.Linear over the flattened patch (DiT). DiT leaves the
        # bias at Conv2d's default; we zero it so every tensor is set here (meta -> to_empty -> init).
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Timestep MLP: small normal init (DiT).
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Unlike DiT (adaLN-Zero), the adaLN modulations and the final layer are NOT zeroed: a zeroed
        # network outputs a constant from random weights, and the tiny demo/tests need outputs that
        # depend on x, t, y and context. Fine-tuning always starts from a checkpoint anyway.

        # mmditx.py get_2d_sincos_pos_embed(hidden, pos_embed_max_size) with scaling_factor=offset=None
        # (the released configs): integer grid positions; for the token at row i, column j the first
        # half of the channels encodes j and the second half i (the reference's meshgrid puts w first),
        # each half = [sin(pos * omega), cos(pos * omega)], omega_k = 10000^(-k / (D/4)), in float64.
        m, dim = self.cfg.pos_embed_max_size, self.cfg.hidden_size
        quarter = dim // 4
        omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
        args = torch.arange(m, dtype=torch.float64)[:, None] * omega[None]  # [m, D/4]
        emb_1d = torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(self.pos_embed)  # [m, D/2]
        cols = emb_1d[None, :, :].expand(m, m, dim // 2)  # [i, j] -> emb_1d[j]
        rows = emb_1d[:, None, :].expand(m, m, dim // 2)  # [i, j] -> emb_1d[i]
        self.pos_embed.copy_(rearrange(torch.cat([cols, rows], dim=2), "h w c -> 1 (h w) c"))

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """Centre crop of the [max, max] table for an h x w patch grid -> [1, h*w, D]."""
        m = self.cfg.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        grid = rearrange(self.pos_embed, "1 (h w) c -> 1 h w c", h=m, w=m)
        return rearrange(grid[:, top : top + h, left : left + w], "1 h w c -> 1 (h w) c")

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor, context: Tensor) -> None:
        cfg = self.cfg
        p, m = cfg.patch_size, cfg.pos_embed_max_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        b, _, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} must be a multiple of patch_size {p}")
        if h // p > m or w // p > m:
            raise ValueError(f"latent size {h}x{w} exceeds pos_embed_max_size * patch_size = {m * p}")
        if t.shape != (b,):
            raise ValueError(f"t must be [B]={b} (sigma * 1000), got {list(t.shape)}")
        if y.shape != (b, cfg.adm_in_channels):
            raise ValueError(f"y must be [{b}, {cfg.adm_in_channels}], got {list(y.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_in_dim:
            raise ValueError(f"context must be [{b}, T, {cfg.context_in_dim}], got {list(context.shape)}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor, context: Tensor) -> Tensor:
        """x [B,C,H,W] latents, t [B] = sigma*1000, y [B,adm], context [B,T,ctx] -> velocity [B,C,H,W]."""
        self._check_inputs(x, t, y, context)
        p = self.cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        dtype = self.x_embedder.proj.weight.dtype
        x = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(h, w).to(dtype)  # [B, N, D]
        c = self.t_embedder(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE).to(dtype))  # [B, D]
        c = c + self.y_embedder(y.to(dtype))  # [B, D]
        ctx: Tensor | None = self.context_embedder(context.to(dtype))  # [B, T, D]
        for block in self.joint_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                ctx, x = checkpoint(block, ctx, x, c, use_reentrant=False)
            else:
                ctx, x = block(ctx, x, c)
        x = self.final_layer(x, c)  # [B, N, p*p*C]
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)
