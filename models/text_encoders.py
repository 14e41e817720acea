"""CLIP text encoders of SDXL and SD3: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (a.k.a. CLIP-G).

Two module trees, one per naming convention found in the released files, so that
`load_state_dict(strict=True)` works after removing the file prefix:

- `CLIPTextModel`: Hugging Face naming (`text_model.encoder.layers.N.self_attn.q_proj`, ...).
  SDXL `conditioner.embedders.0.transformer.` (CLIP-L), SD3 `text_encoders.clip_l.transformer.` /
  `text_encoders.clip_g.transformer.`, ComfyUI `clip_l.safetensors` / `clip_g.safetensors` (no prefix).
- `OpenCLIPTextModel`: open_clip naming (`transformer.resblocks.N.attn.in_proj_weight`, ...).
  SDXL `conditioner.embedders.1.model.` (bigG).

Both share the block-running code (`_run_blocks`), the attention kernel and the pooling rule;
only the parameter layout differs. Ignorable extras in files: `text_model.embeddings.position_ids`
(HF) and `logit_scale` (open_clip), see `IGNORABLE_KEYS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import attention

# LayerNorm epsilon of both OpenAI CLIP / HF CLIPTextConfig (layer_norm_eps) and open_clip's LayerNorm.
LN_EPS = 1e-5
# Head width of every released CLIP text tower (768 / 12 heads, 1280 / 20 heads); heads are not
# recorded in the weights, so config_from_shapes derives them from this.
HEAD_DIM = 64
# OpenAI CLIP's QuickGELU: x * sigmoid(1.702 x).
QUICK_GELU_COEF = 1.702
ACTIVATIONS = ("quick_gelu", "gelu")

# Keys that appear in released files but are not parameters (file-prefix removed).
IGNORABLE_KEYS: dict[str, frozenset[str]] = {
    "hf": frozenset({"text_model.embeddings.position_ids"}),  # int buffer, arange(77)
    "open_clip": frozenset({"logit_scale"}),  # contrastive temperature, unused for text features
}


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of a CLIP text transformer (field names as in HF CLIPTextConfig where possible)."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    act: str = "quick_gelu"  # CLIP-L: quick_gelu; bigG / CLIP-G: gelu (exact erf form)
    projection_dim: int | None = None  # bigG / CLIP-G: 1280; CLIP-L in SD files: none

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig.act={self.act!r}; allowed: {ACTIVATIONS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"CLIPTextConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"CLIPTextConfig.{name} must be >= 1, got {getattr(self, name)}")


PRESETS: dict[str, CLIPTextConfig] = {
    # openai/clip-vit-large-patch14 text tower (SDXL embedder 0, SD3 clip_l).
    "clip_l": CLIPTextConfig(),
    # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower (SDXL embedder 1, SD3 clip_g).
    "bigg": CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, act="gelu", projection_dim=1280
    ),
    "clip_g": CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, act="gelu", projection_dim=1280
    ),
    # Test configurations.
    "tiny_l": CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, act="quick_gelu"),
    "tiny_g": CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, act="gelu", projection_dim=32
    ),
}

# Per naming: key of token embedding, position embedding, layer-index pattern, first MLP weight
# ([intermediate, hidden]) of layer 0, projection key and whether the projection is stored [in, out].
_NAMING = {
    "hf": dict(
        tok="text_model.embeddings.token_embedding.weight",
        pos="text_model.embeddings.position_embedding.weight",
        layer=re.compile(r"^text_model\.encoder\.layers\.(\d+)\."),
        fc="text_model.encoder.layers.0.mlp.fc1.weight",
        proj="text_projection.weight",  # nn.Linear weight [out, in]
        proj_in_out=False,
    ),
    "open_clip": dict(
        tok="token_embedding.weight",
        pos="positional_embedding",
        layer=re.compile(r"^transformer\.resblocks\.(\d+)\."),
        fc="transformer.resblocks.0.mlp.c_fc.weight",
        proj="text_projection",  # raw matrix [in, out], applied as x @ text_projection
        proj_in_out=True,
    ),
}


def config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    naming: str,
    *,
    act: str | None = None,
    num_heads: int | None = None,
) -> CLIPTextConfig:
    """Derive the config from a checkpoint's key -> shape map (keys without the file prefix).

    naming: "hf" (CLIPTextModel) or "open_clip" (OpenCLIPTextModel). The weights do not record the
    activation or the head count: `act` defaults to quick_gelu for width 768 (OpenAI CLIP-L) and gelu
    otherwise (bigG / CLIP-G); `num_heads` defaults to hidden_size // 64 (all released CLIP towers).
    A projection key present gives projection_dim (e.g. ComfyUI clip_l.safetensors carries a
    768x768 `text_projection.weight`; SD3 does not apply it, see `forward(project=False)`).
    """
    if naming not in _NAMING:
        raise ValueError(f"naming={naming!r}; allowed: {sorted(_NAMING)}")
    n = _NAMING[naming]
    for key in (n["tok"], n["pos"], n["fc"]):
        if key not in shapes:
            sample = ", ".join(sorted(shapes)[:3])
            raise ValueError(
                f"key {key!r} missing for naming={naming!r}; keys must have the file prefix removed "
                f"(e.g. 'conditioner.embedders.0.transformer.'). First keys given: {sample}"
            )
    vocab_size, hidden_size = (int(s) for s in shapes[n["tok"]])
    max_positions = int(shapes[n["pos"]][0])
    intermediate_size = int(shapes[n["fc"]][0])
    indices = sorted({int(m.group(1)) for k in shapes if (m := n["layer"].match(k))})
    if indices != list(range(len(indices))):
        raise ValueError(f"layer indices are not contiguous from 0: {indices}")
    projection_dim = None
    if n["proj"] in shapes:
        p = [int(s) for s in shapes[n["proj"]]]
        in_dim, projection_dim = (p[0], p[1]) if n["proj_in_out"] else (p[1], p[0])
        if in_dim != hidden_size:
            raise ValueError(f"{n['proj']} shape {p} does not match hidden_size {hidden_size}")
    # act and num_heads are not in the weights: a preset with the same shapes decides (tiny presets
    # included, so tiny checkpoints reload as they were built), else the released towers' rules.
    same = [c for c in PRESETS.values() if (c.vocab_size, c.hidden_size, c.max_position_embeddings,
            c.intermediate_size, c.num_layers, c.projection_dim) == (vocab_size, hidden_size, max_positions,
                                                                     intermediate_size, len(indices), projection_dim)]
    if same and act is None and (num_heads is None or num_heads == same[0].num_heads):
        act = same[0].act
    if same and num_heads is None:
        num_heads = same[0].num_heads
    if act is None:
        act = "quick_gelu" if hidden_size == 768 else "gelu"
    if num_heads is None:
        if hidden_size % HEAD_DIM:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of {HEAD_DIM}; pass num_heads explicitly")
        num_heads = hidden_size // HEAD_DIM
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=len(indices),
        num_heads=num_heads,
        act=act,
        projection_dim=projection_dim,
    )


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _activation(x: Tensor, act: str) -> Tensor:
    """Apply the MLP nonlinearity named in the config."""
    if act == "quick_gelu":
        return x * torch.sigmoid(QUICK_GELU_COEF * x)
    return F.gelu(x)  # exact erf GELU, as nn.GELU() in open_clip and "gelu" in HF


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """Multi-head causal self-attention on projected q, k, v of shape (B, T, C)."""
    q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=num_heads) for t in (q, k, v))
    x = attention(q, k, v, is_causal=True)  # (B, H, T, D); scale D^-0.5 as CLIP
    return rearrange(x, "b h t d -> b t (h d)")


def _check_input_ids(input_ids: Tensor, cfg: CLIPTextConfig) -> None:
    """Reject inputs the model cannot embed, with a message saying what is allowed."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor (int64/int32), got {input_ids.dtype}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens, at most {cfg.max_position_embeddings}; "
            f"encode long prompts (max_token_length 150/225) one {cfg.max_position_embeddings}-token chunk at a time"
        )


