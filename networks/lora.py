"""LoRA / LoCon adapters for SDXL and SD3, applied from outside the model files, in kohya's LoRA file format.

Injection (kohya's `networks/lora.py` scheme): every adapted nn.Linear / nn.Conv2d keeps its weights and its place
in the model; only its `forward` is replaced on the instance by `base(x) + up(down(x)) * multiplier * alpha / dim`.
The adapters live in a separate `LoRANetwork` (an nn.Module whose state_dict *is* the kohya file), so the model
classes, their state_dict keys and their exports stay untouched. `remove()` restores the original forwards.

Names (what ComfyUI's `model_lora_keys_unet` / `model_lora_keys_clip` and diffusers' kohya converter read):
    lora_unet_<original module path, "." -> "_">       SDXL sgm UNet (input_blocks_4_1_...), SD3 MMDiT (joint_blocks_...)
    lora_te1_<HF CLIP path>                            CLIP-L (SDXL te1, SD3 clip_l)
    lora_te2_<HF CLIP path>                            bigG: SDXL's open_clip tower under the HF names kohya uses
                                                       (resblocks.N.attn.in_proj -> layers.N.self_attn.{q,k,v}_proj,
                                                       attn.out_proj -> self_attn.out_proj, c_fc / c_proj -> fc1 / fc2);
                                                       SD3 clip_g is HF-named already
    lora_te3_<T5 path>                                 SD3 T5 (loaded for merging only, never trained)
each with `.lora_down.weight`, `.lora_up.weight` and `.alpha`.

bigG's fused in-projection gets three adapters (q, k, v: one down and one up matrix each, as kohya trains them on
the HF model); the patched attention adds [dq; dk; dv] to F.linear(x, in_proj_weight) -- exact, no conversion on
save. Merging writes each delta into its third of in_proj_weight's rows.

Third-party files: `lora_unet_` keys in diffusers naming (down_blocks_1_attentions_0_...) are mapped to the
original paths (`sdxl_diffusers_to_sgm`); LoRAs are merged for generation (`merge_into`) or loaded into a network
to continue training (`LoRANetwork.load_kohya`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import models
from models.text_encoders import OpenCLIPTextModel
from networks.lycoris import ALL_KEYS, LoHaModule, LoKrModule, algo_of, dora_magnitude, group_delta, merged_delta
from training.trainable import TrainableSet

TEXT_PREFIXES = ("lora_te1_", "lora_te2_")  # trained text encoders (SD3's T5 stays frozen, as in kohya)

# Kohya's part prefixes, default targets and ss_base_model_version of each family are in its record (models/sdxl.py,
# models/sd3.py FAMILY: lora_prefixes, lora_targets, lora_conv_targets, base_model_version, model_versions).


def base_model_version(comp: Any) -> str:
    """ss_base_model_version as kohya writes it for this model (SD3: its variant, by modelspec architecture)."""
    fam = models.family(comp.family)
    return fam.model_versions.get(comp.modelspec()["architecture"], fam.base_model_version)


NETWORK_MODULE = {"lora": "networks.lora", "locon": "networks.lora"}  # kohya's module name for LoRA and LoCon alike


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One adaptable layer: `module` is the nn.Linear / nn.Conv2d, or for bigG's fused q / k / v the attention
    module with `slot` 0 / 1 / 2 (third of in_proj_weight)."""
    part: str
    module: nn.Module
    slot: int | None = None

    @property
    def weight(self) -> Tensor:
        return self.module.in_proj_weight if self.slot is not None else self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) features / channels."""
        if self.slot is not None:
            c = self.module.in_proj_weight.shape[1]
            return c, c
        w = self.module.weight
        return w.shape[0], w.shape[1]

    @property
    def conv(self) -> tuple[Any, Any, Any] | None:
        m = self.module
        return (m.kernel_size, m.stride, m.padding) if isinstance(m, nn.Conv2d) else None

    @property
    def is_3x3(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


_OPEN_CLIP_TO_HF = [(r"^transformer\.resblocks\.(\d+)\.attn\.out_proj$", r"text_model.encoder.layers.\1.self_attn.out_proj"),
                    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc$", r"text_model.encoder.layers.\1.mlp.fc1"),
                    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj$", r"text_model.encoder.layers.\1.mlp.fc2")]


def _open_clip_hf_path(path: str) -> str | None:
    for pat, rep in _OPEN_CLIP_TO_HF:
        if re.match(pat, path):
            return re.sub(pat, rep, path)
    return None


def lora_targets(comp: Any, parts: Iterable[str] | None = None) -> dict[str, Target]:
    """Every adaptable layer of the loaded parts, by kohya LoRA name."""
    out: dict[str, Target] = {}
    for part, prefix in models.family(comp.family).lora_prefixes.items():
        model = getattr(comp, part, None)
        if model is None or (parts is not None and part not in parts):
            continue
        open_clip = isinstance(model, OpenCLIPTextModel)  # SDXL's bigG: open_clip names, fused q / k / v
        for path, m in model.named_modules():
            if open_clip and hasattr(m, "in_proj_weight"):
                layer = re.match(r"^transformer\.resblocks\.(\d+)\.attn$", path)
                assert layer is not None, path
                for slot, x in enumerate("qkv"):
                    out[f"{prefix}_text_model_encoder_layers_{layer.group(1)}_self_attn_{x}_proj"] = Target(part, m, slot)
                continue
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            name_path = _open_clip_hf_path(path) if open_clip else path
            if name_path is not None:
                out[f"{prefix}_{name_path.replace('.', '_')}"] = Target(part, m)
    return out


_RESNET_DIFFUSERS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                     "conv_shortcut": "skip_connection"}
_SDXL_TOP_DIFFUSERS = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "time_embedding_linear_1": "time_embed_0",
                       "time_embedding_linear_2": "time_embed_2", "add_embedding_linear_1": "label_emb_0_0",
                       "add_embedding_linear_2": "label_emb_0_2"}


def sdxl_diffusers_to_sgm(name: str, num_res_blocks: int, transformer_depth: tuple[int, ...]) -> str:
    """`lora_unet_` + diffusers UNet2DConditionModel path ("_"-joined) -> `lora_unet_` + the sgm path (the inverse of
    diffusers' `_maybe_map_sgm_blocks_to_diffusers`); other names are returned unchanged."""
    if not name.startswith("lora_unet_"):
        return name
    rest = name[len("lora_unet_"):]
    per = num_res_blocks + 1
    for k, v in _SDXL_TOP_DIFFUSERS.items():
        if rest == k:
            return "lora_unet_" + v

    def resnet(tail: str) -> str:
        for k, v in _RESNET_DIFFUSERS.items():
            if tail == k:
                return v
        return tail

    m = re.match(r"^(down|up)_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)$", rest)
    if m:  # input_blocks start after conv_in (index 0); output_blocks at 0
        side, b, kind, j, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
        inner = 0 if kind == "resnets" else 1
        index = (1 if side == "down" else 0) + b * per + j
        return (f"lora_unet_{'input' if side == 'down' else 'output'}_blocks_{index}_{inner}_"
                f"{resnet(tail) if inner == 0 else tail}")
    m = re.match(r"^down_blocks_(\d+)_downsamplers_0_conv$", rest)
    if m:
        return f"lora_unet_input_blocks_{(int(m[1]) + 1) * per}_0_op"
    m = re.match(r"^mid_block_(resnets|attentions)_(\d+)_(.+)$", rest)
    if m:
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(m[1], int(m[2]))]
        return f"lora_unet_middle_block_{idx}_{resnet(m[3]) if m[1] == 'resnets' else m[3]}"
    m = re.match(r"^up_blocks_(\d+)_upsamplers_0_conv$", rest)
    if m:
        b = int(m[1])
        level = len(transformer_depth) - 1 - b
        return f"lora_unet_output_blocks_{b * per + num_res_blocks}_{2 if transformer_depth[level] else 1}_conv"
    return name


