"""Diffusers folders <-> the original single-file layout: key maps as data, one small rule engine, no diffusers import.

A diffusers folder (what hub downloads usually are) holds `model_index.json` and one sub-folder per part, each
with a `config.json` and weights (`diffusion_pytorch_model.safetensors` / `model.safetensors`, or shards
`...-0000k-of-0000n.safetensors` + `....safetensors.index.json`, or a variant such as `*.fp16.safetensors`):

    SDXL  unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), text_encoder/ (CLIPTextModel),
          text_encoder_2/ (CLIPTextModelWithProjection)
    SD3   transformer/ (SD3Transformer2DModel), vae/, text_encoder/ and text_encoder_2/ (CLIPTextModelWithProjection),
          text_encoder_3/ (T5EncoderModel)

`DiffusersFolder` reads such a folder as if it were a single file in the original layout (same interface as
models.checkpoint.SafeTensorFile: keys / shape / shapes / get), so `models.load` needs no second path. The
scheduler's `prediction_type = "v_prediction"` / `rescale_betas_zero_snr` show as the `v_pred` / `ztsnr` markers.
`save_diffusers` writes the other direction (`[save] save_model_as = "diffusers"`).

Key maps go from the original key (our module's state-dict key) to the diffusers key(s): a list of block prefixes
(original prefix, diffusers prefix, leaf table), built from the part's config where indices need arithmetic (UNet
levels, VAE decoder order), and leaf tables as data. An entry may carry an operation on the tensor:
    CAT        one original tensor = several diffusers tensors concatenated on dim 0 (q/k/v -> qkv, in_proj)
    TRANSPOSE  open_clip's text_projection is stored [in, out], HF's Linear weight [out, in]
    CONV1X1    the original VAE attention projections are 1x1 convolutions, diffusers' Linear layers
    SWAP       (shift, scale) halves of an adaLN weight in the original, (scale, shift) in diffusers'
               AdaLayerNormContinuous (SD3's final layer and last context block)
Facts from diffusers' own converters (loaders/single_file_utils.py: convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_open_clip_checkpoint, convert_sd3_transformer_checkpoint_to_diffusers).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from models.checkpoint import CheckpointError, SafeTensorFile

SAME, CAT, TRANSPOSE, CONV1X1, SWAP = "same", "cat", "transpose", "conv1x1", "swap"
MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
# Weight file stems: diffusers models, transformers models.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# Variants tried when no plain weights exist (diffusers `variant=`), in this order.
VARIANTS = ("fp16", "bf16", "fp32")
DIFFUSERS_VERSION = "0.30.0"  # `_diffusers_version` written into configs (any version that has these classes)
TRANSFORMERS_VERSION = "4.44.0"


# ---------------------------------------------------------------------------------------------
# Leaf tables (original name -> diffusers name); a str renames a module path, a (names, op) pair a whole key
# ---------------------------------------------------------------------------------------------

UNET_FIXED = {  # whole-module renames outside the levels
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "label_emb.0.0.": "add_embedding.linear_1.",
    "label_emb.0.2.": "add_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
}
UNET_RESNET = {  # sgm ResBlock -> diffusers ResnetBlock2D
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
SAME_NAMES: dict[str, Any] = {}  # SpatialTransformer == Transformer2DModel, Downsample.op / Upsample.conv: same leaves

VAE_FIXED = {
    "encoder.norm_out.": "encoder.conv_norm_out.",
    "decoder.norm_out.": "decoder.conv_norm_out.",
    "encoder.mid.block_1.": "encoder.mid_block.resnets.0.",
    "encoder.mid.block_2.": "encoder.mid_block.resnets.1.",
    "decoder.mid.block_1.": "decoder.mid_block.resnets.0.",
    "decoder.mid.block_2.": "decoder.mid_block.resnets.1.",
}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {
    "norm": "group_norm",
    "q.weight": (("to_q.weight",), CONV1X1),
    "k.weight": (("to_k.weight",), CONV1X1),
    "v.weight": (("to_v.weight",), CONV1X1),
    "proj_out.weight": (("to_out.0.weight",), CONV1X1),
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
VAE_TOP = ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.", "quant_conv.",
           "post_quant_conv.")

OPEN_CLIP_FIXED = {  # open_clip text tower -> HF CLIPTextModelWithProjection
    "token_embedding.": "text_model.embeddings.token_embedding.",
    "ln_final.": "text_model.final_layer_norm.",
}
OPEN_CLIP_TOP = {
    "positional_embedding": (("text_model.embeddings.position_embedding.weight",), SAME),
    "text_projection": (("text_projection.weight",), TRANSPOSE),
}
OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
    "attn.in_proj_weight": (tuple(f"self_attn.{p}_proj.weight" for p in "qkv"), CAT),
    "attn.in_proj_bias": (tuple(f"self_attn.{p}_proj.bias" for p in "qkv"), CAT),
}

MMDIT_FIXED = {
    "x_embedder.proj.": "pos_embed.proj.",
    "t_embedder.mlp.0.": "time_text_embed.timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "time_text_embed.timestep_embedder.linear_2.",
    "y_embedder.mlp.0.": "time_text_embed.text_embedder.linear_1.",
    "y_embedder.mlp.2.": "time_text_embed.text_embedder.linear_2.",
    "context_embedder.": "context_embedder.",
    "final_layer.linear.": "proj_out.",
}
MMDIT_TOP = {
    "pos_embed": (("pos_embed.pos_embed",), SAME),
    "final_layer.adaLN_modulation.1.weight": (("norm_out.linear.weight",), SWAP),
    "final_layer.adaLN_modulation.1.bias": (("norm_out.linear.bias",), SWAP),
}


def _qkv(into: str, names: Sequence[str]) -> dict[str, Any]:
    return {f"{into}.qkv.{p}": (tuple(f"{n}.{p}" for n in names), CAT) for p in ("weight", "bias")}


MMDIT_X = {  # joint_blocks.i.x_block -> transformer_blocks.i
    **_qkv("attn", ("attn.to_q", "attn.to_k", "attn.to_v")),
    **_qkv("attn2", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    "attn.ln_q": "attn.norm_q",
    "attn.ln_k": "attn.norm_k",
    "attn.proj": "attn.to_out.0",
    "attn2.ln_q": "attn2.norm_q",
    "attn2.ln_k": "attn2.norm_k",
    "attn2.proj": "attn2.to_out.0",
    "adaLN_modulation.1": "norm1.linear",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
MMDIT_CONTEXT = {  # joint_blocks.i.context_block -> transformer_blocks.i (the "added" / context projections)
    **_qkv("attn", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "attn.ln_q": "attn.norm_added_q",
    "attn.ln_k": "attn.norm_added_k",
    "attn.proj": "attn.to_add_out",
    "adaLN_modulation.1": "norm1_context.linear",
    "mlp.fc1": "ff_context.net.0.proj",
    "mlp.fc2": "ff_context.net.2",
}
MMDIT_CONTEXT_LAST = {  # the last block's context side is AdaLayerNormContinuous in diffusers: halves swapped
    **MMDIT_CONTEXT,
    "adaLN_modulation.1.weight": (("norm1_context.linear.weight",), SWAP),
    "adaLN_modulation.1.bias": (("norm1_context.linear.bias",), SWAP),
}


# ---------------------------------------------------------------------------------------------
# Block lists from a part's config (the only index arithmetic)
# ---------------------------------------------------------------------------------------------

Block = tuple[str, str, Mapping[str, Any]]  # (original prefix, diffusers prefix, leaf table)


def _fixed(table: Mapping[str, str]) -> list[Block]:
    return [(a, b, SAME_NAMES) for a, b in table.items()]


def unet_blocks(cfg: Any) -> list[Block]:
    """sgm input/middle/output blocks -> diffusers down/mid/up blocks (convert_ldm_unet_checkpoint's index rule:
    input_blocks.{(n+1)i + j + 1} = down_blocks.i.{resnets,attentions}.j, output_blocks.{(n+1)r + j} =
    up_blocks.r.*.j with r counted from the lowest resolution)."""
    n, levels, depth = cfg.num_res_blocks, len(cfg.channel_mult), cfg.transformer_depth
    out = _fixed(UNET_FIXED)
    for i in range(levels):
        for j in range(n):
            k = (n + 1) * i + j + 1
            out.append((f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET))
            out.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}.", SAME_NAMES))
        if i < levels - 1:
            out.append((f"input_blocks.{(n + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", SAME_NAMES))
    out += [("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
            ("middle_block.1.", "mid_block.attentions.0.", SAME_NAMES),
            ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET)]
    for r in range(levels):
        has_attn = bool(depth[levels - 1 - r])
        for j in range(n + 1):
            k = (n + 1) * r + j
            out.append((f"output_blocks.{k}.0.", f"up_blocks.{r}.resnets.{j}.", UNET_RESNET))
            out.append((f"output_blocks.{k}.1.", f"up_blocks.{r}.attentions.{j}.", SAME_NAMES))
        if r < levels - 1:
            k = (n + 1) * r + n
            out.append((f"output_blocks.{k}.{2 if has_attn else 1}.conv.", f"up_blocks.{r}.upsamplers.0.conv.",
                        SAME_NAMES))
    return out


def vae_blocks(cfg: Any) -> list[Block]:
    """Original encoder.down.i / decoder.up.i (decoder counted from the highest resolution) -> diffusers blocks."""
    levels, n = len(cfg.ch_mult), cfg.num_res_blocks
    out = _fixed(VAE_FIXED) + [(p, p, SAME_NAMES) for p in VAE_TOP]
    out += [(f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0.", VAE_ATTENTION)
            for side in ("encoder", "decoder")]
    out += [(f"{side}.mid.{b}.", f"{side}.mid_block.resnets.{j}.", VAE_RESNET)
            for side in ("encoder", "decoder") for b, j in (("block_1", 0), ("block_2", 1))]
    for i in range(levels):
        for j in range(n + 1):
            out.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET))
            out.append((f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{levels - 1 - i}.resnets.{j}.", VAE_RESNET))
        out.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.", SAME_NAMES))
        out.append((f"decoder.up.{i}.upsample.", f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.", SAME_NAMES))
    return out


def open_clip_blocks(cfg: Any) -> list[Block]:
    out = _fixed(OPEN_CLIP_FIXED) + [("", "", OPEN_CLIP_TOP)]
    out += [(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", OPEN_CLIP_LAYER)
            for i in range(cfg.num_layers)]
    return out


def mmdit_blocks(cfg: Any) -> list[Block]:
    out = _fixed(MMDIT_FIXED) + [("", "", MMDIT_TOP)]
    for i in range(cfg.depth):
        out.append((f"joint_blocks.{i}.x_block.", f"transformer_blocks.{i}.", MMDIT_X))
        out.append((f"joint_blocks.{i}.context_block.", f"transformer_blocks.{i}.",
                    MMDIT_CONTEXT_LAST if i == cfg.depth - 1 else MMDIT_CONTEXT))
    return out


# ---------------------------------------------------------------------------------------------
# The rule engine
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where one original tensor lives in diffusers naming, and how it is transformed."""
    keys: tuple[str, ...]
    op: str = SAME