def _hidden_index(layer: int, num_layers: int) -> int:
    """Map HF hidden_states indexing (0 = embeddings, -1 = last layer) to 0..num_layers."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(
            f"layer={layer} out of range for {num_layers} layers; allowed {-(num_layers + 1)}..{num_layers} "
            "(hidden_states indexing: 0 = embeddings, -1 = last layer, -2 = penultimate)"
        )
    return layer % (num_layers + 1)


def _run_blocks(x: Tensor, blocks: nn.ModuleList, layer: int) -> tuple[Tensor, Tensor]:
    """Run all blocks; return (hidden_states[layer], last block output)."""
    index = _hidden_index(layer, len(blocks))
    hidden = x
    for i, block in enumerate(blocks, start=1):
        x = block(x)  # (B, T, C)
        if i == index:
            hidden = x
    return hidden, x


def _eot_features(x: Tensor, input_ids: Tensor) -> Tensor:
    """Features at the end-of-text position: the largest token id (49407) in each row, first occurrence."""
    eot = input_ids.argmax(dim=-1)  # (B,) as open_clip pool_type="argmax" and HF eos_token_id==2 legacy path
    return x[torch.arange(x.shape[0], device=x.device), eot]  # (B, C)


# ----------------------------------------------------------------------------------------------
# Hugging Face naming
# ----------------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
    """Self-attention with separate q/k/v projections (HF naming)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        x = _causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)  # (B, T, C)
        return self.out_proj(x)