# ----------------------------------------------------------------------------------------------
# Adapter and network
# ----------------------------------------------------------------------------------------------


def lora_product(up: Tensor, down: Tensor) -> Tensor:
    """up @ down in fp32, in the base weight's shape: linear up [o, r] / down [r, i] -> [o, i]; conv up [o, r, 1, 1] /
    down [r, i, kh, kw] -> [o, i, kh, kw]."""
    return torch.einsum("or,r...->o...", up.float().flatten(1), down.float())


class LoRAModule(nn.Module):
    """One adapter: forward(x) is the *delta* up(down(x)) * multiplier * alpha / dim (or None when module dropout
    skips it). Kohya's init (down: kaiming-uniform, up: zeros) so a fresh adapter changes nothing."""

    algo = "lora"

    def __init__(self, out_dim: int, in_dim: int, dim: int, alpha: float, conv: tuple[Any, Any, Any] | None = None,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dora: Tensor | None = None):
        super().__init__()
        if conv is not None:  # down: the base conv's kernel / stride / padding; up: 1x1
            kernel, stride, padding = conv
            self.lora_down = nn.Conv2d(in_dim, dim, kernel, stride, padding, bias=False)
            self.lora_up = nn.Conv2d(dim, out_dim, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_dim, dim, bias=False)
            self.lora_up = nn.Linear(dim, out_dim, bias=False)
        self.rank_axis = 1 if conv is not None else -1  # where down(x) keeps its rank: (B, dim, H, W) / (B, ..., dim)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dim, self.scale = dim, float(alpha) / dim
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.skipped = False  # module dropout of this training forward (LoRANetwork.drop_modules)
        self.multiplier = 1.0
        self.shape = (out_dim, in_dim, *(conv[0] if conv is not None else ()))
        if dora is not None:  # DoRA (networks/lycoris.py): magnitude per output row, the direction W + up @ down
            self.dora_scale = nn.Parameter(dora)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = float(self.alpha) / self.dim  # the file's alpha decides the scale

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor | None:
        # dropouts only while training with gradients: previews (inference_mode) and eval run the adapter whole
        train = self.training and torch.is_grad_enabled()
        if train and self.skipped:
            return None
        if hasattr(self, "dora_scale"):  # DoRA renormalises the whole weight: op(x, W' - W)
            assert weight is not None
            dw = self.weight_delta(weight).to(x.dtype)
            if self.lora_down.weight.dim() == 2:
                return F.linear(x, dw)
            return F.conv2d(x, dw, stride=self.lora_down.stride, padding=self.lora_down.padding)
        h = self.lora_down(x.to(self.lora_down.weight.dtype))  # (B, ..., dim) or (B, dim, H, W)
        scale = self.scale
        if train and self.dropout:
            h = F.dropout(h, p=self.dropout)
        if train and self.rank_dropout:
            shape = [h.shape[0]] + [1] * (h.dim() - 1)  # one mask per sample and rank
            shape[self.rank_axis] = self.dim
            h = h * (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * (self.multiplier * scale)

    def delta_weight(self) -> Tensor:
        """scale * up @ down in the base weight's shape (fp32), no multiplier."""
        return lora_product(self.lora_up.weight, self.lora_down.weight) * self.scale

    def weight_delta(self, weight: Tensor | None = None) -> Tensor:
        """The merged change at the current multiplier (fp32): multiplier * scale * up @ down; DoRA: W' - W for the
        base `weight`."""
        return merged_delta(self, weight)


Adapter = Any  # LoRAModule or networks.lycoris.WeightAdapter: forward(x, base weight) -> output change or None


def _patch_linear(module: nn.Module, adapter: Adapter) -> None:
    orig = module.forward

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = orig(x, *args, **kwargs)
        d = adapter(x, module.weight)
        return out if d is None else out + d.to(out.dtype)

    module.forward = forward  # type: ignore[method-assign]


def _patch_fused_qkv(attn: nn.Module, adapters: list[Adapter | None]) -> None:
    """bigG (open_clip) attention: q, k, v deltas added to the fused in-projection's output."""
    from models.text_encoders import _causal_attention

    def forward(x: Tensor) -> Tensor:
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3C)
        c = qkv.shape[-1] // 3
        deltas = [a(x, attn.in_proj_weight[i * c:(i + 1) * c]) if a is not None else None
                  for i, a in enumerate(adapters)]
        if any(d is not None for d in deltas):
            qkv = qkv + torch.cat([d.to(qkv.dtype) if d is not None else qkv.new_zeros(*qkv.shape[:-1], c)
                                   for d in deltas], dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)
        return attn.out_proj(_causal_attention(q, k, v, attn.num_heads))

    attn.forward = forward  # type: ignore[method-assign]