def _leaf(table: Mapping[str, Any], rest: str) -> tuple[tuple[str, ...], str] | None:
    """A key's remainder after its block prefix -> (diffusers names, op): whole-key entries first, then the longest
    module path; None when the table has no entry (the remainder is kept as it is)."""
    hit = table.get(rest)
    if isinstance(hit, tuple):
        return hit
    best = max((k for k, v in table.items() if isinstance(v, str) and rest.startswith(k + ".")), key=len, default=None)
    if best is None:
        return None
    return (table[best] + rest[len(best):],), SAME


def map_keys(original_keys: Iterable[str], blocks: Sequence[Block]) -> dict[str, Target]:
    """Original key -> Target, by the longest matching block prefix, then its leaf table."""
    ordered = sorted(blocks, key=lambda b: len(b[0]), reverse=True)
    out: dict[str, Target] = {}
    for key in original_keys:
        for prefix, dprefix, table in ordered:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            hit = _leaf(table, rest)
            if hit is None and prefix == "":  # a top-level table only knows its own keys
                continue
            names, op = hit if hit is not None else ((rest,), SAME)
            out[key] = Target(tuple(dprefix + n for n in names), op)
            break
        else:
            raise CheckpointError(f"no diffusers name known for the original key {key!r}")
    return out


def to_diffusers(op: str, t: Tensor, n: int) -> list[Tensor]:
    """One original tensor -> its `n` diffusers tensors."""
    if op == CAT:
        return list(t.chunk(n, dim=0))
    if op == TRANSPOSE:
        return [t.t().contiguous()]
    if op == CONV1X1:
        return [t[:, :, 0, 0] if t.ndim == 4 else t]
    if op == SWAP:
        a, b = t.chunk(2, dim=0)
        return [torch.cat([b, a], dim=0)]
    return [t]


