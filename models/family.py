"""What a model family is (the `Family` record, one per family: models/sdxl.py FAMILY, models/sd3.py FAMILY) and
what every family's components share: the VAE side (images <-> scaled latents) and the prefixed file layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Family:
    """Everything the rest of the code asks about a model family, in one record (as torchtitan's TrainSpec):
    its parts and file layout, what trains and how, its objective, its preview / generate defaults, its text
    cache layout, its export names and its LoRA defaults. Code outside models/ asks this record
    (models.family(name)) instead of testing the family's name."""

    name: str                                   # "sdxl" / "sd3": model.model_family, comp.family
    # -- parts and file layout
    prefix: Mapping[str, str]                   # part -> key prefix in the single file, parts in file order
    network: str                                # the trained diffusion network's part
    text_encoders: tuple[str, ...]              # the text-encoder parts
    optional_parts: tuple[str, ...]             # parts model.use_t5 = false leaves out
    presets: Mapping[str, tuple[str, ...]]      # model.model_preset names -> per-part preset names
    preset_configs: Callable[[str], dict[str, Any]]                 # preset -> per-part configs
    configs_from_shapes: Callable[[Mapping[str, tuple[int, ...]]], dict[str, Any]]  # a file's shapes -> configs
    module_for: Callable[[str, Any], nn.Module]                     # (part, config) -> module
    assemble: Callable[[Mapping[str, nn.Module], Mapping[str, Any]], Any]  # loaded parts + options -> components
    ignore: tuple[str, ...] = ()                # harmless extra keys of real files (fnmatch patterns)
    markers: tuple[str, ...] = ()               # top-level marker keys (read on load, written on export)
    aliases: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # tied weights stored under one name
    # -- training
    trainable_text_lr: Mapping[str, str] = field(default_factory=dict)  # encoders train_text_encoder trains -> their
    #                                                                     [optimizer] learning-rate field
    blocks: tuple[str, ...] = ()                # network attributes whose items FSDP / compile treat as units
    objective: str = "ddpm"                     # diffusion/objectives.py: "ddpm" (eps / v) or "flow"
    text_dropout: tuple[str, ...] = ()          # encoders dropped each with its own rate ([model] <name>_dropout_rate),
    #                                             in the order comp.drop_text takes its per-sample flags
    # -- previews and generate.py
    cfg_scale: float = 7.0                      # default classifier-free guidance scale
    zero_empty_negative: bool = False           # an empty negative prompt is zeroed embeddings (else: encoded "")
    # -- caches and exports
    text_cache_layout: str = ""                 # version of the cached text layout: part of the cache identity
    base_model_version: str = ""                # kohya's ss_base_model_version
    model_versions: Mapping[str, str] = field(default_factory=dict)  # kohya's per-variant one, by modelspec.architecture
    # -- LoRA (kohya names: prefixes per part; default targets as regexes over LoRA names)
    lora_prefixes: Mapping[str, str] = field(default_factory=dict)
    lora_targets: tuple[str, ...] = ()
    lora_conv_targets: tuple[str, ...] = ()     # LoCon's extra targets


def host_to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """A tensor made on the host (token ids, collated cached text) to the training device without stalling it: on
    CUDA through pinned memory with a non-blocking copy (a copy from pageable memory synchronises the stream, even
    with non_blocking=True); elsewhere a plain `.to`."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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

    def drop_text(self, text: dict[str, Tensor], drop: Tensor) -> dict[str, Tensor]:
        """Per-encoder caption dropout (families with a `text_dropout` record override it)."""
        raise ValueError(f"{getattr(self, 'family', '?')}: no per-encoder caption dropout")

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