class LoRANetwork(nn.Module):
    """The adapters of one model (by kohya LoRA name) and where they are applied; state_dict() is the kohya file."""

    def __init__(self, adapters: Mapping[str, Adapter], targets: Mapping[str, Target],
                 lrs: Mapping[str, float | None] | None = None):
        super().__init__()
        self.adapters = nn.ModuleDict(dict(adapters))
        self.__dict__["_targets"] = {n: targets[n] for n in adapters}  # not submodules: the model owns them
        self.lrs = dict(lrs or {})
        self._applied: list[nn.Module] = []

    def apply_to(self) -> "LoRANetwork":
        """Patch the forwards of the adapted layers (once)."""
        assert not self._applied, "already applied"
        fused: dict[int, tuple[nn.Module, list[Adapter | None]]] = {}
        for name, adapter in self.adapters.items():
            t = self._targets[name]
            if t.slot is not None:
                fused.setdefault(id(t.module), (t.module, [None, None, None]))[1][t.slot] = adapter
            else:
                _patch_linear(t.module, adapter)
                self._applied.append(t.module)
        for attn, slots in fused.values():
            _patch_fused_qkv(attn, slots)
            self._applied.append(attn)
        return self

    def remove(self) -> None:
        """Restore the original forwards."""
        for m in self._applied:
            m.__dict__.pop("forward", None)
        self._applied = []

    def drop_modules(self, generator: torch.Generator) -> None:
        """Module dropout for the next training forward: each adapter skipped with its module_dropout probability.
        Drawn once per forward, not inside it: with the same generator state on every rank the same adapters go
        unused (FSDP's reduce-scatter needs the same gradients on all ranks), and a block recomputed by gradient
        checkpointing skips what its forward skipped."""
        draws = torch.rand(len(self.adapters), generator=generator).tolist()
        for a, u in zip(self.adapters.values(), draws):
            a.skipped = u < a.module_dropout

    def set_multiplier(self, value: float) -> None:
        for a in self.adapters.values():
            a.multiplier = value

    def load_kohya(self, groups: Mapping[str, Mapping[str, Tensor]], source: str) -> None:
        """Load a file's layers (`read_lora`): exactly this network's layers, algorithms and shapes (every tensor of
        the file used; a file without `alpha` keeps kohya's meaning, alpha = rank)."""
        names = set(self.adapters)
        missing, extra = sorted(names - set(groups)), sorted(set(groups) - names)
        if missing or extra:
            raise ValueError(f"{source}: its layers differ from the configured network: {len(missing)} missing "
                             f"{missing[:3]}, {len(extra)} not configured {extra[:3]}; set [network] target_modules / "
                             f"block_args to match the file")
        flat = {}
        for name in sorted(names):
            g, mine = groups[name], self.adapters[name].state_dict()
            if algo_of(g) != self.adapters[name].algo:
                raise ValueError(f"{source}: {name} is a {algo_of(g)} layer, the configured network trains "
                                 f"{self.adapters[name].algo} (set network.network_module)")
            leaves = set(g) | {"alpha"}
            if leaves != set(mine):
                raise ValueError(f"{source}: {name} holds {sorted(g)}, the configured network {sorted(mine)} (set "
                                 "network_dim / factor / decompose_both / full_matrix / dora_wd to the file's)")
            for leaf, v in mine.items():
                if leaf == "alpha":
                    v = g["alpha"].float() if "alpha" in g else torch.tensor(float(self.adapters[name].dim))
                elif tuple(g[leaf].shape) != tuple(v.shape):
                    raise ValueError(f"{source}: {name}.{leaf} has shape {tuple(g[leaf].shape)}, the configured network "
                                     f"{tuple(v.shape)} (set network_dim / conv_dim / factor / block_args to the file's)")
                else:
                    v = g[leaf]
                flat[f"adapters.{name}.{leaf}"] = v
        self.load_state_dict(flat, strict=True)
        for a in self.adapters.values():
            if isinstance(a, LoRAModule):
                a.scale = float(a.alpha) / a.dim

    def kohya_state_dict(self) -> dict[str, Tensor]:
        """`<lora name>.<tensor>` (the file layout: lora_down.weight / lora_up.weight / alpha, hada_*, lokr_*,
        dora_scale)."""
        return {k[len("adapters."):]: v for k, v in self.state_dict().items()}


