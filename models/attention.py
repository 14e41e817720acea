"""Scaled dot-product attention for the model files, the CUDA kernel chosen per call.

torch has four SDPA kernels on CUDA: FlashAttention-2 (fp16 / bf16, no mask, head dim <= 256), cuDNN (fp16 / bf16,
fastest on Hopper for head dim 64-128), memory-efficient (also fp32 and additive masks) and math (anything, but it
materialises the attention matrix). torch takes the first *eligible* kernel of a priority list; here the list is set per
call from what the call is: half-precision without a mask, with a mask (T5's relative-position bias), or fp32 (the VAE
decode of previews, fp32 runs). Every list holds all four kernels, so no call is left without one; switching a single
backend on for the whole process would (a masked or fp32 call under flash-only has no kernel).

Off CUDA the call is plain `F.scaled_dot_product_attention` (torch's CPU kernels). The lists are module data, changed
only from outside the models (training/speed.py, from `train.sdpa_backend`), and read inside compiled regions as
constants: no graph break (tests/test_speed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

FLASH, CUDNN, EFFICIENT, MATH = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
BACKENDS = {"flash": FLASH, "cudnn": CUDNN, "efficient": EFFICIENT, "math": MATH}
# Priority by kind of call (torch skips the kernels that cannot run a call; math runs all).
DEFAULT_ORDERS: dict[str, tuple[SDPBackend, ...]] = {
    "half": (FLASH, CUDNN, EFFICIENT, MATH),    # fp16 / bf16, no mask (causal counts as no mask)
    "masked": (EFFICIENT, CUDNN, MATH, FLASH),  # an attn_mask (flash takes none)
    "float": (EFFICIENT, MATH, FLASH, CUDNN),   # fp32 (flash and cuDNN take fp16 / bf16 only)
}
ORDERS: dict[str, tuple[SDPBackend, ...]] = dict(DEFAULT_ORDERS)
KERNEL_DEVICES = ("cuda",)  # where the priority is set (elsewhere torch's own choice; tests add "cpu")


def set_preference(first: str | None = None) -> dict[str, tuple[SDPBackend, ...]]:
    """`first` ("flash", "cudnn", "efficient", "math") tried first in every kind of call, the others after it in
    their default order; None restores the defaults. Returns the orders now in force."""
    if first is not None and first not in BACKENDS:
        raise ValueError(f"unknown SDPA backend {first!r}; one of {sorted(BACKENDS)}")
    for kind, order in DEFAULT_ORDERS.items():
        ORDERS[kind] = order if first is None else (BACKENDS[first], *(b for b in order if b != BACKENDS[first]))
    return dict(ORDERS)


def kind_of(q: Tensor, mask: Tensor | None) -> str:
    """The kind of call, the key of ORDERS: "masked", else "half" (fp16 / bf16) or "float"."""
    if mask is not None:
        return "masked"
    return "half" if q.dtype in (torch.float16, torch.bfloat16) else "float"


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
              scale: float | None = None) -> Tensor:
    """SDPA over [B, heads, L, head_dim] -> [B, heads, L_q, head_dim]; on CUDA under the priority of this call's kind."""
    if q.device.type not in KERNEL_DEVICES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    with sdpa_kernel(list(ORDERS[kind_of(q, mask)]), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
