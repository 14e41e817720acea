"""LyCORIS adapters (LoHa, LoKr) and DoRA, in the file layout the LyCORIS package, kohya, ComfyUI and A1111 read.

Our own modules, with the `lycoris-lora` package as the test oracle (tests/test_lora_lycoris.py). Why not the package
itself: its modules wrap an `nn.Linear` / `nn.Conv2d` each (SDXL's bigG has a fused q / k / v projection, adapted as
three slots of one weight), draw dropouts from the global RNG (no exact resume), and pull in its kernel dispatch; what
a file means is small and well defined, so it is written here from the rules below.

Each adapter builds its weight delta dW in the base weight's shape (fp32), scaled by alpha / dim:
    LoHa  dW = (w1_a @ w1_b) * (w2_a @ w2_b)                                (Hadamard product, Hyeon-Woo et al. 2022)
          conv: w*_b hold (dim, in * kh * kw); Tucker files: hada_t1 / hada_t2 cores (read only)
    LoKr  dW = kron(w1, w2), w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 = lokr_w2 or lokr_w2_a @ lokr_w2_b (or a Tucker
          lokr_t2 core); out = a * c, in = b * d split by `factorization` (LyCORIS's rule); no alpha / dim scale when
          both halves are full matrices (LyCORIS stores alpha = dim then; ComfyUI applies 1.0)
    DoRA  W' = m * (W + dW) / ||W + dW||, the norm per output row (LyCORIS wd_on_out = True, PEFT, the DoRA paper's
          column norm of W^T); `dora_scale` = m, initialised to ||W||. Files with an input-axis dora_scale (older
          LyCORIS) are read with the norm per input column. A multiplier s applies W + s * (W' - W).
Sources: LyCORIS `lycoris/modules/{loha,lokr}.py`, `lycoris/functional/general.py` (factorization,
weight_decompose); ComfyUI `comfy/weight_adapter/{loha,lokr,base}.py`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LORA_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
ALL_KEYS = set(LOHA_KEYS) | set(LOKR_KEYS) | set(LORA_KEYS) | {"alpha", "dora_scale"}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: with factor > 0 dividing the dimension, (factor, dimension / factor) ordered;
    otherwise the most balanced split whose smaller side is at most `factor` (-1: no bound), as LyCORIS chooses it
    (`lycoris.functional.general.factorization`: 128 -> (8, 16), 1024 -> (32, 32), 127 -> (1, 127))."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    bound = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:  # walk the divisors upwards while the split gets more balanced and stays within the bound
        d = m + 1
        while dimension % d:
            d += 1
        if d + dimension // d > m + n or d > bound:
            break
        m, n = d, dimension // d
    return (m, n) if m <= n else (n, m)


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker rebuild: core t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def _kron(w1: Tensor, w2: Tensor) -> Tensor:
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1.contiguous(), w2.contiguous())


def loha_delta(g: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
    """dW of a LoHa layer (file tensors `g`), alpha / dim applied, in `shape` (fp32)."""
    f = {k: v.float() for k, v in g.items() if k in LOHA_KEYS}
    if "hada_t1" in f:
        dw = _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
    else:
        dw = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    dim = f["hada_w1_b"].shape[0]
    return dw.reshape(shape) * (float(g["alpha"]) / dim if "alpha" in g else 1.0)


def lokr_delta(g: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
    """dW of a LoKr layer (file tensors `g`), in `shape` (fp32): alpha / dim where a half is factorised, else 1."""
    f = {k: v.float() for k, v in g.items() if k in LOKR_KEYS}
    dim = None
    w1 = f.get("lokr_w1")
    if w1 is None:
        w1, dim = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w1_b"].shape[0]
    w2 = f.get("lokr_w2")
    if w2 is None:
        dim = f["lokr_w2_b"].shape[0]
        if "lokr_t2" in f:
            w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 2 and len(shape) == 4 and w2.shape[1] != shape[1] // w1.shape[1]:  # conv: w2_b flattened
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    scale = float(g["alpha"]) / dim if ("alpha" in g and dim is not None) else 1.0
    return _kron(w1, w2).reshape(shape) * scale


def lora_delta(g: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
    """dW of a LoRA / LoCon layer (up @ down, or with a Tucker lora_mid), alpha / dim applied, in `shape` (fp32)."""
    up, down = g["lora_up.weight"].float(), g["lora_down.weight"].float()
    dim = down.shape[0]
    if "lora_mid.weight" in g:  # LoCon Tucker: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1)
        dw = torch.einsum("mn...,im,nj->ij...", g["lora_mid.weight"].float(), up.flatten(1), down.flatten(1))
    else:
        dw = torch.einsum("or,r...->o...", up.flatten(1), down)
    alpha = float(g["alpha"]) if "alpha" in g else float(dim)  # kohya: no alpha = alpha equal to the rank
    return dw.reshape(shape) * (alpha / dim)


def algo_of(g: Mapping[str, Tensor]) -> str:
    """"lora", "loha" or "lokr" from a layer's tensor names."""
    if "hada_w1_a" in g:
        return "loha"
    if any(k.startswith("lokr_") for k in g):
        return "lokr"
    return "lora"


