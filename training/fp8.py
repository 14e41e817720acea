"""fp8 base weights for LoRA runs (kohya's `--fp8_base` / `--fp8_base_unet`), applied from outside the model files.

Every frozen nn.Linear / nn.Conv2d weight of the chosen parts is stored as float8 e4m3 codes (1 byte per value
instead of 2 or 4) with one power-of-two scale per output channel, and upcast at use, one layer at a time:

    codes = round_e4m3(W / s)    s[o] = 2 ** ceil(log2(max_i |W[o, i]| / 448))    (448: e4m3's largest finite value)
    W'    = codes * s            in the weight's original dtype, each time the layer runs

A power-of-two scale makes `codes * s` exact in bf16 and fp32 (only the exponent changes), so the upcast adds no
rounding of its own: an fp8 run is the bf16 / fp32 run with each weight rounded once to the nearest e4m3 value of its
channel's grid (relative error <= 2^-4 per element, e4m3 keeping 3 mantissa bits). Per channel rather than per
tensor: one outlier row does not flush the small rows of the same matrix into e4m3's subnormals.

Mechanism: the module's class becomes FP8Linear / FP8Conv2d (subclasses of the originals), whose `weight` is a
property computing W' from the stored `weight_fp8` (uint8 codes) and `weight_scale`. Everything that reads
`module.weight` -- the layer's own forward, LoRA's patched forwards (networks/lora.py calls the original forward),
code reading `weight.dtype` -- sees the upcast weight, so adapters attach before or after the conversion alike.
Codes are stored as uint8 (the same bytes as float8_e4m3fn, viewed back at use): every collective backend (gloo,
NCCL) and DDP's start-up broadcast move uint8, not all move float8 dtypes. torch's float8 matmul (`_scaled_mm`,
compute capability >= 8.9) is not used: the LoRA backward needs the upcast weight for the input gradient anyway,
and the saving asked for here is memory, not matmul speed.

Why not torchao / optimum-quanto: neither is in the GPU image (shared/device/packages.txt) nor needed for this;
their weight-only fp8 modes work through tensor subclasses / replaced module classes whose interplay with DDP's
broadcast, FSDP2 and our forward-patching LoRA would need its own testing, for what is ~100 lines here that work
on torch >= 2.4 on CPU and CUDA alike.

The converted modules' state_dict keys change (`weight` -> `weight_fp8` + `weight_scale`): the base of a LoRA run is
never written (LoRA exports hold the adapters only), and `model.fp8_base` is refused for full fine-tunes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value (OCP FP8 spec, E4M3: S.1111.110 = 1.75 * 2^8)


def channel_scales(w: Tensor) -> Tensor:
    """One power-of-two scale per output channel (dim 0) so that |w / scale| <= FP8_MAX: fp32 [out]."""
    amax = w.detach().float().abs().flatten(1).amax(dim=1)
    # 2^ceil(log2(amax / max)); an all-zero channel gets scale 1 (its codes are zero anyway)
    exp = torch.ceil(torch.log2(torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))))
    return torch.exp2(exp)


def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """w -> (uint8 codes holding float8_e4m3fn bits, fp32 scale per output channel)."""
    scale = channel_scales(w)
    shape = (-1,) + (1,) * (w.dim() - 1)
    codes = (w.detach().float() / scale.view(shape)).to(FP8_DTYPE)  # round to nearest even, in range by the scale
    return codes.view(torch.uint8), scale


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """codes * scale in `dtype` (exact for bf16 / fp32: a power-of-two scale only moves the exponent)."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32  # fp16's range is narrower
    w = codes.view(FP8_DTYPE).to(work) * scale.view(shape).to(work)
    return w if w.dtype == dtype else w.to(dtype)


class _FP8Weight:
    """The shared part of FP8Linear / FP8Conv2d: `weight` upcast from `weight_fp8` and `weight_scale` at each use."""

    weight_fp8: nn.Parameter
    weight_scale: nn.Parameter
    compute_dtype: torch.dtype

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return dequantize(self.weight_fp8, self.weight_scale, self.compute_dtype)


class FP8Linear(_FP8Weight, nn.Linear):
    """nn.Linear whose frozen weight is stored in fp8 (see the module doc)."""


class FP8Conv2d(_FP8Weight, nn.Conv2d):
    """nn.Conv2d whose frozen weight is stored in fp8 (see the module doc)."""


_FP8_CLASS = {nn.Linear: FP8Linear, nn.Conv2d: FP8Conv2d}


@torch.no_grad()
def convert_module(m: nn.Module) -> None:
    """One nn.Linear / nn.Conv2d in place: its weight becomes fp8 codes + scales (frozen), its class the fp8 twin."""
    w = m._parameters["weight"]
    if w is None or w.requires_grad:
        shape = tuple(w.shape) if w is not None else ()
        raise ValueError(f"fp8 base weights must be frozen: {type(m).__name__} {shape}")
    del m._parameters["weight"]
    codes, scale = quantize(w)
    m.compute_dtype = w.dtype
    m.__class__ = _FP8_CLASS[type(m)]
    # Parameters, not buffers: DDP broadcasts parameters once at start-up but buffers at every forward
    m.weight_fp8 = nn.Parameter(codes, requires_grad=False)
    m.weight_scale = nn.Parameter(scale, requires_grad=False)


@dataclass
class Report:
    """What a conversion did: tensors converted, their bytes before and after, and the parts."""
    tensors: int = 0
    before: int = 0
    after: int = 0
    parts: tuple[str, ...] = ()

    def line(self) -> str:
        return (f"fp8 base (e4m3, per-channel power-of-two scales): {self.tensors} weights of {', '.join(self.parts)}, "
                f"{self.before / 2**30:.2f} -> {self.after / 2**30:.2f} GiB")


def convert(model: nn.Module) -> Report:
    """Every plain nn.Linear / nn.Conv2d of `model` (frozen) to fp8, in place."""
    rep = Report()
    for m in list(model.modules()):
        if type(m) in _FP8_CLASS:
            rep.before += m.weight.numel() * m.weight.element_size()
            convert_module(m)
            rep.after += m.weight_fp8.numel() + 4 * m.weight_scale.numel()
            rep.tensors += 1
    return rep


def fp8_parts(model_cfg: Any, family: Any) -> tuple[str, ...]:
    """The parts model.fp8_base (network + text encoders) / model.fp8_base_unet (network only) store in fp8;
    `family`: the models.Family record."""
    if model_cfg.fp8_base:
        return (family.network, *family.text_encoders)
    if model_cfg.fp8_base_unet:
        return (family.network,)
    return ()


def apply(comp: Any, parts: tuple[str, ...], log: Callable[[str], None]) -> Report | None:
    """Convert the loaded ones of `parts` (after loading, before or after the adapters attach); logs one line."""
    rep = Report()
    for name in parts:
        model = getattr(comp, name, None)
        if model is None:
            continue
        r = convert(model)
        rep.tensors, rep.before, rep.after = rep.tensors + r.tensors, rep.before + r.before, rep.after + r.after
        rep.parts += (name,)
    if not rep.parts:
        return None
    log(rep.line())
    return rep


def fp8_bytes(shape: tuple[int, ...]) -> int:
    """Bytes one weight of `shape` takes in fp8 here: the codes and an fp32 scale per output channel (planner)."""
    return math.prod(shape) + 4 * shape[0]
