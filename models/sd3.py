"""The SD3 / SD3.5 family: MMDiT, 16-channel VAE, CLIP-L + CLIP-G + T5-XXL, and the file layout.

Text conditioning follows the SD3 reference code (CONVENTIONS.md): CLIP-L and CLIP-G penultimate
hidden states (no final LN) concatenated to [77, 2048], zero-padded to T5's width, then
concatenated on the token axis with T5-XXL's last layer; pooled `y` = CLIP-L pooled (not
projected) ++ CLIP-G pooled projected. T5 tokens are padded to exactly `t5_max_token_length`
(>= 77; the reference uses 77, diffusers 256) so every caption yields the same context length.

T5 attention mask (`apply_t5_attn_mask`, kohya's option; off by default = the reference): T5 runs with the
padding keys masked and its outputs at padding positions are set to zero. The MMDiT still sees 77 + L tokens.

Cached text-encoder outputs (cache.py, `[cache] cache_text_encoder_outputs`): `cache_text_items` stores per
caption, in bf16, only what cannot be rebuilt exactly:
    clip   [77, 2048]  CLIP-L ++ CLIP-G features, without the zero channels up to 4096 (always exact zeros);
    t5     [n, 4096]   T5 rows: n = L without the mask (every row is non-zero: T5 attends to padding, as in the
                       reference), n = real tokens (EOS included) with the mask (the rest are exact zeros),
                       n = 0 when T5 is not used (all zeros);
    pooled [2048].
`collate_cached_text` zero-pads them back to [B, 77 + L, 4096], so cached and uncached training see the same
tensors (bit for bit, up to the bf16 rounding of the cache). Size per caption: 315 KB for `clip` plus 8 KB per T5
row: L = 256 without the mask is 2.4 MB per image and caption variant (100k images: 241 GB); L = 77 (the
reference's own length) 0.95 MB; with the mask about 0.5 MB for a 25-token caption. For large datasets use
`t5_max_token_length = 77` or `apply_t5_attn_mask = true`.

Per-encoder caption dropout (kohya's SD3 options clip_l_dropout_rate / clip_g_dropout_rate / t5_dropout_rate,
library/strategy_sd3.py Sd3TextEncodingStrategy): a dropped encoder's outputs are zeros for that sample: CLIP-L's
channels of the CLIP features and of pooled, CLIP-G's, or T5's rows (`drop_text`). The same on the encoded and the
cached layout, since `collate_cached_text` rebuilds what `encode_text` gives.

Caption augmentation with cached embeddings: cache.py stores K = `[cache] text_variants` variants per image
(`te0.*` ... `te{K-1}.*`), each an independent draw of the caption augmentation (shuffle, dropout ...) with its
own seed; the loader picks one variant per sample per epoch. K = 1 (or captions without augmentation) stores
the caption as it is. K trades cache size (K x the sizes above) for augmentation variety.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import mmdit as mmdit_mod
from models import t5 as t5_mod
from models import text_encoders as te_mod
from models import vae as vae_mod
from models.family import Family, FamilyBase, host_to_device, strip_prefix
from models.tokenizers import EOT, CLIPTokenizer, default_tokenizer

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
CLIP_L_WIDTH = 768  # CLIP-L (ViT-L/14) hidden size in every released SD3: its channels come first in context / pooled
CLIP_L_WIDTH_KEY = "text_model.final_layer_norm.weight"  # [hidden size]: CLIP-L's width read from a file's shapes
DEFAULT_CONTEXT_DIM = 4096  # T5-XXL width = MMDiT context_in_dim of the released models
CONTEXT_EMBEDDER = "model.diffusion_model.context_embedder.weight"
DEFAULT_SHIFT = 3.0  # inference sigma shift of the released models (CONVENTIONS.md)
BUNDLED_T5_SPIECE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "t5_spiece.model")

PRESETS = {
    "sd3_medium": ("sd3_medium", "sd3", "clip_l", "bigg", "xxl"),
    "sd35_medium": ("sd35_medium", "sd3", "clip_l", "bigg", "xxl"),
    "sd35_large": ("sd35_large", "sd3", "clip_l", "bigg", "xxl"),
    "tiny": ("tiny", "tiny16", "tiny_l", "tiny_g", "tiny"),
}
# modelspec.implementation: the SD3 / SD3.5 reference code whose key layout the files use
IMPLEMENTATION = "https://github.com/Stability-AI/sd3.5"
ARCHITECTURE = {"sd3_medium": "stable-diffusion-v3-medium", "sd35_medium": "stable-diffusion-v3.5-medium",
                "sd35_large": "stable-diffusion-v3.5-large"}


@dataclass
class SD3(FamilyBase):
    """SD3 components. `mmdit` is the trained network; text encoders may be None (T5 optional)."""
    prefix = PREFIX  # file prefix of each part (class attribute, not a field)
    mmdit: mmdit_mod.MMDiT | None
    vae: vae_mod.AutoencoderKL | None
    clip_l: te_mod.CLIPTextModel | None
    clip_g: te_mod.CLIPTextModel | None
    t5: t5_mod.T5Encoder | None
    t5_tokenizer: t5_mod.T5Tokenizer | None = None
    t5_max_token_length: int = 256
    apply_t5_attn_mask: bool = False  # kohya option: mask T5 padding keys and zero T5 outputs at padding
    clip_skip: int = 2  # hidden layer of both CLIPs the context comes from, counted from the end (2: penultimate)
    shift: float = DEFAULT_SHIFT
    extras: dict[str, Tensor] = field(default_factory=dict)
    family: str = "sd3"
    tokenizer: CLIPTokenizer = field(default_factory=default_tokenizer)
    context_dim: int = DEFAULT_CONTEXT_DIM  # MMDiT context_in_dim (= T5 width); CLIP features are zero-padded to it
    clip_l_width: int = CLIP_L_WIDTH  # CLIP-L's channels in the CLIP features and pooled (also with CLIP-L unloaded)
    v_parameterization: bool = False  # unused (flow matching); kept for a uniform interface
    zero_terminal_snr: bool = False  # unused (flow matching); kept for a uniform interface

    @property
    def network(self) -> nn.Module:
        assert self.mmdit is not None
        return self.mmdit

    def text_encoders(self) -> dict[str, nn.Module]:
        return {k: m for k, m in (("clip_l", self.clip_l), ("clip_g", self.clip_g), ("t5", self.t5)) if m is not None}

    # -- conditioning --------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        ids_l, ids_g = self.tokenizer.layouts(captions, (EOT, 0))  # CLIP-L pads with end-of-text, CLIP-G with 0
        out = {"ids_l": ids_l, "ids_g": ids_g}
        if self.t5_tokenizer is not None:
            out["ids_t5"] = self.t5_tokenizer(captions, min_length=self.t5_max_token_length, max_length=self.t5_max_token_length)
        return out

    def _encode_parts(self, captions: Sequence[str], device: torch.device | str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """captions -> CLIP features [B, 77, 2048], T5 rows [B, L, C], pooled [B, 2048], real T5 rows per caption [B]."""
        assert self.clip_l is not None and self.clip_g is not None, "CLIP text encoders are not loaded"
        dev = device if device is not None else next(self.clip_l.parameters()).device
        tok = self.tokenize(captions)
        hl, pl = self.clip_l(host_to_device(tok["ids_l"], dev), layer=-self.clip_skip)  # (B, 77, 768), (B, 768)
        hg, pg = self.clip_g(host_to_device(tok["ids_g"], dev), layer=-self.clip_skip)  # (B, 77, 1280), (B, 1280)
        clip_ctx = torch.cat([hl, hg.to(hl.dtype)], dim=-1)              # (B, 77, 2048)
        pooled = torch.cat([pl, pg.to(pl.dtype)], dim=-1)                # (B, 2048)
        b, length = clip_ctx.shape[0], self.t5_max_token_length
        if self.t5 is not None and self.t5_tokenizer is not None:
            ids = host_to_device(tok["ids_t5"], dev)                                # (B, L)
            if self.apply_t5_attn_mask:
                mask = t5_mod.attention_mask_for(ids)                     # (B, L): real tokens incl. EOS
                t5_out = self.t5(ids, attention_mask=mask).to(clip_ctx.dtype)
                t5_out = t5_out * mask[..., None].to(t5_out.dtype)        # padding rows exactly zero
                n_real = mask.sum(dim=1)
            else:  # reference: unmasked, so padding rows carry (non-zero) features too
                t5_out = self.t5(ids).to(clip_ctx.dtype)                  # (B, L, C)
                n_real = torch.full((b,), length, device=t5_out.device)
        else:  # T5 left out: zeros in its place, as the reference allows
            t5_out = clip_ctx.new_zeros(b, length, self.context_dim)
            n_real = torch.zeros(b, dtype=torch.long, device=clip_ctx.device)
        return clip_ctx, t5_out, pooled, n_real

    def encode_text(self, captions: Sequence[str], device: torch.device | str | None = None) -> dict[str, Tensor]:
        """captions -> context [B, 77 + L, C] and pooled [B, 2048] (L = t5_max_token_length)."""
        clip_ctx, t5_out, pooled, _ = self._encode_parts(captions, device)
        clip_ctx = F.pad(clip_ctx, (0, self.context_dim - clip_ctx.shape[-1]))  # (B, 77, C)
        return {"context": torch.cat([clip_ctx, t5_out], dim=1), "pooled": pooled}

    def cache_text_items(self, captions: Sequence[str], device: torch.device | str | None = None) -> list[dict[str, Tensor]]:
        """Per caption, compact bf16 tensors for the text cache (module docstring): clip, t5 (real rows), pooled."""
        clip_ctx, t5_out, pooled, n_real = self._encode_parts(captions, device)
        items = []
        for i, n in enumerate(n_real.tolist()):
            items.append({"clip": clip_ctx[i].to(torch.bfloat16).cpu().clone(),
                          "t5": t5_out[i, :n].to(torch.bfloat16).cpu().clone(),
                          "pooled": pooled[i].to(torch.bfloat16).cpu().clone()})
        return items

    def conditioning(self, text: dict[str, Tensor], original_size: Tensor | None = None,
                     crop_top_left: Tensor | None = None, target_size: Tensor | None = None) -> dict[str, Tensor]:
        """Network keyword inputs (SD3 does not condition on sizes)."""
        return {"context": text["context"], "y": text["pooled"]}

    def collate_cached_text(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Cached per-caption tensors (`cache_text_items`) -> context [B, 77 + L, C] and pooled [B, 2048], zero-padded
        back to what `encode_text` gives."""
        need = {"clip", "t5", "pooled"}
        if not items or any(not need <= it.keys() for it in items):
            got = sorted(items[0]) if items else []
            raise ValueError(f"cached SD3 text outputs need tensors {sorted(need)}, got {got}: the text cache was "
                             f"written by another version or model family; re-run cache.py")
        length, width = self.t5_max_token_length, self.context_dim
        rows = []
        for it in items:
            clip, t5 = it["clip"], it["t5"]
            if t5.shape[0] > length or t5.shape[-1] != width or clip.shape[0] != CLIP_TOKENS or clip.shape[-1] > width:
                raise ValueError(f"cached SD3 text outputs clip {list(clip.shape)} / t5 {list(t5.shape)} do not fit "
                                 f"[{CLIP_TOKENS}, <= {width}] / [<= t5_max_token_length = {length}, {width}]: the cache "
                                 f"was made with other model settings; re-run cache.py")
            clip = F.pad(clip, (0, width - clip.shape[-1]))                        # (77, C)
            t5 = F.pad(t5, (0, 0, 0, length - t5.shape[0]))                      # (L, C): zero rows are exact
            rows.append(torch.cat([clip, t5.to(clip.dtype)], dim=0))             # (77 + L, C)
        return {"context": torch.stack(rows), "pooled": torch.stack([it["pooled"] for it in items])}

    def drop_text(self, text: dict[str, Tensor], drop: Tensor) -> dict[str, Tensor]:
        """Per-encoder caption dropout: `drop` [B, 3] bool (CLIP-L, CLIP-G, T5) zeroes, per sample, that encoder's
        outputs in context [B, 77 + L, C] and pooled [B, 2048], as kohya zeroes them (strategy_sd3.py
        encode_tokens / drop_cached_text_encoder_outputs: CLIP-L's first channels of the CLIP rows and of pooled,
        CLIP-G's after them, T5's rows). A multiply by per-sample 0 / 1 scales: no host sync, exact elsewhere."""
        ctx, pooled = text["context"], text["pooled"]
        b, n, c = ctx.shape
        wl = self.clip_l_width
        if pooled.shape[-1] <= wl or n < CLIP_TOKENS:
            raise ValueError(f"per-encoder caption dropout: pooled width {pooled.shape[-1]} / {n} context rows do not "
                             f"fit CLIP-L's {wl} channels and {CLIP_TOKENS} rows")
        keep = (~drop.to(device=ctx.device, dtype=torch.bool)).to(ctx.dtype)                 # (B, 3)
        lg = lambda width: torch.where(torch.arange(width, device=ctx.device) < wl,          # noqa: E731
                                       keep[:, 0:1], keep[:, 1:2])                           # (B, width)
        clip_rows = lg(c)[:, None, :].expand(b, CLIP_TOKENS, c)                              # (B, 77, C)
        t5_rows = keep[:, 2:3, None].expand(b, n - CLIP_TOKENS, c)                           # (B, L, C)
        return {**text, "context": ctx * torch.cat([clip_rows, t5_rows], dim=1),
                "pooled": pooled * lg(pooled.shape[-1]).to(pooled.dtype)}

    # -- latents -------------------------------------------------------------------------------
    def sample_schedule(self):
        from diffusion.sampling import FlowSchedule
        return FlowSchedule(shift=self.shift)

    # -- file layout ---------------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, Tensor]:
        out = self.prefixed_state_dict()
        if self.t5 is not None and PREFIX["t5"] + T5_TIED not in out:
            out[PREFIX["t5"] + T5_TIED] = out[PREFIX["t5"] + "shared.weight"]  # tied copy, as in the released files
        return out

    def pixel_multiple(self) -> int:
        """Image sides the MMDiT accepts are multiples of this: 8 (VAE) * the patch size."""
        assert self.mmdit is not None
        return 8 * self.mmdit.cfg.patch_size

    def modelspec(self) -> dict[str, str]:
        preset = "sd3_medium"
        if self.mmdit is not None:
            c = self.mmdit.cfg
            preset = "sd35_large" if c.depth >= 38 else ("sd35_medium" if c.x_block_self_attn_layers else "sd3_medium")
        return {"architecture": ARCHITECTURE[preset], "implementation": IMPLEMENTATION, "resolution": "1024x1024",
                "prediction_type": "flow"}