class CLIPMLP(nn.Module):
    """Two-layer MLP (HF naming)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = cfg.act
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_activation(self.fc1(x), self.act))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block (HF naming)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, T, C)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """Stack of encoder layers (HF naming: `encoder.layers.N`)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers))


class CLIPEmbeddings(nn.Module):
    """Token + learned absolute position embeddings; no position_ids buffer (files carry it as an extra)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:t]  # (B, T, C)


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder and final LayerNorm (HF `text_model`)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)


class CLIPTextModel(nn.Module):
    """CLIP text tower in Hugging Face naming (CLIP-L of SDXL/SD3, CLIP-G of SD3 / ComfyUI files)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = (
            nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False) if cfg.projection_dim is not None else None
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's initialisation of embeddings (Linear/LayerNorm keep torch defaults); weights normally come from a file."""
        nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.01)

    def forward(self, input_ids: Tensor, layer: int = -2, *, project: bool = True) -> tuple[Tensor, Tensor]:
        """input_ids [B, T<=77] -> (hidden_states[layer] [B, T, C] without final LN, pooled [B, P]).

        pooled = final_layer_norm(last layer) at argmax(input_ids), times text_projection when the model
        has one and `project` is set (SD3 uses CLIP-L pooled unprojected even where the file has one).
        """
        _check_input_ids(input_ids, self.cfg)
        tm = self.text_model
        x = tm.embeddings(input_ids)  # (B, T, C)
        hidden, last = _run_blocks(x, tm.encoder.layers, layer)  # (B, T, C) each
        pooled = tm.final_layer_norm(_eot_features(last, input_ids))  # (B, C)
        if project and self.text_projection is not None:
            pooled = self.text_projection(pooled)  # (B, P)
        return hidden, pooled


# ----------------------------------------------------------------------------------------------
# open_clip naming
# ----------------------------------------------------------------------------------------------


class OpenCLIPAttention(nn.Module):
    """Self-attention with a fused in-projection, named as torch.nn.MultiheadAttention (open_clip)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * c))
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, C)
        return self.out_proj(_causal_attention(q, k, v, self.num_heads))


class OpenCLIPMLP(nn.Module):
    """Two-layer MLP (open_clip naming `c_fc`, `c_proj`)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = cfg.act
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(_activation(self.c_fc(x), self.act))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block (open_clip naming)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.attn = OpenCLIPAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.mlp = OpenCLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    """Stack of residual blocks (open_clip naming: `transformer.resblocks.N`)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.num_layers))


class OpenCLIPTextModel(nn.Module):
    """CLIP text tower in open_clip naming (bigG of SDXL); same forward contract as CLIPTextModel."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, c)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_position_embeddings, c))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(c, eps=LN_EPS)
        # Stored [in, out] and applied as x @ text_projection (open_clip), unlike an nn.Linear weight.
        self.text_projection = (
            nn.Parameter(torch.empty(c, cfg.projection_dim)) if cfg.projection_dim is not None else None
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """open_clip's TextTransformer.init_parameters stds; weights normally come from a file."""
        c, n = self.cfg.hidden_size, self.cfg.num_layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=c**-0.5)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=c**-0.5 * (2 * n) ** -0.5)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=c**-0.5)

    def forward(self, input_ids: Tensor, layer: int = -2, *, project: bool = True) -> tuple[Tensor, Tensor]:
        """input_ids [B, T<=77] -> (hidden_states[layer] [B, T, C] without ln_final, pooled [B, P]).

        pooled = ln_final(last layer) at argmax(input_ids) @ text_projection (when present and `project`).
        """
        _check_input_ids(input_ids, self.cfg)
        t = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:t]  # (B, T, C)
        hidden, last = _run_blocks(x, self.transformer.resblocks, layer)  # (B, T, C) each
        pooled = self.ln_final(_eot_features(last, input_ids))  # (B, C)
        if project and self.text_projection is not None:
            pooled = pooled @ self.text_projection  # (B, P)
        return hidden, pooled