DELTAS = {"lora": lora_delta, "loha": loha_delta, "lokr": lokr_delta}


def weight_decompose(weight: Tensor, updated: Tensor, dora_scale: Tensor, multiplier: float = 1.0) -> Tensor:
    """DoRA: the new weight for base `weight` and `updated` = weight + dW (fp32): m * updated / ||updated|| along the
    axis `dora_scale` is shaped for (out rows: (out, 1, ...); in columns: (1, in, ...)), then W + s * (W' - W)."""
    m = dora_scale.float()
    if m.shape[0] == updated.shape[0] and (m.dim() < 2 or m.shape[1] == 1):
        norm = updated.reshape(updated.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (updated.dim() - 1))
    else:
        norm = updated.transpose(0, 1).reshape(updated.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (updated.dim() - 2))
    new = updated * (m.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps))
    return new if multiplier == 1 else weight + multiplier * (new - weight)


def group_delta(g: Mapping[str, Tensor], weight: Tensor, multiplier: float = 1.0) -> Tensor:
    """The change a file layer makes to `weight` at `multiplier` (fp32, weight's shape), any algorithm, DoRA too."""
    dw = DELTAS[algo_of(g)](g, tuple(weight.shape))
    if "dora_scale" not in g:
        return dw * multiplier
    w = weight.float()
    return weight_decompose(w, w + dw, g["dora_scale"].to(w.device), multiplier) - w


def dora_magnitude(weight: Tensor) -> Tensor:
    """DoRA's initial magnitude: ||W|| per output row, shaped (out, 1, ...) as LyCORIS stores `dora_scale`."""
    w = weight.detach().float()
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))


# ----------------------------------------------------------------------------------------------
# Trainable modules: parameters named as the file's tensors, so state_dict() is the LyCORIS layout
# ----------------------------------------------------------------------------------------------


def merged_delta(adapter: nn.Module, weight: Tensor | None = None) -> Tensor:
    """What merging an adapter adds to its base weight at its multiplier (fp32): multiplier * delta_weight();
    with DoRA (a `dora_scale`) W' - W for the base `weight`. LoRA (networks/lora.py) and the LyCORIS modules alike."""
    if hasattr(adapter, "dora_scale"):
        assert weight is not None, "DoRA: the base weight is needed"
        w = weight.detach().float()
        return weight_decompose(w, w + adapter.delta_weight(), adapter.dora_scale, adapter.multiplier) - w
    return adapter.delta_weight() * adapter.multiplier


def _refresh_alpha(module: nn.Module, _incompatible: Any) -> None:
    """load_state_dict post hook: the float scale follows a loaded `alpha` (a file's, a resume state's)."""
    if module.alpha.device.type != "meta":
        module.alpha_value = float(module.alpha)


class WeightAdapter(nn.Module):
    """An adapter that builds dW and runs the base layer's op with it: forward(x, weight) is the output change
    op(x, dW * multiplier) (DoRA: op(x, W' - W)), or None when module dropout skips it for this step."""
    algo = ""

    def __init__(self, shape: tuple[int, ...], dim: int, alpha: float, conv: tuple[Any, Any, Any] | None,
                 module_dropout: float, dora: Tensor | None):
        super().__init__()
        self.shape, self.dim, self.conv = tuple(shape), dim, conv
        alpha = float(alpha) if alpha else float(dim)  # LyCORIS: alpha None / 0 = the rank
        self.register_buffer("alpha", torch.tensor(alpha))
        # the scale as a Python float: reading the buffer in every forward would sync the GPU once per layer (and
        # fail on the meta device, where the memory planner runs the step); refreshed whenever a state is loaded
        self.alpha_value = alpha
        self.register_load_state_dict_post_hook(_refresh_alpha)
        self.module_dropout, self.dropout, self.rank_dropout = module_dropout, 0.0, 0.0
        self.skipped, self.multiplier = False, 1.0
        if dora is not None:
            self.dora_scale = nn.Parameter(dora)

    @property
    def scale(self) -> float:
        return self.alpha_value / self.dim

    def delta_weight(self) -> Tensor:
        """dW (alpha / dim applied, no multiplier) in the base weight's shape."""
        raise NotImplementedError

    def group(self) -> dict[str, Tensor]:
        return dict(self.state_dict())

    def weight_delta(self, weight: Tensor | None = None) -> Tensor:
        """The merged change at the current multiplier (fp32); DoRA needs the base `weight`."""
        return merged_delta(self, weight)

    def forward(self, x: Tensor, weight: Tensor) -> Tensor | None:
        if self.training and torch.is_grad_enabled() and self.skipped:
            return None
        dw = self.delta_weight()
        if hasattr(self, "dora_scale"):
            w = weight.detach().float()  # the base is frozen; its norm enters through W + dW
            dw = weight_decompose(w, w + dw, self.dora_scale, self.multiplier) - w
        elif self.multiplier != 1:
            dw = dw * self.multiplier
        dw = dw.to(x.dtype)
        if self.conv is None:
            return F.linear(x, dw)
        _, stride, padding = self.conv
        return F.conv2d(x, dw, stride=stride, padding=padding)