PROBE_CAPTION = "a photo"  # any caption: which layers reach the text encoders' outputs does not depend on it


def reaching_loss(comp: Any, network: LoRANetwork, device: torch.device | str) -> set[str]:
    """Names of the adapters whose output can reach the loss: every network adapter, and the text-encoder adapters
    that reach what the text encoders hand to the network (`comp.encode_text`: SDXL's context from both CLIPs'
    penultimate layers and bigG's pooled output from its last layer, so CLIP-L's last layer reaches nothing).
    Found from the autograd graph of one encoding (no dropout drawn, no .grad written), so it holds for any family
    and any hidden layer the model conditions on."""
    text = {n: a for n, a in network.adapters.items() if n.startswith(TEXT_PREFIXES)}
    reached = set(network.adapters) - set(text)
    if not text:
        return reached
    params = [(n, p) for n, a in text.items() for p in a.parameters()]
    was_training = network.training
    network.eval()  # the adapters run whole: no dropout masks drawn from the global generators
    try:
        with torch.enable_grad():
            out = comp.encode_text([PROBE_CAPTION], device=device)
            total = sum(v.float().sum() for v in out.values())
            grads = torch.autograd.grad(total, [p for _, p in params], allow_unused=True)
    finally:
        network.train(was_training)
    return reached | {n for (n, _), g in zip(params, grads) if g is not None}


def _first_match(patterns: Iterable[str], name: str) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


CONV_ALGOS = ("locon", "loha", "lokr")  # also adapt convolutions (LyCORIS's kohya preset adapts the ResNet blocks)


def make_adapter(ncfg: Any, t: Target, dim: int, alpha: float) -> Adapter:
    """One adapter of the configured algorithm for target `t` (DoRA's magnitude from the base weight's rows)."""
    out_dim, in_dim = t.shape
    shape = (out_dim, in_dim, *(t.module.kernel_size if t.conv is not None else ()))
    w = t.weight if t.slot is None else t.weight[t.slot * in_dim:(t.slot + 1) * in_dim]
    dora = dora_magnitude(w) if ncfg.dora_wd else None
    if ncfg.network_module == "loha":
        return LoHaModule(shape, dim, alpha, t.conv, ncfg.module_dropout, dora)
    if ncfg.network_module == "lokr":
        return LoKrModule(shape, dim, alpha, t.conv, ncfg.module_dropout, dora, factor=ncfg.factor,
                          decompose_both=ncfg.decompose_both, full_matrix=ncfg.full_matrix)
    return LoRAModule(out_dim, in_dim, dim, alpha, t.conv, ncfg.network_dropout, ncfg.rank_dropout,
                      ncfg.module_dropout, dora)


def create_network(comp: Any, ncfg: Any, *, unet: bool, text: bool) -> LoRANetwork:
    """Adapters on the configured targets of the loaded parts (ranks, alphas, block-wise settings from [network])."""
    fam = models.family(comp.family)
    parts = ([fam.network] if unet else []) + ([p for p, pre in fam.lora_prefixes.items()
                                                if pre + "_" in TEXT_PREFIXES] if text else [])
    targets = lora_targets(comp, parts)
    linear = ncfg.target_modules or list(fam.lora_targets)
    algo = ncfg.network_module
    conv = (ncfg.conv_target_modules or list(fam.lora_conv_targets)) if algo in CONV_ALGOS else []
    conv_dim = ncfg.conv_dim or ncfg.network_dim
    conv_alpha = ncfg.conv_alpha if ncfg.conv_alpha is not None else ncfg.network_alpha
    adapters, lrs = {}, {}
    for name, t in targets.items():
        if _first_match(ncfg.exclude_modules, name):
            continue
        if _first_match(linear, name) and not t.is_3x3:
            dim, alpha = ncfg.network_dim, ncfg.network_alpha
        elif _first_match(conv, name):
            dim, alpha = (conv_dim, conv_alpha) if t.is_3x3 else (ncfg.network_dim, ncfg.network_alpha)
        else:
            continue
        block = next((g for g in ncfg.block_args if re.fullmatch(g["pattern"], name)), {})
        dim, alpha = int(block.get("dim", dim)), float(block.get("alpha", alpha))
        if dim <= 0:
            continue
        adapters[name] = make_adapter(ncfg, t, dim, alpha)
        lrs[name] = block.get("lr")
    if not adapters:
        raise ValueError("[network]: no layer matches the targets (check target_modules / exclude_modules / "
                         "block_args and network_train_unet_only / network_train_text_encoder_only)")
    return LoRANetwork(adapters, targets, lrs)


