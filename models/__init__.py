"""Public model API.

    comp = models.build("sdxl", "tiny")                 # random weights, real structure
    comp = models.load("sd_xl_base_1.0.safetensors")    # family and sizes inferred from the file
    models.save(comp, "out.safetensors", precision="fp16")

`comp` is an `SDXL` or `SD3` object (models/sdxl.py, models/sd3.py): its parts (`unet` / `mmdit`,
`vae`, text encoders), `network`, `encode_text`, `conditioning`, `encode_images`,
`decode_latents`, `sample_schedule`, `export_state_dict`.

What a family is (its parts, what trains, its objective, defaults, cache layout, export names, LoRA targets) is one
`Family` record per family (models/family.py; FAMILY in models/sdxl.py and models/sd3.py): `models.family(name)`.

Loading builds every part on the meta device and assigns tensors read lazily from the
memory-mapped file one at a time, so the weights never exist twice in memory. Every key and
shape is checked; only the known harmless extras (CONVENTIONS.md) are ignored.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from models import sd3, sdxl
from models import vae as vae_mod
from models.checkpoint import (TORCH_SUFFIXES, CheckpointError, SafeTensorFile, TorchFile, check_module_keys, load_module,
                               modelspec_hash, modelspec_metadata, save_safetensors_streamed)
from models.diffusers_layout import DiffusersFolder, convert_diffusers_vae, is_diffusers_folder, is_diffusers_vae
from models.family import Family, strip_prefix

FAMILIES: dict[str, Family] = {f.name: f for f in (sdxl.FAMILY, sd3.FAMILY)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

__all__ = ["build", "load", "open_checkpoint", "save", "export_metadata", "detect_family", "from_config",
           "resolve_prediction", "file_markers", "load_vae", "vae_identity", "load_text_encoders", "CheckpointError",
           "FAMILIES", "Family", "family"]


def family(name: str) -> Family:
    """The record of a model family by name ("sdxl", "sd3"); an unknown name is a clear error."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; available: {', '.join(FAMILIES)}")
    return FAMILIES[name]


_record = family  # for the functions below, whose `family` argument is the name


def open_checkpoint(path: str) -> Any:
    """A checkpoint by its form: a diffusers folder (model_index.json), a .ckpt / .pt file (torch.load with
    weights_only=True), else a .safetensors file; all read through SafeTensorFile's interface, in the original layout."""
    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path}: a folder without model_index.json; give a .safetensors / .ckpt file or a "
                                  "diffusers folder (model_index.json, unet/ or transformer/, vae/, text_encoder*/)")
        return DiffusersFolder(path)
    if str(path).lower().endswith(TORCH_SUFFIXES):
        return TorchFile(path)
    return SafeTensorFile(path)