def _clip_l_config(shapes: dict[str, tuple[int, ...]]) -> te_mod.CLIPTextConfig:
    """CLIP-L without its projection: the reference never projects CLIP-L's pooled output."""
    return te_mod.config_from_shapes({k: s for k, s in shapes.items() if not k.startswith("text_projection")},
                                     naming="hf")


def configs_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, object]:
    """Per-part configs inferred from a checkpoint's key -> shape (full and tiny files alike)."""
    infer = {"mmdit": mmdit_mod.config_from_shapes, "vae": vae_mod.config_from_shapes, "clip_l": _clip_l_config,
             "clip_g": partial(te_mod.config_from_shapes, naming="hf"), "t5": t5_mod.config_from_shapes}
    return {name: infer[name](sub) for name, prefix in PREFIX.items() if (sub := strip_prefix(shapes, prefix))}


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
    """Per-part configs of a model preset (PRESETS)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown SD3 preset {preset!r}; available: {', '.join(PRESETS)}")
    m, v, l, g, t = PRESETS[preset]
    return {"mmdit": mmdit_mod.PRESETS[m], "vae": vae_mod.PRESETS[v], "clip_l": te_mod.PRESETS[l],
            "clip_g": te_mod.PRESETS[g], "t5": t5_mod.PRESETS[t]}


def assemble(modules: Mapping[str, nn.Module], opts: Mapping[str, Any]) -> SD3:
    """The components from loaded parts (any may be missing) and the [model] options; T5's tokenizer from
    model.t5_tokenizer or the bundled SentencePiece model (a given file is read, and so checked, even without T5)."""
    t5_tok = None
    if "t5" in modules or opts.get("t5_tokenizer"):
        t5_tok = t5_mod.T5Tokenizer(opts.get("t5_tokenizer") or BUNDLED_T5_SPIECE)
    return SD3(clip_skip=opts.get("clip_skip", 2), mmdit=modules.get("mmdit"), vae=modules.get("vae"), clip_l=modules.get("clip_l"),
               clip_g=modules.get("clip_g"), t5=modules.get("t5"), t5_tokenizer=t5_tok if "t5" in modules else None,
               t5_max_token_length=opts.get("t5_max_token_length", 256),
               apply_t5_attn_mask=bool(opts.get("apply_t5_attn_mask", False)), shift=opts.get("shift", DEFAULT_SHIFT),
               context_dim=opts.get("context_dim") or DEFAULT_CONTEXT_DIM,
               clip_l_width=modules["clip_l"].cfg.hidden_size if "clip_l" in modules
               else opts.get("clip_l_width") or CLIP_L_WIDTH)


FAMILY = Family(
    name="sd3", prefix=PREFIX, network="mmdit", text_encoders=("clip_l", "clip_g", "t5"), optional_parts=("t5",),
    presets=PRESETS, preset_configs=preset_configs, configs_from_shapes=configs_from_shapes, module_for=module_for,
    assemble=assemble, ignore=IGNORE, aliases=ALIASES,
    # SD3's T5 stays frozen: "also train the CLIP text encoders", as kohya's SD3 trainer
    trainable_text_lr={"clip_l": "learning_rate_te1", "clip_g": "learning_rate_te2"},
    blocks=("joint_blocks",),  # FSDP / compile units; the rest of the MMDiT is one more FSDP unit
    objective="flow",
    text_dropout=("clip_l", "clip_g", "t5"),  # kohya's SD3 clip_l / clip_g / t5_dropout_rate (drop_text)
    cfg_scale=5.0,  # the SD3 / SD3.5 reference's default
    zero_empty_negative=False,  # the reference encodes the empty negative prompt
    text_cache_layout="clip+t5+pooled", base_model_version="sd3",
    # kohya's ss_base_model_version of SD3 LoRAs: the MMDiT's model_type (library/sd3_utils.py
    # analyze_state_dict_state, returned as the model version by sd3_train_network.load_target_model)
    model_versions={ARCHITECTURE["sd3_medium"]: "medium", ARCHITECTURE["sd35_medium"]: "5-medium",
                    ARCHITECTURE["sd35_large"]: "5-large"},
    lora_prefixes={"mmdit": "lora_unet", "clip_l": "lora_te1", "clip_g": "lora_te2", "t5": "lora_te3"},
    # kohya's lora_sd3 defaults: every linear of the joint blocks' streams (attention qkv / proj, attn2 in SD3.5's
    # x-blocks, MLP, adaLN_modulation_1), and the CLIP attention and MLP linears; the MMDiT has no convolutions but
    # the patch embedding, which kohya does not adapt
    lora_targets=(r"lora_unet_joint_blocks_\d+_(context_block|x_block)_"
                  r"(attn2?_(qkv|proj)|mlp_fc[12]|adaLN_modulation_1)",
                  r"lora_te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"),
    lora_conv_targets=(),
)
