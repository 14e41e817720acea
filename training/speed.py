"""The training fast path, applied from outside the models: channels_last, regional compile, the SDPA backend.

Each switch is a [train] option whose unset value means "on when training on CUDA". The numerics of each are tested
on CPU (tests/test_speed.py); the speed is measured by bench/gpu_suite.py.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# auto: FlashAttention-2 first (bf16/fp16, head_dim <= 256, the most used in training), then the memory-efficient
# kernel (also fp32), then cuDNN; math (materialises the attention matrix) only when nothing else runs.
AUTO_ORDER = ("flash", "efficient", "cudnn", "math")
_ENABLE = {"flash": "enable_flash_sdp", "cudnn": "enable_cudnn_sdp", "efficient": "enable_mem_efficient_sdp",
           "math": "enable_math_sdp"}
PROBE_TOKENS = (256, 77)
HEAD_DIM = 64  # SDXL's num_head_channels and SD3's models/mmdit.HEAD_DIM  # query tokens, key tokens of the probe (self- and cross-attention lengths differ)


def resolve(flag: bool | None, device: torch.device) -> bool:
    """An unset (None) switch is on for CUDA."""
    return device.type == "cuda" if flag is None else bool(flag)


def _probe(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether this backend runs a forward + backward of the model's attention shapes."""
    try:
        q = torch.randn(1, 2, PROBE_TOKENS[0], head_dim, device=device, dtype=dtype, requires_grad=True)
        kv = torch.randn(1, 2, PROBE_TOKENS[1], head_dim, device=device, dtype=dtype, requires_grad=True)
        with sdpa_kernel([SDPA_BACKENDS[backend]]):
            F.scaled_dot_product_attention(q, q, q).sum().backward()
            F.scaled_dot_product_attention(q, kv, kv).sum().backward()
        return True
    except RuntimeError:
        return False


def choose_sdpa_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                        log: Callable[[str], None]) -> str:
    """Enable exactly one SDPA backend on CUDA (the first of AUTO_ORDER that runs, or `name`) and log it."""
    if device.type != "cuda":
        log(f"attention: scaled_dot_product_attention on {device.type} (torch's {device.type} kernel)")
        return "default"
    order = AUTO_ORDER if name == "auto" else (name,)
    for b in order:
        if _probe(b, device, dtype, head_dim):
            for other, fn in _ENABLE.items():
                getattr(torch.backends.cuda, fn)(other == b)
            log(f"attention: SDPA backend {b} ({dtype}, head_dim {head_dim}; the only one enabled)")
            return b
    raise ValueError(f"train.sdpa_backend = {name!r} does not run on this GPU for {dtype}, head_dim {head_dim}; "
                     f"use \"auto\"")


def compile_blocks(net: nn.Module, blocks: list[nn.Module], log: Callable[[str], None]) -> None:
    """Regional torch.compile: each block compiled in place (parameter names unchanged); the first forward's time,
    which includes compiling them, is logged."""
    from torch import _dynamo

    # blocks share one forward() with different structures: dynamo compiles it once per block, so the default
    # recompile limit (8) would silently leave most blocks eager; the bound stays finite
    _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 2 * len(blocks) + 8)
    for block in blocks:
        block.compile()
    t0: list[float] = []

    def pre(_m, _a):
        t0.append(time.perf_counter())

    def post(_m, _a, _o):
        log(f"compile: first forward {time.perf_counter() - t0[0]:.1f} s with {len(blocks)} compiled blocks "
            "(the first backward compiles the backward graphs)")
        for h in handles:
            h.remove()

    handles = [net.register_forward_pre_hook(pre), net.register_forward_hook(post)]
    log(f"compile: {len(blocks)} blocks compiled regionally (torch.compile, recompile limit "
        f"{_dynamo.config.recompile_limit})")


def apply(cfg_train: Any, comp: Any, blocks: list[nn.Module], device: torch.device, amp_dtype: torch.dtype | None,
          log: Callable[[str], None]) -> None:
    """All fast-path switches of [train] on the loaded parts (before wrapping, before the optimizer)."""
    if resolve(cfg_train.channels_last, device):
        for m in (comp.network, comp.vae):
            if m is not None:
                m.to(memory_format=torch.channels_last)  # 4-D conv weights; activations follow the weights
        log("channels_last: network and VAE convolutions")
    choose_sdpa_backend(cfg_train.sdpa_backend, device, amp_dtype or next(comp.network.parameters()).dtype,
                        HEAD_DIM, log)
    if resolve(cfg_train.compile, device):
        compile_blocks(comp.network, blocks, log)