class LoHaModule(WeightAdapter):
    """LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / dim; LyCORIS's init (w1_a N(0, 0.1), w1_b and w2_b N(0, 1),
    w2_a zeros: dW = 0 at the start)."""
    algo = "loha"

    def __init__(self, shape: tuple[int, ...], dim: int, alpha: float, conv: tuple[Any, Any, Any] | None = None,
                 module_dropout: float = 0.0, dora: Tensor | None = None):
        super().__init__(shape, dim, alpha, conv, module_dropout, dora)
        out, cols = shape[0], int(math.prod(shape[1:]))
        self.hada_w1_a = nn.Parameter(torch.empty(out, dim).normal_(std=0.1))
        self.hada_w1_b = nn.Parameter(torch.empty(dim, cols).normal_(std=1.0))
        self.hada_w2_a = nn.Parameter(torch.zeros(out, dim))
        self.hada_w2_b = nn.Parameter(torch.empty(dim, cols).normal_(std=1.0))

    def delta_weight(self) -> Tensor:
        dw = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)  # (out, in * kh * kw)
        return dw.reshape(self.shape) * self.scale


class LoKrModule(WeightAdapter):
    """LoKr: dW = kron(w1, w2) (* alpha / dim unless both halves are full), shapes chosen as LyCORIS's LokrModule:
    out = a * c, in = b * d from `factorization(., factor)`; w1 (a, b) full unless `decompose_both` and the rank is
    below half its larger side; w2 (c, d[, kh, kw]) as w2_a (c, dim) @ w2_b (dim, d * kh * kw) unless the rank reaches
    half its larger side or `full_matrix`. Init: w1 / w1_a / w1_b / w2_a kaiming-uniform, w2 / w2_b zeros."""
    algo = "lokr"

    def __init__(self, shape: tuple[int, ...], dim: int, alpha: float, conv: tuple[Any, Any, Any] | None = None,
                 module_dropout: float = 0.0, dora: Tensor | None = None, factor: int = -1,
                 decompose_both: bool = False, full_matrix: bool = False):
        out_l, out_k = factorization(shape[0], factor)
        in_m, in_n = factorization(shape[1], factor)
        kernel = tuple(shape[2:])
        if decompose_both and dim < max(out_l, in_m) / 2 and not full_matrix:
            w1 = {"lokr_w1_a": (out_l, dim), "lokr_w1_b": (dim, in_m)}
        else:
            w1 = {"lokr_w1": (out_l, in_m)}
        if dim < max(out_k, in_n) / 2 and not full_matrix:
            w2 = {"lokr_w2_a": (out_k, dim), "lokr_w2_b": (dim, in_n * int(math.prod(kernel)))}
        else:
            w2 = {"lokr_w2": (out_k, in_n, *kernel)}
        full = "lokr_w1" in w1 and "lokr_w2" in w2
        super().__init__(shape, dim, float(dim) if full else alpha, conv, module_dropout, dora)
        for name, s in {**w1, **w2}.items():
            p = nn.Parameter(torch.empty(s))
            if name in ("lokr_w2", "lokr_w2_b"):
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            setattr(self, name, p)
        self.split = ((out_l, out_k), (in_m, in_n))

    @classmethod
    def from_file(cls, shape: tuple[int, ...], g: Mapping[str, Tensor], conv: tuple[Any, Any, Any] | None = None,
                  module_dropout: float = 0.0, dora: Tensor | None = None) -> "LoKrModule":
        """A module shaped as the file's layer `g` (any factor / decompose_both / full_matrix), values not loaded."""
        w1 = g["lokr_w1"].shape if "lokr_w1" in g else (g["lokr_w1_a"].shape[0], g["lokr_w1_b"].shape[1])
        dim = next((g[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in g), 1)
        alpha = float(g["alpha"]) if "alpha" in g else float(dim)
        m = cls.__new__(cls)
        WeightAdapter.__init__(m, shape, dim, alpha, conv, module_dropout, dora)
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            if name in g:
                setattr(m, name, nn.Parameter(torch.zeros(g[name].shape)))
        m.split = ((w1[0], shape[0] // w1[0]), (w1[1], shape[1] // w1[1]))
        return m

    @property
    def scale(self) -> float:
        return 1.0 if hasattr(self, "lokr_w1") and hasattr(self, "lokr_w2") else self.alpha_value / self.dim

    def delta_weight(self) -> Tensor:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        else:
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.split[0][1], self.split[1][1], *self.shape[2:])
        return _kron(w1, w2).reshape(self.shape) * self.scale