def network_from_file(comp: Any, ncfg: Any, groups: Mapping[str, Mapping[str, Tensor]], *, unet: bool, text: bool,
                      source: str, warn: Callable[[str], None] = print) -> LoRANetwork:
    """The network a file continues: its layers, each with the file's algorithm, rank, alpha, LoKr split and DoRA
    magnitude (as kohya's / LyCORIS's create_network_from_weights build it), whatever [network] says about targets
    and ranks; [network] dropouts and block_args learning rates still apply. Layers of parts not trained here
    (network_train_unet_only / _text_encoder_only) are left out with a warning."""
    targets = lora_targets(comp)
    unknown = sorted(n for n in groups if n not in targets)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} layer(s) are not in this {comp.family} model (e.g. {unknown[:3]})")
    adapters, lrs, skipped = {}, {}, []
    for name, g in sorted(groups.items()):
        is_text = name.startswith(TEXT_PREFIXES)
        if (is_text and not text) or (not is_text and not unet) or name.startswith("lora_te3_"):
            skipped.append(name)
            continue
        t = targets[name]
        if any(k in g for k in ("lora_mid.weight", "hada_t1", "lokr_t2")):
            raise ValueError(f"{source}: {name} is a Tucker layer: it can be merged (generate.py, tools.merge_lora) but "
                             "not trained here")
        out_dim, in_dim = t.shape
        shape = (out_dim, in_dim, *(t.module.kernel_size if t.conv is not None else ()))
        dora = g.get("dora_scale")
        if dora is not None and tuple(dora.shape[:1]) != (out_dim,) or (dora is not None and dora.dim() > 1
                                                                          and dora.shape[1] != 1):
            raise ValueError(f"{source}: {name}: an input-axis dora_scale (older LyCORIS) can be merged but not "
                             "trained here (we train DoRA on the output axis)")
        dora = dora.float().clone() if dora is not None else None
        algo = algo_of(g)
        alpha = float(g["alpha"]) if "alpha" in g else None
        if algo == "lora":
            dim = g["lora_down.weight"].shape[0]
            adapters[name] = LoRAModule(out_dim, in_dim, dim, alpha if alpha is not None else dim, t.conv,
                                        ncfg.network_dropout, ncfg.rank_dropout, ncfg.module_dropout, dora)
        elif algo == "loha":
            dim = g["hada_w1_b"].shape[0]
            adapters[name] = LoHaModule(shape, dim, alpha or dim, t.conv, ncfg.module_dropout, dora)
        else:
            adapters[name] = LoKrModule.from_file(shape, g, t.conv, ncfg.module_dropout, dora)
        block = next((b for b in ncfg.block_args if re.fullmatch(b["pattern"], name)), {})
        lrs[name] = block.get("lr")
    if skipped:
        warn(f"{source}: {len(skipped)} layer(s) of parts not trained in this run are left out of it and of its "
             f"exports (e.g. {skipped[:2]})")
    if not adapters:
        raise ValueError(f"{source}: none of its layers is trained in this run (network_train_unet_only / "
                         "network_train_text_encoder_only)")
    return LoRANetwork(adapters, targets, lrs)


# ----------------------------------------------------------------------------------------------
# Files: reading (ours, kohya's, diffusers-named lora_unet_), merging, metadata
# ----------------------------------------------------------------------------------------------


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'file.safetensors[:weight]' -> (path, weight); a Windows drive colon is not a weight."""
    path, sep, w = spec.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", w):
        return path, float(w)
    return spec, 1.0


REQUIRED = {"lora": ("lora_down.weight", "lora_up.weight"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
            "lokr": ()}


def read_lora(path: str, comp: Any | None = None) -> dict[str, dict[str, Tensor]]:
    """An adapter file (kohya LoRA / LoCon, LyCORIS LoHa / LoKr, DoRA) as {layer name: {tensor name: tensor}}. SDXL
    `lora_unet_` names in diffusers naming are mapped to the sgm paths when `comp` (the SDXL model) is given."""
    from models.checkpoint import SafeTensorFile
    f = SafeTensorFile(path)
    groups: dict[str, dict[str, Tensor]] = {}
    for key in f.keys():
        name, _, leaf = key.partition(".")
        if leaf not in ALL_KEYS:
            raise ValueError(f"{path}: {key!r} is not a tensor of a LoRA / LoCon / LoHa / LoKr / DoRA layer (other "
                             "LyCORIS algorithms, e.g. OFT / BOFT / IA3 / GLoRA / full, are not supported)")
        groups.setdefault(name, {})[leaf] = f.get(key)
    unet = getattr(comp, "unet", None) if comp is not None else None
    if unet is not None:
        cfg = unet.cfg
        groups = {sdxl_diffusers_to_sgm(n, cfg.num_res_blocks, cfg.transformer_depth): g for n, g in groups.items()}
    for name, g in groups.items():
        algo = algo_of(g)
        lacking = [k for k in REQUIRED[algo] if k not in g]
        if algo == "lokr" and not (("lokr_w1" in g or {"lokr_w1_a", "lokr_w1_b"} <= set(g))
                                   and ("lokr_w2" in g or {"lokr_w2_a", "lokr_w2_b"} <= set(g))):
            lacking = ["lokr_w1 / lokr_w1_a + _b and lokr_w2 / lokr_w2_a + _b"]
        if lacking:
            raise ValueError(f"{path}: {algo} layer {name} lacks {', '.join(lacking)}")
    return groups


@torch.no_grad()
def merge_into(comp: Any, groups: Mapping[str, Mapping[str, Tensor]], weight: float = 1.0,
               source: str = "", warn: Callable[[str], None] = print) -> int:
    """W += the change each layer makes at multiplier `weight` (LoRA: weight * alpha / dim * up @ down; LoHa / LoKr /
    DoRA: networks/lycoris.py), computed in fp32, stored in W's dtype. Returns the number of layers merged; layers of
    parts that are not loaded are skipped with a warning."""
    targets = lora_targets(comp)
    unknown = [n for n in groups if n not in targets]
    if len(unknown) == len(groups):
        raise ValueError(f"{source}: none of its {len(groups)} layers matches this {comp.family} model (e.g. "
                         f"{unknown[:3]}): a LoRA for another model family or size?")
    if unknown:
        warn(f"{source}: {len(unknown)} layer(s) not in the loaded model, skipped (e.g. {unknown[:3]})")
    for name, g in groups.items():
        t = targets.get(name)
        if t is None:
            continue
        w = t.weight
        if t.slot is not None:
            c = w.shape[1]
            w = w[t.slot * c:(t.slot + 1) * c]  # a view: bigG's q / k / v rows of in_proj_weight
        try:
            delta = group_delta({k: v.to(w.device) for k, v in g.items()}, w, weight)
        except RuntimeError as e:  # shapes that do not fit the weight (reshape / matmul errors)
            raise ValueError(f"{source}: {name} does not fit weight {tuple(w.shape)}: {e}") from None
        w.copy_((w.float() + delta).to(w.dtype))
    return len(groups) - len(unknown)


def tag_frequency(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """Tag -> count over captions, as kohya's ss_tag_frequency (per dataset folder)."""
    freq: dict[str, int] = {}
    for c in captions:
        for tag in c.split(separator):
            tag = tag.strip()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq


