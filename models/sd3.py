"""The SD3 / SD3.5 family: MMDiT, 16-channel VAE, CLIP-L + CLIP-G + T5-XXL, and the file layout.

Text conditioning follows the SD3 reference code (CONVENTIONS.md): CLIP-L and CLIP-G penultimate
hidden states (no final LN) concatenated to [77, 2048], zero-padded to T5's width, then
concatenated on the token axis with T5-XXL's last layer; pooled `y` = CLIP-L pooled (not
projected) ++ CLIP-G pooled projected. T5 tokens are padded to exactly `t5_max_token_length`
(>= 77; the reference uses 77, diffusers 256) so every caption yields the same context length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import mmdit as mmdit_mod
from models import t5 as t5_mod
from models import text_encoders as te_mod
from models import vae as vae_mod
from models.tokenizers import EOT, CLIPTokenizer

PREFIX = {
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}
# Harmless extras: tied T5 embedding, position ids, and CLIP-L's projection in ComfyUI files
# (the SD3 reference does not project CLIP-L's pooled output).
IGNORE = ("*.position_ids", "text_projection.weight", "denoiser.sigmas")
T5_TIED = "encoder.embed_tokens.weight"
ALIASES = {"t5": {T5_TIED: "shared.weight"}}  # tied: files may store only one of the two
CLIP_TOKENS = 77
DEFAULT_CONTEXT_DIM = 4096  # T5-XXL width = MMDiT context_in_dim of the released models
CONTEXT_EMBEDDER = "model.diffusion_model.context_embedder.weight"
DEFAULT_SHIFT = 3.0  # inference sigma shift of the released models (CONVENTIONS.md)

PRESETS = {
    "sd3_medium": ("sd3_medium", "sd3", "clip_l", "bigg", "xxl"),
    "sd35_medium": ("sd35_medium", "sd3", "clip_l", "bigg", "xxl"),
    "sd35_large": ("sd35_large", "sd3", "clip_l", "bigg", "xxl"),
    "tiny": ("tiny", "tiny16", "tiny_l", "tiny_g", "tiny"),
}
ARCHITECTURE = {"sd3_medium": "stable-diffusion-v3-medium", "sd35_medium": "stable-diffusion-v3.5-medium",
                "sd35_large": "stable-diffusion-v3.5-large"}


@dataclass
class SD3:
    """SD3 components. `mmdit` is the trained network; text encoders may be None (T5 optional)."""
    mmdit: mmdit_mod.MMDiT | None
    vae: vae_mod.AutoencoderKL | None
    clip_l: te_mod.CLIPTextModel | None
    clip_g: te_mod.CLIPTextModel | None
    t5: t5_mod.T5Encoder | None
    t5_tokenizer: t5_mod.T5Tokenizer | None = None
    t5_max_token_length: int = 256
    shift: float = DEFAULT_SHIFT
    extras: dict[str, Tensor] = field(default_factory=dict)
    family: str = "sd3"
    tokenizer: CLIPTokenizer = field(default_factory=CLIPTokenizer)
    context_dim: int = DEFAULT_CONTEXT_DIM  # MMDiT context_in_dim (= T5 width); CLIP features are zero-padded to it
    v_parameterization: bool = False  # unused (flow matching); kept for a uniform interface

    @property
    def network(self) -> nn.Module:
        assert self.mmdit is not None
        return self.mmdit

    def text_encoders(self) -> dict[str, nn.Module]:
        return {k: m for k, m in (("clip_l", self.clip_l), ("clip_g", self.clip_g), ("t5", self.t5)) if m is not None}

    # -- conditioning --------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        out = {"ids_l": self.tokenizer(captions, pad_token=EOT), "ids_g": self.tokenizer(captions, pad_token=0)}
        if self.t5_tokenizer is not None:
            out["ids_t5"] = self.t5_tokenizer(captions, min_length=self.t5_max_token_length, max_length=self.t5_max_token_length)
        return out

    def encode_text(self, captions: Sequence[str], device: torch.device | str | None = None) -> dict[str, Tensor]:
        """captions -> context [B, 77 + L, C] and pooled [B, 2048] (L = t5_max_token_length)."""
        assert self.clip_l is not None and self.clip_g is not None, "CLIP text encoders are not loaded"
        dev = device if device is not None else next(self.clip_l.parameters()).device
        tok = self.tokenize(captions)
        hl, pl = self.clip_l(tok["ids_l"].to(dev), layer=-2)             # (B, 77, 768), (B, 768)
        hg, pg = self.clip_g(tok["ids_g"].to(dev), layer=-2)             # (B, 77, 1280), (B, 1280)
        clip_ctx = torch.cat([hl, hg.to(hl.dtype)], dim=-1)              # (B, 77, 2048)
        clip_ctx = F.pad(clip_ctx, (0, self.context_dim - clip_ctx.shape[-1]))  # (B, 77, C)
        if self.t5 is not None and self.t5_tokenizer is not None:
            t5_out = self.t5(tok["ids_t5"].to(dev)).to(clip_ctx.dtype)   # (B, L, C)
        else:  # T5 left out: zeros in its place, as the reference allows
            t5_out = clip_ctx.new_zeros(clip_ctx.shape[0], self.t5_max_token_length, self.context_dim)
        return {"context": torch.cat([clip_ctx, t5_out], dim=1), "pooled": torch.cat([pl, pg.to(pl.dtype)], dim=-1)}

    def conditioning(self, text: dict[str, Tensor], original_size: Tensor | None = None,
                     crop_top_left: Tensor | None = None, target_size: Tensor | None = None) -> dict[str, Tensor]:
        """Network keyword inputs (SD3 does not condition on sizes)."""
        return {"context": text["context"], "y": text["pooled"]}

    def uncond_text(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        """The SD3 reference encodes the (empty) negative prompt; callers pass it through encode_text.
        This zero version is used only for caption dropout of cached embeddings."""
        return {k: torch.zeros_like(v) for k, v in text.items()}

    def collate_cached_text(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in ("context", "pooled")}

    # -- latents -------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, tile_size: int | None = None) -> Tensor:
        assert self.vae is not None
        mean, _ = self.vae.encode(images.to(next(self.vae.parameters()).dtype), tile_size=tile_size)
        return self.vae.to_latents(mean.float())

    def decode_latents(self, latents: Tensor) -> Tensor:
        assert self.vae is not None
        z = self.vae.from_latents(latents).to(next(self.vae.parameters()).dtype)
        return self.vae.decode(z).float()

    def sample_schedule(self):
        from core.sampling import FlowSchedule
        return FlowSchedule(shift=self.shift)

    # -- file layout ---------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        return {k: m for k, m in (("mmdit", self.mmdit), ("vae", self.vae), ("clip_l", self.clip_l),
                                  ("clip_g", self.clip_g), ("t5", self.t5)) if m is not None}

    def export_state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, module in self.parts().items():
            for k, v in module.state_dict().items():
                out[PREFIX[name] + k] = v
        if self.t5 is not None and PREFIX["t5"] + T5_TIED not in out:
            out[PREFIX["t5"] + T5_TIED] = out[PREFIX["t5"] + "shared.weight"]  # tied copy, as in the released files
        return out

    def modelspec(self) -> dict[str, str]:
        preset = "sd3_medium"
        if self.mmdit is not None:
            c = self.mmdit.cfg
            preset = "sd35_large" if c.depth >= 38 else ("sd35_medium" if c.x_block_self_attn_layers else "sd3_medium")
        return {"architecture": ARCHITECTURE[preset], "resolution": "1024x1024", "prediction_type": "flow"}


def configs_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, object]:
    def part(p: str) -> dict[str, tuple[int, ...]]:
        return {k[len(p):]: s for k, s in shapes.items() if k.startswith(p)}
    out: dict[str, object] = {}
    if any(k.startswith(PREFIX["mmdit"]) for k in shapes):
        out["mmdit"] = mmdit_mod.config_from_shapes(part(PREFIX["mmdit"]))
    if any(k.startswith(PREFIX["vae"]) for k in shapes):
        out["vae"] = vae_mod.config_from_shapes(part(PREFIX["vae"]))
    for name in ("clip_l", "clip_g"):
        if any(k.startswith(PREFIX[name]) for k in shapes):
            p = part(PREFIX[name])
            if name == "clip_l":  # the reference never projects CLIP-L's pooled output
                p = {k: s for k, s in p.items() if not k.startswith("text_projection")}
            out[name] = te_mod.config_from_shapes(p, naming="hf")
    if any(k.startswith(PREFIX["t5"]) for k in shapes):
        out["t5"] = t5_mod.config_from_shapes(part(PREFIX["t5"]))
    return out


def module_for(name: str, cfg: object) -> nn.Module:
    if name == "mmdit":
        return mmdit_mod.MMDiT(cfg)  # type: ignore[arg-type]
    if name == "vae":
        return vae_mod.AutoencoderKL(cfg)  # type: ignore[arg-type]
    if name in ("clip_l", "clip_g"):
        return te_mod.CLIPTextModel(cfg)  # type: ignore[arg-type]
    if name == "t5":
        return t5_mod.T5Encoder(cfg)  # type: ignore[arg-type]
    raise KeyError(name)


def preset_configs(preset: str) -> dict[str, object]:
    if preset not in PRESETS:
        raise ValueError(f"unknown SD3 preset {preset!r}; available: {', '.join(PRESETS)}")
    m, v, l, g, t = PRESETS[preset]
    return {"mmdit": mmdit_mod.PRESETS[m], "vae": vae_mod.PRESETS[v], "clip_l": te_mod.PRESETS[l],
            "clip_g": te_mod.PRESETS[g], "t5": t5_mod.PRESETS[t]}