def detect_family(keys: Iterable[str], source: str = "") -> str:
    """'sdxl' or 'sd3' from a checkpoint's key names (`source`: the file, named in the error)."""
    keys = list(keys)
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
        return "sd3"
    if any(k.startswith("model.diffusion_model.input_blocks.") or k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    raise CheckpointError(f"{source + ': ' if source else ''}cannot tell the model family from the checkpoint's keys: "
                          "expected SDXL (model.diffusion_model.input_blocks.*) or SD3 (model.diffusion_model.joint_blocks.*)")


def _part_seed(seed: int, name: str) -> int:
    """Per-part seed so a part built alone (e.g. the VAE in cache.py) equals the same part built with the rest."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _assemble(fam: Family, modules: Mapping[str, nn.Module], opts: Mapping[str, Any]) -> Any:
    """The family's components from loaded parts, model.clip_skip (default 2) checked against the CLIPs' depth."""
    clip_skip = opts.get("clip_skip") or 2
    clips = [m.cfg.num_layers for k, m in modules.items() if k in ("te1", "te2", "clip_l", "clip_g")]
    if clips and clip_skip > min(clips):
        raise CheckpointError(f"model.clip_skip = {clip_skip}: the text encoders have {min(clips)} layers")
    return fam.assemble(modules, {**opts, "clip_skip": clip_skip})


def _dtype_for(name: str, fam: Family, dtype: torch.dtype | Mapping[str, torch.dtype] | None) -> torch.dtype | None:
    """A part's dtype: `dtype` itself, or from a map by part name, else by role ("network", "text")."""
    if isinstance(dtype, Mapping):
        if name in dtype:
            return dtype[name]
        key = "network" if name == fam.network else ("text" if name in fam.text_encoders else name)
        return dtype.get(key)
    return dtype


def build(family: str, preset: str, *, device: str | torch.device = "cpu", dtype: Any = None, seed: int = 0,
          parts: Sequence[str] | None = None, **opts: Any) -> Any:
    """Components with random weights from a preset ('tiny', 'base' / 'sd3_medium', ...)."""
    fam = _record(family)
    cfgs = fam.preset_configs(preset)
    if family == "sd3":
        opts.setdefault("context_dim", cfgs["mmdit"].context_in_dim)
        opts.setdefault("clip_l_width", cfgs["clip_l"].hidden_size)  # per-encoder dropout without CLIP-L loaded
    modules = {}
    for name, cfg in cfgs.items():
        if parts is not None and name not in parts:
            continue
        # drawn by the CPU generator, then moved: the same weights on any device (a CUDA init would draw from the
        # device's generator, so a GPU run and its CPU check, or cache.py and the export's VAE, would differ)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(_part_seed(seed, name))  # CPU only: no other RNG touched
            with torch.device("meta" if torch.device(device).type == "meta" else "cpu"):  # meta: shapes only
                m = fam.module_for(name, cfg)
        modules[name] = m.to(device=device, dtype=_dtype_for(name, fam, dtype))
    return _assemble(fam, modules, opts)


def _separate_parts(family: str, *, vae: str | None, clip_l: str | None, clip_g: str | None,
                    t5xxl: str | None) -> dict[str, str | None]:
    """The family's part names the separate files (model.vae / clip_l / clip_g / t5xxl) stand for."""
    given = {"vae": vae, "te1": clip_l, "clip_l": clip_l, "clip_g": clip_g, "t5": t5xxl}
    return {name: p for name, p in given.items() if name in _record(family).prefix}


def _separate_file(path: str, prefix_in_main: str) -> tuple[SafeTensorFile, str, dict[str, tuple[int, ...]]]:
    """A part given as its own file: keys may carry the main file's prefix or none."""
    f = open_checkpoint(path)
    shapes = f.shapes()
    sub = strip_prefix(shapes, prefix_in_main)
    return (f, prefix_in_main, sub) if sub else (f, "", shapes)


def file_markers(f: Any, family: str) -> dict[str, bool]:
    """How a checkpoint says it was trained, read as ComfyUI reads SDXL files (comfy/supported_models.py
    SDXL.model_type): v-prediction when the top-level `v_pred` key exists (or, from our older exports, when
    modelspec.prediction_type is "v"), zero terminal SNR when `ztsnr` exists. SD3 (flow matching): neither."""
    if family != "sdxl":
        return {"v_parameterization": False, "zero_terminal_snr": False}
    edm = [k for k in sdxl.EDM_MARKERS if k in f]
    if edm:
        raise CheckpointError(f"{f.path}: an EDM-parameterised SDXL model ({', '.join(edm)}; e.g. Playground v2.5) "
                              "is not supported: sdtrain trains DDPM epsilon / v-prediction models")
    return {"v_parameterization": sdxl.V_PRED_MARKER in f or f.metadata.get("modelspec.prediction_type") == "v",
            "zero_terminal_snr": sdxl.ZTSNR_MARKER in f}


def _check_leftovers(keys: Iterable[str], prefixes: Iterable[str], ignore: Sequence[str], source: str) -> None:
    prefixes = tuple(prefixes)
    stray = [k for k in keys if not k.startswith(prefixes) and not any(fnmatch.fnmatch(k, p) for p in ignore)]
    if stray:
        raise CheckpointError(f"{source}: {len(stray)} unexpected key(s) outside the known parts, e.g. {stray[:10]}")


def load(path: str | None, family: str | None = None, *, vae: str | None = None, clip_l: str | None = None,
         clip_g: str | None = None, t5xxl: str | None = None, dtype: Any = None, device: str | torch.device = "cpu",
         parts: Sequence[str] | None = None, check_only: bool = False, **opts: Any) -> Any:
    """Load a single-file checkpoint (+ optional separate part files). `parts` limits what is loaded
    (e.g. ('vae',)); missing text encoders in the main file may come from separate files. `check_only`: read the
    headers and check every key and shape of `parts` as loading would (parts built on the meta device, no tensor
    read), then return None: a run checks the files it needs later before it starts."""
    sources: dict[str, tuple[SafeTensorFile, str, dict[str, tuple[int, ...]]]] = {}
    main = open_checkpoint(path) if path else None
    main_shapes = main.shapes() if main is not None else {}
    markers: dict[str, bool] = {}
    if main is not None and family is None:
        family = detect_family(main_shapes, main.path)
    if family is None:
        raise ValueError("model family unknown: give a checkpoint or family=")
    fam = _record(family)
    if main is not None:
        markers = file_markers(main, family)
        _check_leftovers(main_shapes, fam.prefix.values(), (*fam.ignore, *fam.markers), main.path)
        if family == "sd3" and sd3.CONTEXT_EMBEDDER in main_shapes:
            opts.setdefault("context_dim", main_shapes[sd3.CONTEXT_EMBEDDER][1])
        for name, prefix in fam.prefix.items():
            sub = strip_prefix(main_shapes, prefix)
            if sub:
                sources[name] = (main, prefix, sub)
        if family == "sd3" and "clip_l" in sources:  # CLIP-L's width also when it is not loaded (cached text)
            opts.setdefault("clip_l_width", sources["clip_l"][2].get(sd3.CLIP_L_WIDTH_KEY, (sd3.CLIP_L_WIDTH,))[0])
    for name, p in _separate_parts(family, vae=vae, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl).items():
        if p:
            sources[name] = _separate_file(p, fam.prefix[name])
    modules = {}
    for name, (f, prefix, sub_shapes) in sources.items():
        if parts is not None and name not in parts:
            continue
        if name == "vae" and prefix == "" and is_diffusers_vae(sub_shapes):
            if not check_only:  # (converted in memory on load; its layout is told by is_diffusers_vae)
                modules[name] = _load_diffusers_vae(f, _dtype_for(name, fam, dtype), device)
            continue
        if name == "t5" and not opts.get("use_t5", True):
            continue
        try:
            cfg = fam.configs_from_shapes({fam.prefix[name] + k: s for k, s in sub_shapes.items()})[name]
            known = getattr(f, "config_overrides", {}).get(name)  # a diffusers folder's config.json values
            if known:
                cfg = dataclasses.replace(cfg, **known)
        except CheckpointError:
            raise
        except (KeyError, ValueError) as e:  # layout that no config explains: name the file and the part
            reason = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
            raise CheckpointError(f"{f.path}: the {name} weights do not match a known {family} layout: "
                                  f"{reason}") from None
        with torch.device("meta"):
            module = fam.module_for(name, cfg)
        get, part_shapes = f.get, {prefix + k: s for k, s in sub_shapes.items()}
        aliases = {prefix + a: prefix + b for a, b in fam.aliases.get(name, {}).items()
                   if prefix + a not in part_shapes and prefix + b in part_shapes}
        if aliases:  # a tied weight stored once (e.g. T5's embed_tokens = shared)
            part_shapes.update({a: part_shapes[b] for a, b in aliases.items()})
            get = lambda k, _get=f.get, _al=aliases: _get(_al.get(k, k))  # noqa: E731
        if check_only:
            check_module_keys(module, None, list(part_shapes), prefix=prefix, ignore=fam.ignore, source=f.path,
                              shapes=part_shapes)
            continue
        load_module(module, get, list(part_shapes), prefix=prefix, ignore=fam.ignore,
                    dtype=_dtype_for(name, fam, dtype), device=device, source=f.path, shapes=part_shapes)
        modules[name] = module
    missing = [n for n in (parts or ()) if n not in sources and not (n == "t5" and not opts.get("use_t5", True))]
    if missing:
        raise CheckpointError(f"{path}: no weights for {', '.join(missing)} (give them as separate files?)")
    if check_only:
        return None
    for name in ("v_parameterization", "zero_terminal_snr"):  # None: as the file's markers say
        if opts.get(name) is None:
            opts[name] = main is not None and markers[name]
    comp = _assemble(fam, modules, opts)
    if main is not None and family == "sdxl":
        for k in (sdxl.CLIP_L_POSITION_IDS, sdxl.BIGG_LOGIT_SCALE):
            if k in main:
                comp.extras[k] = main.get(k).clone()  # a view would keep the whole file mapped
    return comp


def _load_diffusers_vae(f: SafeTensorFile, dtype: torch.dtype | None, device: Any) -> nn.Module:
    """A standalone VAE file in diffusers naming, converted to the original keys in memory (the VAE is small)."""
    sd = convert_diffusers_vae({k: f.get(k) for k in f.keys()})
    cfg = vae_mod.config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})
    with torch.device("meta"):
        module = vae_mod.AutoencoderKL(cfg)
    load_module(module, sd.__getitem__, list(sd), prefix="", ignore=(), dtype=dtype, device=device, source=f.path)
    return module