def ss_metadata(cfg: Any, comp: Any, network: LoRANetwork, base: Mapping[str, str] | None = None,
                tensors: Mapping[str, Tensor] | None = None, path: str = "") -> dict[str, str]:
    """The run's kohya metadata (`base`: training/run_metadata.py's ss_* keys) with what a LoRA file adds: network
    module / dim / alpha / args / dropout, the adapters' learning rates, and ModelSpec as kohya's
    build_metadata(lora=True) writes it (library/sai_model_spec.py): the base model's architecture + "/lora",
    implementation, title ([save] metadata_title, else the file name), date, resolution, prediction type,
    hash_sha256 of `tensors` (as written), and the [save] metadata_author / description / license / tags."""
    from models.checkpoint import modelspec_hash, modelspec_metadata
    n, o = cfg.network, cfg.optimizer
    lycoris = n.network_module in ("loha", "lokr") or n.dora_wd
    args = {"algo": n.network_module} if lycoris else {}  # LyCORIS's kohya network_args, as strings
    if n.network_module in CONV_ALGOS:
        args.update({"conv_dim": str(n.conv_dim or n.network_dim),
                     "conv_alpha": str(n.conv_alpha if n.conv_alpha is not None else n.network_alpha)})
    if n.network_module == "lokr":
        args.update({"factor": str(n.factor), "decompose_both": str(n.decompose_both),
                     "full_matrix": str(n.full_matrix)})
    if n.dora_wd:
        args["dora_wd"] = "True"
    for k in ("rank_dropout", "module_dropout"):
        if getattr(n, k):
            args[k] = str(getattr(n, k))
    meta = {k: v for k, v in (base or {}).items() if k != "ss_training_type"}
    te_trained = any(k.startswith(TEXT_PREFIXES) for k in network.adapters)
    meta.update({
        "ss_network_module": "lycoris.kohya" if lycoris else NETWORK_MODULE[n.network_module],
        "ss_network_dim": str(n.network_dim),
        "ss_network_alpha": str(n.network_alpha), "ss_network_args": json.dumps(args),
        "ss_network_dropout": str(n.network_dropout), "ss_base_model_version": base_model_version(comp),
        "ss_unet_lr": str(n.unet_lr if n.unet_lr is not None else o.learning_rate),
        "ss_text_encoder_lr": str(n.text_encoder_lr if n.text_encoder_lr is not None else o.learning_rate),
        "ss_network_train_unet_only": str(not te_trained),
        "ss_clip_skip": str(cfg.model.clip_skip),  # kohya writes args.clip_skip: "None" when unset
    })
    spec, sv = comp.modelspec(), cfg.save
    res = cfg.data.resolution
    title = sv.metadata_title or (path.rsplit("/", 1)[-1].removesuffix(".safetensors") if path else sv.output_name)
    meta.update(modelspec_metadata(
        spec["architecture"] + "/lora", title, f"{res}x{res}" if isinstance(res, int) else f"{res[0]}x{res[1]}",
        spec.get("prediction_type"), implementation=spec.get("implementation", ""),
        info={"author": sv.metadata_author, "description": sv.metadata_description, "license": sv.metadata_license,
              "tags": sv.metadata_tags},
        hash_sha256=modelspec_hash(tensors) if tensors is not None else ""))
    if cfg.model.clip_skip is not None:  # kohya's build_metadata(clip_skip=...): modelspec.encoder_layer
        meta["modelspec.encoder_layer"] = str(cfg.model.clip_skip)
    if not te_trained:
        meta.pop("ss_text_encoder_lr")
    return meta