def from_diffusers(op: str, ts: Sequence[Tensor]) -> Tensor:
    """The diffusers tensors of one Target -> the original tensor."""
    if op == CAT:
        return torch.cat(list(ts), dim=0)
    t = ts[0]
    if op == TRANSPOSE:
        return t.t().contiguous()
    if op == CONV1X1:
        return t[:, :, None, None] if t.ndim == 2 else t
    if op == SWAP:
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)
    return t


def shape_from_diffusers(op: str, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    s = tuple(shapes[0])
    if op == CAT:
        return (sum(int(x[0]) for x in shapes), *s[1:])
    if op == TRANSPOSE:
        return tuple(reversed(s))
    if op == CONV1X1 and len(s) == 2:
        return (*s, 1, 1)
    return s


# Pre-0.14 diffusers VAE attention names (e.g. older standalone VAE files), renamed before the map applies.
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_diffusers_vae(keys: Iterable[str]) -> bool:
    """True when VAE keys use diffusers naming (down_blocks / up_blocks / mid_block)."""
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys)


def convert_diffusers_vae(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers-named VAE state dict without its config.json (a standalone `diffusion_pytorch_model.safetensors`)
    -> original naming, by the same map as folders (`vae_blocks`): the structure the names need (levels, res blocks
    per level, channel widths for the shortcut convolutions, quant convs) is read from the tensors' shapes."""
    from models.vae import VAEConfig
    legacy = re.compile(r"\.(" + "|".join(LEGACY_VAE_ATTENTION) + r")\.")
    sd = {legacy.sub(lambda m: f".{LEGACY_VAE_ATTENTION[m.group(1)]}.", k): v for k, v in sd.items()}
    try:
        levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
        n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
        widths = [int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)]
        cfg = VAEConfig(in_channels=int(sd["encoder.conv_in.weight"].shape[1]), ch=widths[0],
                        ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=n,
                        z_channels=int(sd["decoder.conv_in.weight"].shape[1]), use_quant_conv="quant_conv.weight" in sd)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a diffusers AutoencoderKL state dict: {e}") from None
    mapping = part_map("vae", cfg)
    assert mapping is not None
    lost = [k for t in mapping.values() for k in t.keys if k not in sd]
    used = {k for t in mapping.values() for k in t.keys}
    extra = [k for k in sd if k not in used]
    if lost or extra:
        raise CheckpointError(f"diffusers VAE keys do not match an AutoencoderKL of {levels} levels: missing {lost[:5]}, "
                              f"unexpected {extra[:5]}")
    return {orig: from_diffusers(t.op, [sd[k] for k in t.keys]) for orig, t in mapping.items()}


