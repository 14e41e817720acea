"""The SDXL family: its components, how captions and sizes become conditioning, and the file layout.

The network, objective and sampler are separate (see diffusion/objectives.py, diffusion/sampling.py); this
module only knows what SDXL's parts are, how they are named in the single-file checkpoint, and
how the conditioner turns captions + (original_size, crop_top_left, target_size) into
`context` [B, 77k, 2048] and `y` [B, 2816] exactly as sgm does (CONVENTIONS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from models import text_encoders as te_mod
from models import unet_sdxl, vae as vae_mod
from models.family import Family, FamilyBase, host_to_device, strip_prefix
from models.tokenizers import EOT, CLIPTokenizer, default_tokenizer

# File prefixes of each part in the single file (sgm naming).
PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "te1": "conditioner.embedders.0.transformer.",
    "te2": "conditioner.embedders.1.model.",
}
# Keys in real files that carry no weights we train; ignored on load, written back on save.
IGNORE = ("denoiser.sigmas", "*.position_ids", "conditioner.embedders.1.model.logit_scale")
CLIP_L_POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
BIGG_LOGIT_SCALE = "conditioner.embedders.1.model.logit_scale"
LOGIT_SCALE_DEFAULT = math.log(100.0)  # CLIP's clamped logit scale, the value in released files
SIZE_EMBED_DIM = 256  # sgm ConcatTimestepEmbedderND outdim, per number (6 numbers -> 1536)
ARCHITECTURE = "stable-diffusion-xl-v1-base"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # modelspec.implementation (kohya: sgm layout)
# Empty top-level marker tensors of v-prediction / zero-terminal-SNR fine-tunes (NoobAI-XL-style files). ComfyUI
# (comfy/supported_models.py, SDXL.model_type) samples a file as v-prediction when `v_pred` is a key of its state
# dict, and with zero terminal SNR when `ztsnr` is one too; read on load, written on export.
V_PRED_MARKER = "v_pred"
ZTSNR_MARKER = "ztsnr"
MARKERS = (V_PRED_MARKER, ZTSNR_MARKER)
# Top-level keys of EDM-parameterised SDXL files (Playground v2.5: edm_mean / edm_std; EDM v-prediction:
# edm_vpred.sigma_max / _min; ComfyUI detects them the same way). We train DDPM only: refused with a clear message.
EDM_MARKERS = ("edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")

# Component presets: (unet, vae, te1, te2) preset names per family preset.
PRESETS = {
    "base": ("base", "sdxl", "clip_l", "bigg"),
    "tiny": ("tiny", "tiny", "tiny_l", "tiny_g"),
    "micro": ("micro", "tiny", "tiny_l", "tiny_g"),  # tests: the fewest tensors
}


@dataclass
class SDXL(FamilyBase):
    """SDXL components. `unet` is the trained network; the rest may be None when not loaded."""
    prefix = PREFIX  # file prefix of each part (class attribute, not a field)
    unet: unet_sdxl.UNet | None
    vae: vae_mod.AutoencoderKL | None
    te1: te_mod.CLIPTextModel | None        # CLIP ViT-L/14, Hugging Face naming
    te2: te_mod.OpenCLIPTextModel | None    # OpenCLIP ViT-bigG/14, open_clip naming
    max_token_length: int = 75
    clip_skip: int = 2  # hidden layer of both CLIPs the context comes from, counted from the end (2: penultimate)
    v_parameterization: bool = False
    zero_terminal_snr: bool = False  # trained with zero-terminal-SNR betas: previews and exports say so
    extras: dict[str, Tensor] = field(default_factory=dict)  # position_ids / logit_scale kept for saving
    family: str = "sdxl"
    tokenizer: CLIPTokenizer = field(default_factory=default_tokenizer)

    # -- parts ---------------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        assert self.unet is not None
        return self.unet

    def text_encoders(self) -> dict[str, nn.Module]:
        return {k: m for k, m in (("te1", self.te1), ("te2", self.te2)) if m is not None}

    # -- conditioning --------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """CLIP-L pads with end-of-text, bigG with 0 (CONVENTIONS.md)."""
        ids1, ids2 = self.tokenizer.layouts(captions, (EOT, 0), max_token_length=self.max_token_length)
        return {"ids1": ids1, "ids2": ids2}

    def encode_tokens(self, ids1: Tensor, ids2: Tensor) -> dict[str, Tensor]:
        """Token ids [B, 77k] -> context [B, 77k, 2048] (penultimate layers, no final LN) and
        pooled [B, 1280] (bigG, projected, from the first 77-token chunk)."""
        assert self.te1 is not None and self.te2 is not None, "text encoders are not loaded"
        contexts, pooled = [], None
        for i in range(0, ids1.shape[1], 77):
            h1, _ = self.te1(ids1[:, i:i + 77], layer=-self.clip_skip)  # (B, 77, 768)
            h2, p2 = self.te2(ids2[:, i:i + 77], layer=-self.clip_skip)  # (B, 77, 1280), (B, 1280)
            contexts.append(torch.cat([h1, h2.to(h1.dtype)], dim=-1))
            pooled = p2 if pooled is None else pooled
        assert pooled is not None
        return {"context": torch.cat(contexts, dim=1), "pooled": pooled}

    def encode_text(self, captions: Sequence[str], device: torch.device | str | None = None) -> dict[str, Tensor]:
        assert self.te1 is not None and self.te2 is not None, "text encoders are not loaded"
        tok = self.tokenize(captions)
        dev = device if device is not None else next(self.te1.parameters()).device
        return self.encode_tokens(host_to_device(tok["ids1"], dev), host_to_device(tok["ids2"], dev))

    def conditioning(self, text: dict[str, Tensor], original_size: Tensor, crop_top_left: Tensor,
                     target_size: Tensor) -> dict[str, Tensor]:
        """Network keyword inputs: context and y = [pooled, emb(orig h, w), emb(crop t, l), emb(target h, w)]."""
        pooled = text["pooled"]
        sizes = torch.cat([original_size, crop_top_left, target_size], dim=1).to(pooled.device)  # (B, 6)
        emb = unet_sdxl.timestep_embedding(sizes.flatten().float(), SIZE_EMBED_DIM)               # (B*6, 256)
        y = torch.cat([pooled.float(), emb.reshape(pooled.shape[0], -1)], dim=1)                  # (B, 1280 + 1536)
        return {"context": text["context"], "y": y.to(pooled.dtype)}

    def collate_cached_text(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in ("context", "pooled")}

    # -- latents -------------------------------------------------------------------------------
    def sample_schedule(self):
        from diffusion.sampling import DiscreteSchedule
        return DiscreteSchedule(prediction="v" if self.v_parameterization else "eps", zero_terminal_snr=self.zero_terminal_snr)

    # -- file layout ---------------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, Tensor]:
        """The exact original key layout (prefixes added, ignorable extras written back)."""
        out = self.prefixed_state_dict()
        if self.te1 is not None:
            out[CLIP_L_POSITION_IDS] = self.extras.get(CLIP_L_POSITION_IDS, torch.arange(77, dtype=torch.int64)[None])
        if self.te2 is not None:
            out[BIGG_LOGIT_SCALE] = self.extras.get(BIGG_LOGIT_SCALE, torch.tensor(LOGIT_SCALE_DEFAULT))
        if self.v_parameterization:
            out[V_PRED_MARKER] = torch.zeros(0)  # empty markers, as the v-prediction files ComfyUI reads carry
        if self.zero_terminal_snr:
            out[ZTSNR_MARKER] = torch.zeros(0)
        return out

    def modelspec(self) -> dict[str, str]:
        return {"architecture": ARCHITECTURE, "implementation": IMPLEMENTATION, "resolution": "1024x1024",
                "prediction_type": "v" if self.v_parameterization else "epsilon"}

    def pixel_multiple(self) -> int:
        """Image sides the UNet accepts are multiples of this: 8 (VAE) * 2 ** (levels - 1) (downsamplings)."""
        assert self.unet is not None
        return 8 * 2 ** (len(self.unet.cfg.channel_mult) - 1)


def configs_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, object]:
    """Per-part configs inferred from a checkpoint's key -> shape (full and tiny files alike)."""
    infer = {"unet": unet_sdxl.config_from_shapes, "vae": vae_mod.config_from_shapes,
             "te1": partial(te_mod.config_from_shapes, naming="hf"),
             "te2": partial(te_mod.config_from_shapes, naming="open_clip")}
    return {name: infer[name](sub) for name, prefix in PREFIX.items() if (sub := strip_prefix(shapes, prefix))}