def as_written(sd: Mapping[str, Tensor], precision: str) -> dict[str, Tensor]:
    """The tensors as `save_lora` writes them: every tensor (alpha too, as kohya does) in `precision`, on the CPU."""
    from models import DTYPES
    dt = DTYPES[precision]
    return {k: v.detach().to("cpu", dt).contiguous() for k, v in sd.items()}


def save_lora(path: str, sd: Mapping[str, Tensor], metadata: Mapping[str, str], precision: str = "fp16") -> None:
    """Write a kohya LoRA file atomically, every tensor in `precision`."""
    from models.checkpoint import save_safetensors_atomic
    save_safetensors_atomic(as_written(sd, precision), path, dict(metadata))


# ----------------------------------------------------------------------------------------------
# The trainable set of a LoRA run (train.py: the same interface as its FullFineTune)
# ----------------------------------------------------------------------------------------------


class LoRATraining(TrainableSet):
    """Adapters on the frozen model: `trainee` (what DDP / FSDP wraps) runs the patched model and holds the
    adapters as `trainee.lora`; resume states (training/trainable.py; sharded under FSDP) hold the adapters, their
    optimizer state and EMA only; exports are kohya's file layout."""

    def __init__(self, cfg: Any, comp: Any, trainee: nn.Module, device: torch.device, warn: Callable[[str], None]):
        n = cfg.network
        self.cfg, self.comp, self.trainee = cfg, comp, trainee
        unet, text = not n.network_train_text_encoder_only, not n.network_train_unet_only
        if n.network_weights:  # continue: the file's layers, algorithms, ranks and alphas (any kohya / LyCORIS file)
            groups = read_lora(n.network_weights, comp)
            self.network = network_from_file(comp, n, groups, unet=unet, text=text, source=n.network_weights,
                                             warn=warn).to(device)
            self.network.load_kohya({k: groups[k] for k in self.network.adapters}, n.network_weights)
        else:
            with torch.random.fork_rng(devices=[]):  # the same init on every rank (FSDP shards what each rank holds)
                torch.default_generator.manual_seed(cfg.seed)
                self.network = create_network(comp, n, unet=unet, text=text).to(device)  # fp32 adapters
        self.network.apply_to().requires_grad_(True).train()
        # Adapters on text-encoder layers past the hidden state the model conditions on (SDXL's CLIP-L: the last
        # layer) are kept in the file, as kohya creates them, but frozen at their initial (or loaded) values: no
        # gradient ever reaches them, so DDP must not wait for one and the optimizer must not move them.
        self.frozen = sorted(set(self.network.adapters) - reaching_loss(comp, self.network, device))
        for name in self.frozen:
            self.network.adapters[name].requires_grad_(False)
        if len(self.frozen) == len(self.network.adapters):
            raise ValueError("[network]: no adapter's output reaches the loss (text-encoder layers past the hidden "
                             "state the model uses only); add network targets")
        trainee.add_module("lora", self.network)
        self.ema_module: nn.Module = self.network
        self.forwards = 0  # training forwards run (with the seed and rank: the dropout masks; kept in resume states)
        if n.network_dropout or n.rank_dropout or n.module_dropout:
            from core import dist
            _own_dropout_rng(trainee, self, dist.rank(), device)
        # module dropout leaves adapters out of some steps: DDP must not wait for their gradients
        self.find_unused = n.module_dropout > 0
        self._tags: dict[str, dict[str, int]] | None = None  # ss_tag_frequency, counted at the first export
        if cfg.optimizer.learning_rate_te1 or cfg.optimizer.learning_rate_te2:
            warn("optimizer.learning_rate_te1 / _te2 are for full fine-tunes; LoRA uses network.text_encoder_lr")

    def describe(self) -> str:
        n = len(self.network.adapters)
        size = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        te = sum(k.startswith(TEXT_PREFIXES) for k in self.network.adapters)
        frozen = (f" ({len(self.frozen)} text-encoder adapters kept at their initial values: their layers' output "
                  f"never reaches the loss, e.g. {self.frozen[0]})") if self.frozen else ""
        return (f"{self.cfg.network.network_module} adapters on {n - te} network / {te} text-encoder layers{frozen}, "
                f"{size / 1e6:.2f}M trained parameters (fp32), base frozen")

    def param_groups(self, opt_cfg: Any) -> list[dict]:
        """unet_lr / text_encoder_lr (default learning_rate), block_args lrs, then [optimizer] param_groups."""
        from training.optim import build_param_groups_for_models
        n = self.cfg.network
        base = {"unet": n.unet_lr if n.unet_lr is not None else opt_cfg.learning_rate,
                "text_encoder": n.text_encoder_lr if n.text_encoder_lr is not None else opt_cfg.learning_rate}
        named: dict[str, list[tuple[str, nn.Parameter]]] = {}
        lrs: dict[str, float] = {}
        for name, adapter in self.network.adapters.items():
            kind = "text_encoder" if name.startswith(TEXT_PREFIXES) else "unet"
            block_lr = self.network.lrs.get(name)
            key = kind if block_lr is None else f"{kind}@{block_lr:g}"
            lrs[key] = base[kind] if block_lr is None else float(block_lr)
            named.setdefault(key, []).extend((f"{name}.{k}", p) for k, p in adapter.named_parameters()
                                             if p.requires_grad)  # frozen adapters (self.frozen): no group
        named = {k: v for k, v in named.items() if v}
        return build_param_groups_for_models(named, opt_cfg, lrs)

    def state_dict(self) -> dict[str, Tensor]:
        from core import dist
        return {**{k: dist.full_tensor(v) for k, v in self.network.state_dict().items()},
                FORWARDS_KEY: torch.tensor(self.forwards, dtype=torch.int64)}

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        sd = dict(sd)
        self.forwards = int(sd.pop(FORWARDS_KEY, 0))  # states written before the key: masks restart at 0
        self.network.load_state_dict(sd, strict=True)

    def previewing(self, model: nn.Module) -> Any:
        """FSDP2: the adapters sit in the root unit, which only the trainee's forward gathers; previews call the
        network directly, so the root is gathered around them."""
        import contextlib
        if not hasattr(model, "unshard"):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def gathered() -> Any:
            model.unshard()
            try:
                yield
            finally:
                model.reshard()
        return gathered()

    def export(self, path: str, meta: Mapping[str, str], ema: Any, alone: bool = False) -> None:
        """The LoRA file (kohya layout, ss_* metadata) by rank 0; with an EMA also `-ema`. `alone`: by this rank,
        nothing gathered (a crash)."""
        from core import dist

        def gathered() -> dict[str, Tensor]:  # FSDP: collective, every rank in the same order
            return {k: v if alone else dist.full_tensor(v) for k, v in self.network.kohya_state_dict().items()}
        sd, ema_sd = gathered(), None
        if ema is not None:
            with ema.swapped_into(self.network):
                ema_sd = gathered()
        if not (alone or dist.is_main()):
            return
        if self._tags is None:
            self._tags = _dataset_tag_frequency(self.cfg)
        meta = {**meta, "ss_tag_frequency": json.dumps(self._tags)}
        info = ss_metadata(self.cfg, self.comp, self.network, meta, as_written(sd, self.cfg.save.save_precision), path)
        save_lora(path, sd, info, self.cfg.save.save_precision)
        if ema_sd is not None:
            ema_path = path.replace(".safetensors", "-ema.safetensors")
            ema_info = ss_metadata(self.cfg, self.comp, self.network, meta,
                                   as_written(ema_sd, self.cfg.save.save_precision), ema_path)
            save_lora(ema_path, ema_sd, {**ema_info, "sdtrain.ema_decay": str(ema.decay)}, self.cfg.save.save_precision)