# ---------------------------------------------------------------------------------------------
# Configs: diffusers / transformers config.json <-> ours
# ---------------------------------------------------------------------------------------------


def _need(cfg: Mapping[str, Any], where: str, **expected: Any) -> None:
    bad = [f"{k} = {cfg.get(k)!r} (expected {v!r})" for k, v in expected.items() if cfg.get(k, v) != v]
    if bad:
        raise CheckpointError(f"{where}: not a layout sdtrain reads: {'; '.join(bad)}")


def _per_level(value: Any, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def unet_config(j: Mapping[str, Any], where: str) -> Any:
    from models.unet_sdxl import UNetConfig
    _need(j, where, addition_embed_type="text_time", use_linear_projection=True, addition_time_embed_dim=256,
          mid_block_type="UNetMidBlock2DCrossAttn", reverse_transformer_layers_per_block=None)
    widths = list(j["block_out_channels"])
    levels = len(widths)
    layers = _per_level(j.get("transformer_layers_per_block", 1), levels)
    heads = _per_level(j.get("num_attention_heads") or j["attention_head_dim"], levels)  # SDXL stores heads here
    attn = ["CrossAttn" in t for t in j["down_block_types"]]
    if not attn[-1]:
        raise CheckpointError(f"{where}: the lowest level has no cross-attention; not an SDXL UNet")
    head_ch = {widths[i] // heads[i] for i in range(levels) if attn[i]}
    if len(head_ch) != 1 or not isinstance(j.get("layers_per_block"), int):
        raise CheckpointError(f"{where}: per-level head widths {sorted(head_ch)} / layers_per_block "
                              f"{j.get('layers_per_block')!r}: not an SDXL UNet layout")
    return UNetConfig(in_channels=j.get("in_channels", 4), out_channels=j.get("out_channels", 4),
                      model_channels=widths[0],
                      channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=j["layers_per_block"],
                      transformer_depth=tuple(layers[i] if attn[i] else 0 for i in range(levels)),
                      transformer_depth_middle=layers[-1], num_head_channels=head_ch.pop(),
                      context_dim=j["cross_attention_dim"], adm_in_channels=j["projection_class_embeddings_input_dim"])


def unet_json(cfg: Any) -> dict[str, Any]:
    """UNet2DConditionModel config of an sgm SDXL UNet (diffusers' SDXL mid block takes the last level's depth)."""
    if cfg.transformer_depth[-1] != cfg.transformer_depth_middle:
        raise CheckpointError("a diffusers UNet cannot hold a middle block deeper than its last level "
                              f"({cfg.transformer_depth_middle} vs {cfg.transformer_depth[-1]})")
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": 128, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth)],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": widths,
            "layers_per_block": cfg.num_res_blocks, "cross_attention_dim": cfg.context_dim,
            "attention_head_dim": [w // cfg.num_head_channels for w in widths],  # diffusers reads it as heads
            "transformer_layers_per_block": [max(d, 1) for d in cfg.transformer_depth],
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels, "norm_num_groups": 32,
            "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False}


def vae_config(j: Mapping[str, Any], where: str) -> Any:
    from models.vae import VAEConfig
    widths = list(j["block_out_channels"])
    return VAEConfig(in_channels=j.get("in_channels", 3), ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
                     num_res_blocks=j.get("layers_per_block", 1), z_channels=j.get("latent_channels", 4),
                     use_quant_conv=bool(j.get("use_quant_conv", True)),
                     scaling_factor=float(j.get("scaling_factor", 0.18215)),
                     shift_factor=float(j.get("shift_factor") or 0.0))


def vae_json(cfg: Any) -> dict[str, Any]:
    widths = [cfg.ch * m for m in cfg.ch_mult]
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "in_channels": cfg.in_channels,
            "out_channels": cfg.in_channels, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths), "block_out_channels": widths,
            "layers_per_block": cfg.num_res_blocks, "act_fn": "silu", "latent_channels": cfg.z_channels,
            "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": cfg.scaling_factor,
            "shift_factor": cfg.shift_factor or None, "use_quant_conv": cfg.use_quant_conv,
            "use_post_quant_conv": cfg.use_quant_conv, "force_upcast": True, "mid_block_add_attention": True}


def clip_config(j: Mapping[str, Any], where: str) -> Any:
    from models.text_encoders import CLIPTextConfig
    act = j.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{where}: hidden_act {act!r} is not a CLIP text tower's (quick_gelu / gelu)")
    return CLIPTextConfig(vocab_size=j["vocab_size"], max_position_embeddings=j.get("max_position_embeddings", 77),
                          hidden_size=j["hidden_size"], intermediate_size=j["intermediate_size"],
                          num_layers=j["num_hidden_layers"], num_heads=j["num_attention_heads"], act=act,
                          projection_dim=j.get("projection_dim"))


def clip_json(cfg: Any, with_projection: bool) -> dict[str, Any]:
    from models.tokenizers import EOT, SOT
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "transformers_version": TRANSFORMERS_VERSION, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "hidden_act": cfg.act, "layer_norm_eps": 1e-5,
            "projection_dim": cfg.projection_dim or cfg.hidden_size, "attention_dropout": 0.0, "dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02, "bos_token_id": SOT, "eos_token_id": EOT,
            "pad_token_id": 1, "torch_dtype": "float32"}