def module_for(name: str, cfg: object) -> nn.Module:
    """Instantiate a part from its config (call under a device context, e.g. meta)."""
    if name == "unet":
        return unet_sdxl.UNet(cfg)  # type: ignore[arg-type]
    if name == "vae":
        return vae_mod.AutoencoderKL(cfg)  # type: ignore[arg-type]
    if name == "te1":
        return te_mod.CLIPTextModel(cfg)  # type: ignore[arg-type]
    if name == "te2":
        return te_mod.OpenCLIPTextModel(cfg)  # type: ignore[arg-type]
    raise KeyError(name)


def preset_configs(preset: str) -> dict[str, object]:
    """Per-part configs of a model preset (PRESETS)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown SDXL preset {preset!r}; available: {', '.join(PRESETS)}")
    u, v, t1, t2 = PRESETS[preset]
    return {"unet": unet_sdxl.PRESETS[u], "vae": vae_mod.PRESETS[v], "te1": te_mod.PRESETS[t1], "te2": te_mod.PRESETS[t2]}


def assemble(modules: Mapping[str, nn.Module], opts: Mapping[str, Any]) -> SDXL:
    """The components from loaded parts (any may be missing) and the [model] options."""
    return SDXL(clip_skip=opts.get("clip_skip", 2), unet=modules.get("unet"), vae=modules.get("vae"), te1=modules.get("te1"), te2=modules.get("te2"),
                max_token_length=opts.get("max_token_length", 75),
                v_parameterization=bool(opts.get("v_parameterization")),
                zero_terminal_snr=bool(opts.get("zero_terminal_snr")))


# Kohya's LoRA default targets, as regexes over LoRA names: every Linear / 1x1 conv inside the Transformer2DModel
# blocks (proj_in / proj_out, attn1 / attn2 q, k, v, out, GEGLU proj, ff out), and the CLIP attention and MLP
# linears; LoCon adds the ResnetBlock2D, Downsample2D and Upsample2D layers.
_LORA_BLOCK = r"(input_blocks_\d+|middle_block|output_blocks_\d+)"

FAMILY = Family(
    name="sdxl", prefix=PREFIX, network="unet", text_encoders=("te1", "te2"), optional_parts=(), presets=PRESETS,
    preset_configs=preset_configs, configs_from_shapes=configs_from_shapes, module_for=module_for, assemble=assemble,
    ignore=IGNORE, markers=MARKERS,
    trainable_text_lr={"te1": "learning_rate_te1", "te2": "learning_rate_te2"},
    blocks=("input_blocks", "output_blocks"),  # FSDP / compile units; the rest of the UNet is one more FSDP unit
    objective="ddpm",
    cfg_scale=7.0,  # A1111's / the SDXL demos' default
    zero_empty_negative=True,  # the original SDXL samplers zero the text embeddings for an empty negative prompt
    text_cache_layout="context+pooled", base_model_version="sdxl_base_v1-0",
    lora_prefixes={"unet": "lora_unet", "te1": "lora_te1", "te2": "lora_te2"},
    lora_targets=(rf"lora_unet_{_LORA_BLOCK}_1_(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)"
                  r"|ff_net_0_proj|ff_net_2))",
                  r"lora_te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"),
    lora_conv_targets=(r"lora_unet_(input_blocks_\d+_0|middle_block_[02]|output_blocks_\d+_0)_(in_layers_2|emb_layers_1"
                       r"|out_layers_3|skip_connection)",
                       r"lora_unet_input_blocks_\d+_0_op", r"lora_unet_output_blocks_\d+_[12]_conv"),
)