FORWARDS_KEY = "dropout_forwards"  # in resume states beside the adapters: where the dropout masks continue


def _own_dropout_rng(trainee: nn.Module, run: LoRATraining, rank: int, device: torch.device) -> None:
    """The adapters' dropouts from their own streams, so a resume continues them exactly (no other consumer of the
    global RNG -- loader workers, previews -- shifts them). Each training forward of `trainee`: module dropout drawn
    from (run seed, forwards so far), the same on every rank; then the forward runs with the default generators (CPU,
    and the device's) forked and seeded from (run seed, rank, forwards) for the dropout / rank-dropout masks, and
    restored after it. Gradient checkpointing replays the default generators' state when it recomputes a block, so
    the recomputation draws the forward's masks."""
    from core.dist import mix_seed
    orig = trainee.forward
    cuda = device.type == "cuda"
    modules = torch.Generator()

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not (torch.is_grad_enabled() and trainee.training):
            return orig(*args, **kwargs)
        modules.manual_seed(mix_seed(run.cfg.seed, run.forwards))
        run.network.drop_modules(modules)
        seed = mix_seed(run.cfg.seed, rank, run.forwards, 1)
        run.forwards += 1
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            return orig(*args, **kwargs)

    trainee.forward = forward  # type: ignore[method-assign]


TAG_FREQUENCY_MAX_FILES = 10_000  # caption files read per folder for ss_tag_frequency (a sample of huge folders)


def _dataset_tag_frequency(cfg: Any) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {folder: {tag: count}} over the caption files of each image folder (at most
    TAG_FREQUENCY_MAX_FILES per folder, in name order, so a 10M-image folder costs seconds, not an hour)."""
    import itertools
    import os
    out: dict[str, dict[str, int]] = {}
    d = cfg.data
    subsets = d.subsets or [d]
    for sub in subsets:
        ext = getattr(sub, "caption_extension", None) or d.caption_extension
        for folder in sub.image_dirs:
            if not os.path.isdir(folder):
                continue
            caps = []
            names = (e.name for e in os.scandir(folder) if e.name.endswith(ext))
            for f in sorted(itertools.islice(names, TAG_FREQUENCY_MAX_FILES)):
                with open(os.path.join(folder, f), encoding="utf-8", errors="replace") as fh:
                    caps.append(fh.read().strip())
            out[os.path.basename(os.path.normpath(folder))] = tag_frequency(caps, d.caption_separator)
    return out


def merge_files(comp: Any, specs: Iterable[str], warn: Callable[[str], None] = print) -> None:
    """Merge each 'file[:weight]' into the loaded model (generate.py --lora, tools/merge_lora)."""
    for spec in specs:
        path, weight = parse_lora_spec(spec)
        merge_into(comp, read_lora(path, comp), weight, source=path, warn=warn)