def t5_config(j: Mapping[str, Any], where: str) -> Any:
    from models.t5 import T5Config
    _need(j, where, feed_forward_proj="gated-gelu")
    return T5Config(vocab_size=j["vocab_size"], d_model=j["d_model"], d_kv=j["d_kv"], d_ff=j["d_ff"],
                    num_layers=j["num_layers"], num_heads=j["num_heads"],
                    relative_attention_num_buckets=j.get("relative_attention_num_buckets", 32),
                    relative_attention_max_distance=j.get("relative_attention_max_distance", 128))


def t5_json(cfg: Any) -> dict[str, Any]:
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "transformers_version": TRANSFORMERS_VERSION,
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
            "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance, "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu_new", "is_gated_act": True, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0,
            "is_encoder_decoder": True, "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0, "torch_dtype": "float32"}


def mmdit_config(j: Mapping[str, Any], where: str) -> Any:
    from models.mmdit import HEAD_DIM, MMDiTConfig
    depth = j["num_layers"]
    _need(j, where, attention_head_dim=HEAD_DIM, num_attention_heads=depth, caption_projection_dim=HEAD_DIM * depth,
          out_channels=j.get("in_channels", 16))
    qk = j.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise CheckpointError(f"{where}: qk_norm {qk!r} is not one sdtrain reads (none / rms_norm)")
    return MMDiTConfig(depth=depth, patch_size=j.get("patch_size", 2), in_channels=j.get("in_channels", 16),
                       pos_embed_max_size=j["pos_embed_max_size"], adm_in_channels=j["pooled_projection_dim"],
                       context_in_dim=j["joint_attention_dim"], qk_norm="rms" if qk else None,
                       x_block_self_attn_layers=tuple(j.get("dual_attention_layers") or ()))


def mmdit_json(cfg: Any) -> dict[str, Any]:
    from models.mmdit import HEAD_DIM
    return {"_class_name": "SD3Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": cfg.pos_embed_max_size * cfg.patch_size // 2 if cfg.pos_embed_max_size < 128 else 128,
            "patch_size": cfg.patch_size, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "num_layers": cfg.depth, "attention_head_dim": HEAD_DIM, "num_attention_heads": cfg.num_heads,
            "joint_attention_dim": cfg.context_in_dim, "caption_projection_dim": cfg.hidden_size,
            "pooled_projection_dim": cfg.adm_in_channels, "pos_embed_max_size": cfg.pos_embed_max_size,
            "dual_attention_layers": list(cfg.x_block_self_attn_layers), "qk_norm": "rms_norm" if cfg.qk_norm else None}


# ---------------------------------------------------------------------------------------------
# Parts of each pipeline (flat data)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartSpec:
    folder: str      # sub-folder of the pipeline folder
    library: str     # model_index.json entry: library, class
    cls: str
    kind: str        # unet | vae | clip | open_clip | t5 | mmdit


PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}
FAMILY_OF_PIPELINE = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
                      "StableDiffusionXLInpaintPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3",
                      "StableDiffusion3Img2ImgPipeline": "sd3", "StableDiffusion3InpaintPipeline": "sd3"}
PARTS: dict[str, dict[str, PartSpec]] = {
    "sdxl": {"unet": PartSpec("unet", "diffusers", "UNet2DConditionModel", "unet"),
             "vae": PartSpec("vae", "diffusers", "AutoencoderKL", "vae"),
             "te1": PartSpec("text_encoder", "transformers", "CLIPTextModel", "clip"),
             "te2": PartSpec("text_encoder_2", "transformers", "CLIPTextModelWithProjection", "open_clip")},
    "sd3": {"mmdit": PartSpec("transformer", "diffusers", "SD3Transformer2DModel", "mmdit"),
            "vae": PartSpec("vae", "diffusers", "AutoencoderKL", "vae"),
            "clip_l": PartSpec("text_encoder", "transformers", "CLIPTextModelWithProjection", "clip"),
            "clip_g": PartSpec("text_encoder_2", "transformers", "CLIPTextModelWithProjection", "clip"),
            "t5": PartSpec("text_encoder_3", "transformers", "T5EncoderModel", "t5")},
}
OPTIONAL_PARTS = {"sd3": ("t5",)}  # SD3 runs without T5 (model_index.json may list text_encoder_3 as null)
# transformers 5 may write CLIPTextModel without its `text_model.` level (it renames on load); hub files have it.
HF_CLIP_INNER = ("embeddings.", "encoder.", "final_layer_norm.")
# Keys of diffusers / transformers files that carry no weights of ours (HF position ids).
IGNORED_DIFFUSERS_KEYS = ("embeddings.position_ids",)
TOKENIZERS = {"sdxl": ("tokenizer", "tokenizer_2"), "sd3": ("tokenizer", "tokenizer_2")}


def _json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return out


def is_diffusers_folder(path: str) -> bool:
    return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_INDEX))


# ---------------------------------------------------------------------------------------------
# Reading: weights of one part (single file, shards, variants)
# ---------------------------------------------------------------------------------------------