def export_metadata(comp: Any, path: str, tensors: Mapping[str, Tensor] | None = None, *, title: str = "",
                    resolution: int | str | None = None, info: Mapping[str, str] | None = None,
                    extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The safetensors header of an export, apart from the tensor writing (streamed writers use it too):
    modelspec (title default: the file name; `resolution` the trained one, an int side or "WxH"; `info`:
    author / description / license / tags) + `extra` (training metadata). `tensors`, when given, are hashed into
    modelspec.hash_sha256 (models.checkpoint.modelspec_hash) exactly as they will be written."""
    spec = comp.modelspec()
    reso = spec["resolution"] if resolution is None else (f"{resolution}x{resolution}" if isinstance(resolution, int)
                                                         else str(resolution))
    return modelspec_metadata(spec["architecture"], title or os.path.splitext(os.path.basename(path))[0], reso,
                              spec.get("prediction_type"), extra=extra, implementation=spec.get("implementation", ""),
                              info=info, hash_sha256=modelspec_hash(tensors) if tensors is not None else "")


SAVE_FORMATS = ("safetensors", "diffusers")
EXPORT_SUFFIX = {"safetensors": ".safetensors", "diffusers": ""}  # a diffusers export is a folder


def save(comp: Any, path: str, precision: str = "fp16", title: str = "", extra_metadata: Mapping[str, str] | None = None,
         state_dict: Mapping[str, Tensor] | None = None, *, resolution: int | str | None = None,
         info: Mapping[str, str] | None = None, save_as: str = "safetensors",
         gather: Callable[[Tensor], Tensor] | None = None, write: bool = True) -> None:
    """Write the exact original single-file layout in `precision` with modelspec metadata (export_metadata),
    atomically; `save_as = "diffusers"`: a diffusers folder at `path` instead (models/diffusers_layout.py; the
    metadata goes into the network's weights file). `state_dict`: the export_state_dict() to write (e.g. with EMA
    weights), else taken from `comp`. The single file is streamed: the header first, then one tensor at a time,
    each gathered by `gather` just before it is written (FSDP2: `DTensor.full_tensor`; collective, so every rank
    calls save with the same keys and only the rank with `write=True` writes), so no process holds the whole model
    twice; modelspec.hash_sha256 is hashed on the way (models.checkpoint.modelspec_hash of the same tensors) and
    filled into the header at the end. A diffusers folder is converted as a whole: gathered first."""
    if save_as not in SAVE_FORMATS:
        raise ValueError(f"save_as must be one of {', '.join(SAVE_FORMATS)}, got {save_as!r}")
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    src = state_dict if state_dict is not None else comp.export_state_dict()
    if save_as == "diffusers":
        from models.diffusers_layout import save_diffusers
        dt, full = DTYPES[precision], gather or (lambda t: t)
        sd = {k: (full(v).detach().to("cpu", dt) if v.is_floating_point() else full(v).detach().cpu())
              for k, v in src.items()}
        if write:
            save_diffusers(comp, path, sd, export_metadata(comp, path, sd, title=title, resolution=resolution,
                                                           info=info, extra=extra_metadata))
        return
    meta = export_metadata(comp, path, None, title=title, resolution=resolution, info=info,
                           extra=extra_metadata) if write else None
    save_safetensors_streamed(src, path, DTYPES[precision], meta, gather=gather, write=write,
                              sha256_field="modelspec.hash_sha256")


# ----------------------------------------------------------------------------------------------
# Config-driven helpers (train.py, cache.py, generate.py)
# ----------------------------------------------------------------------------------------------


def _opts(model_cfg: Any) -> dict[str, Any]:
    return {"max_token_length": model_cfg.max_token_length, "v_parameterization": model_cfg.v_parameterization,
            "t5_max_token_length": model_cfg.t5_max_token_length, "t5_tokenizer": model_cfg.t5_tokenizer,
            "use_t5": model_cfg.use_t5, "apply_t5_attn_mask": model_cfg.apply_t5_attn_mask,
            "clip_skip": model_cfg.clip_skip}


def family_of(model_cfg: Any) -> str:
    """The family's name: model.model_family, or detected from the checkpoint's keys or the preset's name."""
    if model_cfg.model_family != "auto":
        return model_cfg.model_family
    if model_cfg.pretrained_model_name_or_path:
        f = open_checkpoint(model_cfg.pretrained_model_name_or_path)
        return detect_family(f.keys(), f.path)
    preset = model_cfg.model_preset
    named = [f.name for f in FAMILIES.values() if preset in f.presets]
    if named:
        return named[0]  # a name two families share ("tiny"): the first, SDXL
    raise ValueError(f"model.model_family = auto needs a checkpoint or a known preset; got preset {preset!r}")


def from_config(model_cfg: Any, *, device: str | torch.device = "cpu", dtype: Any = None, seed: int = 0,
                parts: Sequence[str] | None = None, zero_terminal_snr: bool | None = None,
                check_only: bool = False) -> Any:
    """Components as the [model] table describes: a checkpoint (+ separate files) or a random preset.
    `zero_terminal_snr` ([loss]): None = as the checkpoint's markers say. `check_only`: the files `parts` would be
    read from, checked as load(check_only=True) does (a preset's own parts need no file); returns None."""
    family = family_of(model_cfg)
    opts = {**_opts(model_cfg), "zero_terminal_snr": zero_terminal_snr}
    if parts is not None and not model_cfg.use_t5:
        parts = [p for p in parts if p != "t5"]
    if model_cfg.pretrained_model_name_or_path:
        return load(model_cfg.pretrained_model_name_or_path, family, vae=model_cfg.vae or None, clip_l=model_cfg.clip_l or None,
                    clip_g=model_cfg.clip_g or None, t5xxl=model_cfg.t5xxl or None, dtype=dtype, device=device,
                    parts=parts, check_only=check_only, **opts)
    # separate files replace a preset's random parts (the demo: its trained tiny VAE and CLIP text encoders)
    files = {"vae": model_cfg.vae or None, "clip_l": model_cfg.clip_l or None, "clip_g": model_cfg.clip_g or None,
             "t5xxl": model_cfg.t5xxl or None}
    separate = [name for name, given in _separate_parts(family, **files).items()
                if given and (parts is None or name in parts) and (name != "t5" or model_cfg.use_t5)]
    if check_only:
        if separate:
            load(None, family, **files, parts=separate, check_only=True)
        return None
    if not model_cfg.model_preset:
        raise ValueError("set model.pretrained_model_name_or_path (a checkpoint) or model.model_preset (random weights)")
    fam = _record(family)
    if fam.optional_parts and not model_cfg.use_t5:
        parts = [p for p in (parts or fam.prefix) if p not in fam.optional_parts]
    comp = build(family, model_cfg.model_preset, device=device, dtype=dtype, seed=seed, parts=parts, **opts)
    if separate:
        loaded = load(None, family, **files, dtype=dtype, device=device, parts=separate)
        for name in separate:
            setattr(comp, name, getattr(loaded, name))
    return comp


def resolve_prediction(cfg: Any) -> tuple[Any, list[str]]:
    """cfg with model.v_parameterization and loss.zero_terminal_snr decided: a value set in the config wins,
    unset (None) ones follow the checkpoint's markers (file_markers), else false. Also returns log lines saying
    which won where the two could differ."""
    family = family_of(cfg.model)
    path = cfg.model.pretrained_model_name_or_path
    found = file_markers(open_checkpoint(path), family) if path else {"v_parameterization": False, "zero_terminal_snr": False}
    notes, fields = [], {}
    for table, name, marker in (("model", "v_parameterization", "v_pred"), ("loss", "zero_terminal_snr", "ztsnr")):
        given = getattr(getattr(cfg, table), name)
        fields[name] = found[name] if given is None else given
        if given is None and found[name]:
            notes.append(f"{table}.{name} = true: from the checkpoint's `{marker}` marker")
        elif given is not None and path and family == "sdxl" and given != found[name]:
            notes.append(f"{table}.{name} = {str(given).lower()} from the config overrides the checkpoint "
                         f"({'has' if found[name] else 'has no'} `{marker}` marker)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, v_parameterization=fields["v_parameterization"]),
                               loss=dataclasses.replace(cfg.loss, zero_terminal_snr=fields["zero_terminal_snr"])), notes


def load_vae(model_cfg: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """The VAE alone (cache.py)."""
    return from_config(model_cfg, device=device, dtype=dtype, seed=seed, parts=("vae",)).vae


def _file_identity(path: str) -> str:
    """Path, size and mtime of a file; of a folder (diffusers), the same of every file in it."""
    if os.path.isdir(path):
        return "|".join(_file_identity(os.path.join(root, f)) for root, _d, files in sorted(os.walk(path))
                        for f in sorted(files))
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"


def vae_identity(model_cfg: Any, seed: int = 0) -> str:
    """Fingerprint of the VAE weights' source (file identity, or preset + seed)."""
    if model_cfg.vae:
        src = "file:" + _file_identity(model_cfg.vae)
    elif model_cfg.pretrained_model_name_or_path:
        src = "file:" + _file_identity(model_cfg.pretrained_model_name_or_path)
    else:
        src = f"preset:{family_of(model_cfg)}:{model_cfg.model_preset}:{seed}"
    return hashlib.sha1(src.encode()).hexdigest()[:16]


class TextEncoderRunner:
    """Frozen text encoders for caching their outputs: encode(captions) -> one dict of tensors per caption."""

    def __init__(self, comp: Any, identity: str, device: torch.device | str):
        self.comp, self.identity, self.device = comp, identity, device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[dict[str, Tensor]]:
        """bf16 tensors per caption, in the family's cached layout (read back by its `collate_cached_text`)."""
        compact = getattr(self.comp, "cache_text_items", None)  # SD3: trimmed, exact (models/sd3.py docstring)
        if compact is not None:
            return compact(captions, device=self.device)
        out = self.comp.encode_text(captions, device=self.device)
        return [{k: v[i].to(torch.bfloat16).cpu() for k, v in out.items()} for i in range(len(captions))]


def load_text_encoders(model_cfg: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       seed: int = 0) -> TextEncoderRunner:
    """The frozen text encoders for cache.py, with the identity of what their outputs depend on (part of the cache's
    fingerprint: the family's text-cache layout included)."""
    family = family_of(model_cfg)
    fam = _record(family)
    parts = list(fam.text_encoders)
    comp = from_config(model_cfg, device=device, dtype=dtype, seed=seed, parts=parts)
    for m in comp.text_encoders().values():
        m.eval().requires_grad_(False)
    src = model_cfg.pretrained_model_name_or_path or f"preset:{model_cfg.model_preset}:{seed}"
    ident = "|".join([family, src, model_cfg.clip_l, model_cfg.clip_g, model_cfg.t5xxl, str(model_cfg.max_token_length),
                      str(model_cfg.t5_max_token_length), str(model_cfg.use_t5), str(model_cfg.apply_t5_attn_mask),
                      fam.text_cache_layout] + ([f"clip_skip={model_cfg.clip_skip}"]  # not for the default (old
                                                if model_cfg.clip_skip not in (None, 2) else []))  # caches stay valid)
    return TextEncoderRunner(comp, hashlib.sha1(ident.encode()).hexdigest()[:16], device)