def weight_files(folder: str) -> list[str] | None:
    """The safetensors files of one part folder: plain weights first, else a variant (fp16, ...); shards through
    their index json. None when there are none."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    for variant in (None, *VARIANTS):
        for stem in WEIGHT_STEMS:
            single = f"{stem}.safetensors" if variant is None else f"{stem}.{variant}.safetensors"
            index = f"{stem}.safetensors.index.json" if variant is None else f"{stem}.safetensors.index.{variant}.json"
            if single in names:
                return [os.path.join(folder, single)]
            if index in names:
                weight_map = _json(os.path.join(folder, index)).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{os.path.join(folder, index)}: no weight_map")
                files = sorted(set(weight_map.values()))
                lost = [f for f in files if f not in names]
                if lost:
                    raise CheckpointError(f"{folder}: shard(s) listed in {index} are missing: {', '.join(lost)}")
                return [os.path.join(folder, f) for f in files]
    return None


class _Weights:
    """Several safetensors files read as one (lazy, memory-mapped)."""

    def __init__(self, files: Sequence[str]):
        self.files = [SafeTensorFile(p) for p in files]
        self.where: dict[str, SafeTensorFile] = {}
        for f in self.files:
            for k in f.keys():
                if k in self.where:
                    raise CheckpointError(f"{f.path}: tensor {k!r} is also in {self.where[k].path}")
                self.where[k] = f

    def shape(self, k: str) -> tuple[int, ...]:
        return self.where[k].shape(k)

    def get(self, k: str) -> Tensor:
        return self.where[k].get(k)


_KEYS_CACHE: dict[tuple[str, str], tuple[str, ...]] = {}


def _module_keys(kind: str, cfg: Any) -> tuple[str, ...]:
    """The original key set of a part (our module's state dict, built once per config on the meta device)."""
    from models import mmdit, text_encoders, unet_sdxl, vae
    cache_key = (kind, repr(cfg))
    if cache_key not in _KEYS_CACHE:
        build = {"unet": unet_sdxl.UNet, "vae": vae.AutoencoderKL, "open_clip": text_encoders.OpenCLIPTextModel,
                 "mmdit": mmdit.MMDiT}[kind]
        with torch.device("meta"):
            _KEYS_CACHE[cache_key] = tuple(build(cfg).state_dict().keys())
    return _KEYS_CACHE[cache_key]


CONFIG_FROM_JSON = {"unet": unet_config, "vae": vae_config, "clip": clip_config, "open_clip": clip_config,
                    "t5": t5_config, "mmdit": mmdit_config}
BLOCKS = {"unet": unet_blocks, "vae": vae_blocks, "open_clip": open_clip_blocks, "mmdit": mmdit_blocks}
# Config fields the json knows and the weights do not show (applied over what models.load infers from shapes).
JSON_FIELDS = {"unet": ("num_head_channels",), "vae": ("scaling_factor", "shift_factor"), "clip": ("num_heads", "act"),
               "open_clip": ("num_heads", "act")}


def part_map(kind: str, cfg: Any, keys: Iterable[str] | None = None) -> dict[str, Target] | None:
    """Original key -> Target for a part (`keys`: its original keys, default those of our module for `cfg`); None
    where the naming is the same (HF CLIP, T5)."""
    if kind not in BLOCKS:
        return None
    return map_keys(_module_keys(kind, cfg) if keys is None else keys, BLOCKS[kind](cfg))


class DiffusersFolder:
    """A diffusers pipeline folder read as one original-layout checkpoint (SafeTensorFile's interface)."""

    def __init__(self, path: str):
        self.path = str(path)
        index = _json(os.path.join(self.path, MODEL_INDEX))
        cls = index.get("_class_name", "")
        family = FAMILY_OF_PIPELINE.get(cls)
        if family is None:  # by its parts
            family = "sd3" if "transformer" in index else ("sdxl" if "unet" in index else None)
        if family is None:
            raise CheckpointError(f"{self.path}: {MODEL_INDEX} names pipeline {cls!r}, not an SDXL or SD3 pipeline")
        self.family = family
        from models import FAMILIES
        prefixes = FAMILIES[family].prefix
        missing, present = [], {}
        for name, spec in PARTS[family].items():
            entry = index.get(spec.folder)
            listed_null = isinstance(entry, list) and (not entry or entry[0] is None)
            if name in OPTIONAL_PARTS.get(family, ()) and (listed_null or spec.folder not in index):
                continue
            sub = os.path.join(self.path, spec.folder)
            files = weight_files(sub)
            lacks = [what for what, ok in (("config.json", os.path.isfile(os.path.join(sub, CONFIG))),
                                           ("weights (*.safetensors)", files is not None)) if not ok]
            if not os.path.isdir(sub):
                missing.append(f"{spec.folder}/")
            elif lacks:
                missing.append(f"{spec.folder}/ ({' and '.join(lacks)})")
            else:
                present[name] = (spec, sub, files)
        if missing:
            raise CheckpointError(f"{self.path}: diffusers folder is missing {', '.join(missing)}")
        self._entries: dict[str, tuple[_Weights, Target]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.config_overrides: dict[str, dict[str, Any]] = {}
        for name, (spec, sub, files) in present.items():
            self._add_part(name, spec, sub, files, prefixes[name])
        self.metadata: dict[str, str] = {}
        self._markers = self._scheduler_markers()

    def _add_part(self, name: str, spec: PartSpec, sub: str, files: Sequence[str], prefix: str) -> None:
        where = os.path.join(sub, CONFIG)
        j = _json(where)
        try:
            cfg = CONFIG_FROM_JSON[spec.kind](j, where)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: not a {spec.cls} config sdtrain reads: {e}") from None
        self.config_overrides[name] = {f: getattr(cfg, f) for f in JSON_FIELDS.get(spec.kind, ())}
        w = _Weights(files)
        mapping = part_map(spec.kind, cfg)
        if mapping is None:  # same names; CLIP keys without `text_model.` get it back
            nest = spec.kind == "clip"
            mapping = {("text_model." + k if nest and k.startswith(HF_CLIP_INNER) else k): Target((k,))
                       for k in w.where if k.removeprefix("text_model.") not in IGNORED_DIFFUSERS_KEYS}
        lost = [k for t in mapping.values() for k in t.keys if k not in w.where]
        used = {k for t in mapping.values() for k in t.keys}
        extra = [k for k in w.where if k not in used and k.removeprefix("text_model.") not in IGNORED_DIFFUSERS_KEYS]
        if lost or extra:
            parts = [f"missing {len(lost)} tensor(s), e.g. {lost[:5]}"] if lost else []
            parts += [f"{len(extra)} unexpected tensor(s), e.g. {extra[:5]}"] if extra else []
            raise CheckpointError(f"{sub}: weights do not match its config.json as a {spec.cls}: {'; '.join(parts)}")
        for key, target in mapping.items():
            self._entries[prefix + key] = (w, target)
            self._shapes[prefix + key] = shape_from_diffusers(target.op, [w.shape(k) for k in target.keys])

    def _scheduler_markers(self) -> dict[str, Tensor]:
        """v_pred / ztsnr markers from scheduler/scheduler_config.json (SDXL), as a marked single file has them."""
        path = os.path.join(self.path, "scheduler", "scheduler_config.json")
        if self.family != "sdxl" or not os.path.isfile(path):
            return {}
        j = _json(path)
        from models import sdxl
        out = {}
        if j.get("prediction_type") == "v_prediction":
            out[sdxl.V_PRED_MARKER] = torch.zeros(0)
        if j.get("rescale_betas_zero_snr"):
            out[sdxl.ZTSNR_MARKER] = torch.zeros(0)
        return out

    # -- SafeTensorFile's interface -------------------------------------------------------------
    def __repr__(self) -> str:
        return f"DiffusersFolder({self.path!r}, {len(self._shapes)} tensors)"

    def __contains__(self, key: str) -> bool:
        return key in self._shapes or key in self._markers

    def keys(self) -> list[str]:
        return [*self._shapes, *self._markers]

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._markers:
            return (0,)
        if key not in self._shapes:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}")
        return self._shapes[key]

    def shapes(self, prefix: str = "", strip: bool = True) -> dict[str, tuple[int, ...]]:
        out = {(k[len(prefix):] if strip else k): s for k, s in self._shapes.items() if k.startswith(prefix)}
        out.update({(k[len(prefix):] if strip else k): (0,) for k in self._markers if k.startswith(prefix)})
        return out

    def get(self, key: str) -> Tensor:
        if key in self._markers:
            return self._markers[key]
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}")
        w, target = self._entries[key]
        return from_diffusers(target.op, [w.get(k) for k in target.keys])


# ---------------------------------------------------------------------------------------------
# Writing ([save] save_model_as = "diffusers")
# ---------------------------------------------------------------------------------------------

SCHEDULERS = {
    "sdxl": lambda comp: {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                          "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                          "beta_schedule": "scaled_linear", "prediction_type": "v_prediction" if comp.v_parameterization
                          else "epsilon", "rescale_betas_zero_snr": bool(comp.zero_terminal_snr),
                          "timestep_spacing": "leading", "steps_offset": 1, "interpolation_type": "linear",
                          "use_karras_sigmas": False, "clip_sample": False, "sample_max_value": 1.0,
                          "set_alpha_to_one": False, "skip_prk_steps": True},
    "sd3": lambda comp: {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                         "num_train_timesteps": 1000, "shift": float(comp.shift)},
}
NETWORK = {"sdxl": "unet", "sd3": "mmdit"}  # the part whose file carries the export's modelspec metadata
SCHEDULER_CLASS = {"sdxl": "EulerDiscreteScheduler", "sd3": "FlowMatchEulerDiscreteScheduler"}


def part_tensors(family: str, name: str, module_cfg: Any, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One part's original state dict (no file prefix) -> its diffusers / transformers tensors."""
    spec = PARTS[family][name]
    mapping = part_map(spec.kind, module_cfg, sd.keys())
    if mapping is None:
        out = dict(sd)
    else:
        out = {}
        for key, t in sd.items():
            target = mapping[key]
            for k, v in zip(target.keys, to_diffusers(target.op, t, len(target.keys))):
                out[k] = v.contiguous()
    if family == "sd3" and name == "clip_l" and "text_projection.weight" not in out:
        # CLIPTextModelWithProjection needs one; the SD3 reference does not project CLIP-L: the identity
        width = out["text_model.final_layer_norm.weight"].shape[0]
        out["text_projection.weight"] = torch.eye(width, dtype=out["text_model.final_layer_norm.weight"].dtype)
    if spec.kind == "t5":
        out.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight, as transformers writes it
    return out


def part_json(family: str, name: str, module_cfg: Any) -> dict[str, Any]:
    kind = PARTS[family][name].kind
    if kind == "unet":
        return unet_json(module_cfg)
    if kind == "vae":
        return vae_json(module_cfg)
    if kind == "mmdit":
        return mmdit_json(module_cfg)
    if kind == "t5":
        return t5_json(module_cfg)
    with_proj = PARTS[family][name].cls == "CLIPTextModelWithProjection"
    if family == "sd3" and name == "clip_l":
        from dataclasses import replace
        module_cfg = replace(module_cfg, projection_dim=module_cfg.hidden_size)
    return clip_json(module_cfg, with_proj)


def model_index(family: str, names: Iterable[str], with_tokenizers: bool) -> dict[str, Any]:
    parts = PARTS[family]
    out: dict[str, Any] = {"_class_name": PIPELINES[family], "_diffusers_version": DIFFUSERS_VERSION,
                           "scheduler": ["diffusers", SCHEDULER_CLASS[family]]}
    for name, spec in parts.items():
        out[spec.folder] = [spec.library, spec.cls] if name in names else [None, None]
    for tok in TOKENIZERS[family]:
        out[tok] = ["transformers", "CLIPTokenizer"] if with_tokenizers else [None, None]
    if family == "sdxl":
        out["force_zeros_for_empty_prompt"] = True  # the original SDXL samplers zero the unconditional text
    else:
        out["text_encoder_3"] = out.get("text_encoder_3", [None, None])
        out["tokenizer_3"] = [None, None]
    return out


def write_clip_tokenizer(folder: str, pad_token: str) -> None:
    """vocab.json + merges.txt of the CLIP BPE tokenizer from our bundled vocabulary (models/tokenizers.py), and the
    tokenizer configs HF's CLIPTokenizer reads; `pad_token`: '<|endoftext|>' (CLIP-L) or '!' (bigG pads with id 0)."""
    import gzip

    from models.tokenizers import NUM_MERGES, bytes_to_unicode, default_vocab_path
    with gzip.open(default_vocab_path()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    pairs = [tuple(m.split()) for m in merges]
    chars = list(bytes_to_unicode().values())
    vocab_list = [*chars, *(c + "</w>" for c in chars), *("".join(p) for p in pairs), "<|startoftext|>",
                  "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab_list)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token, "do_lower_case": True,
        "clean_up_tokenization_spaces": True, "errors": "replace"})
    _write_json(os.path.join(folder, "special_tokens_map.json"), {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token})


def _write_json(path: str, obj: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def save_diffusers(comp: Any, path: str, sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write `comp`'s parts (`sd`: its export_state_dict, already in the export precision) as a diffusers folder at
    `path`: model_index.json, one sub-folder per loaded part (config.json + weights), scheduler config, CLIP
    tokenizers. Atomic: written into a temporary folder beside `path`, fsynced, then renamed into place (an
    existing folder is replaced only after the new one is complete)."""
    from core.fsio import fsync_dir, fsync_file, remove_quietly, save_safetensors, set_file_mode, temp_path
    family = comp.family
    prefixes = comp.prefix
    path = os.path.abspath(path)
    tmp = temp_path(path)
    names = [n for n in comp.parts() if n in PARTS[family]]
    header = {"format": "pt", **dict(metadata or {})}
    try:
        os.makedirs(tmp)
        for name in names:
            spec, module = PARTS[family][name], comp.parts()[name]
            sub = os.path.join(tmp, spec.folder)
            os.makedirs(sub)
            part_sd = {k[len(prefixes[name]):]: v for k, v in sd.items() if k.startswith(prefixes[name])}
            own = set(module.state_dict())
            part_sd = {k: v for k, v in part_sd.items() if k in own}  # position ids, logit_scale, markers stay out
            stem = "diffusion_pytorch_model" if spec.library == "diffusers" else "model"
            meta = header if name == NETWORK[family] else {"format": "pt"}
            save_safetensors(part_tensors(family, name, module.cfg, part_sd), os.path.join(sub, f"{stem}.safetensors"),
                             metadata=meta)
            _write_json(os.path.join(sub, CONFIG), part_json(family, name, module.cfg))
        os.makedirs(os.path.join(tmp, "scheduler"))
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), SCHEDULERS[family](comp))
        try:
            for tok, pad in zip(TOKENIZERS[family], ("<|endoftext|>", "!")):
                write_clip_tokenizer(os.path.join(tmp, tok), pad)
            with_tok = True
        except FileNotFoundError:  # no bundled BPE vocabulary (open_clip not installed): the folder has none
            for tok in TOKENIZERS[family]:
                shutil.rmtree(os.path.join(tmp, tok), ignore_errors=True)
            with_tok = False
        _write_json(os.path.join(tmp, MODEL_INDEX), model_index(family, names, with_tok))
        for root, _dirs, files in os.walk(tmp):
            for f in files:
                set_file_mode(os.path.join(root, f))
                fsync_file(os.path.join(root, f))
            fsync_dir(root)
        old = None
        if os.path.exists(path):
            old = temp_path(path, ".old")
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(path))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_quietly(tmp)
        raise
