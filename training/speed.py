"""The training fast path, applied from outside the models: channels_last, regional compile, the attention preference.

- Attention: the kernel is chosen per call inside the network (models/attention.py: by dtype, mask and what each kernel
  runs); `train.sdpa_backend` only names a kernel to try first. Nothing is switched off for the process.
- Compile: each region (SDXL: every input block, the middle block, every output block; SD3: every joint block) is
  compiled on its own with static shapes (`dynamic=False`): one graph per distinct region and bucket shape, regions of
  the same structure and shape share it, a shape seen before never recompiles. A batch smaller than the largest one
  seen in training (a bucket's tail) is padded to it with copies of its last sample and the output cut back, so it
  compiles nothing either (exact: every network here is per-sample; the padded rows never reach the loss).
- channels_last: off unless set (`train.channels_last = true`), until bench/gpu_suite.py's on/off rows decide.

The numerics of each are tested on CPU (tests/test_speed.py, tests/test_compile.py); the speed is measured by
bench/gpu_suite.py, the compile counts by bench/compile_check.py.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from models import attention

# Region containers by attribute name: the SDXL UNet's and the MMDiT's (models/unet_sdxl.py, models/mmdit.py).
REGION_ATTRS = ("input_blocks", "middle_block", "output_blocks", "joint_blocks")
# Dynamo keeps one cache per code object, and every compiled module runs through nn.Module._call_impl: its entries are
# (distinct region x bucket shape x grad mode). A finite bound still, so a runaway recompile shows instead of looping.
RECOMPILE_LIMIT = 1024


def resolve(flag: bool | None, device: torch.device) -> bool:
    """An unset (None) switch is on for CUDA."""
    return device.type == "cuda" if flag is None else bool(flag)


def choose_attention(name: str, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """`train.sdpa_backend`: "auto" keeps models/attention.py's per-call orders; a kernel's name is tried first in
    every call (calls it cannot run fall back to the next kernel). Logs the orders in force; returns them."""
    orders = attention.set_preference(None if name == "auto" else name)
    if device.type != "cuda":
        log(f"attention: scaled_dot_product_attention on {device.type} (torch's {device.type} kernels)")
    else:
        text = "; ".join(f"{kind}: {', '.join(b.name.lower().replace('_attention', '') for b in order)}"
                         for kind, order in orders.items())
        log(f"attention: kernel chosen per call, first that runs of ({text})")
    return orders


def compile_regions(net: nn.Module) -> list[nn.Module]:
    """The regions compiled one by one: the network's block lists and its middle block, in forward order."""
    regions: list[nn.Module] = []
    for attr in REGION_ATTRS:
        part = getattr(net, attr, None)
        if isinstance(part, nn.ModuleList):
            regions.extend(part)
        elif isinstance(part, nn.Module):
            regions.append(part)
    return regions


class StaticBatch:
    """Forward hooks that pad a training batch smaller than the largest one seen to that size (the last sample
    repeated) and cut the output back: a bucket's tail batch runs the compiled graphs of the full batch."""

    def __init__(self, net: nn.Module) -> None:
        self.full = 0
        self.padded = 0  # batches padded so far
        self._n = 0
        self.handles = [net.register_forward_pre_hook(self.pre, with_kwargs=True), net.register_forward_hook(self.post)]

    def _pad(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == self._n:
            return torch.cat([value, value[-1:].expand(self.full - self._n, *value.shape[1:])])
        return value

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        self._n = 0
        if not (module.training and isinstance(x, torch.Tensor) and x.dim()):
            return None
        n = x.shape[0]
        if n >= self.full:
            self.full = n
            return None
        self._n, self.padded = n, self.padded + 1
        return tuple(self._pad(a) for a in args), {k: self._pad(v) for k, v in kwargs.items()}

    def post(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if self._n:
            n, self._n = self._n, 0
            return out[:n]
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def compile_network(net: nn.Module, log: Callable[[str], None], regions: list[nn.Module] | None = None,
                    backend: str = "inductor") -> StaticBatch:
    """Regional torch.compile with static shapes (each region compiled in place: parameter names unchanged), the
    tail-batch padding installed; the first forward's time (which includes compiling) is logged."""
    from torch import _dynamo

    regions = compile_regions(net) if regions is None else regions
    _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    _dynamo.config.accumulated_recompile_limit = max(_dynamo.config.accumulated_recompile_limit, RECOMPILE_LIMIT)
    for region in regions:
        region.compile(backend=backend, dynamic=False)
    t0: list[float] = []

    def pre(_m, _a):
        t0.append(time.perf_counter())

    def post(_m, _a, _o):
        log(f"compile: first forward {time.perf_counter() - t0[0]:.1f} s with {len(regions)} compiled regions "
            "(the first backward compiles the backward graphs; each new bucket shape compiles once more)")
        for h in handles:
            h.remove()

    handles = [net.register_forward_pre_hook(pre), net.register_forward_hook(post)]
    log(f"compile: {len(regions)} regions compiled one by one, static shapes per bucket (torch.compile "
        f"dynamic=False, backend {backend}); tail batches padded to the full batch")
    return StaticBatch(net)


def eager() -> Any:
    """Compiled regions run eagerly inside (torch.compiler.set_stance "force_eager"): for previews and validation,
    whose no-grad, eval-mode calls at other batch sizes would otherwise compile a second set of graphs."""
    return torch.compiler.set_stance("force_eager")


def apply(cfg_train: Any, comp: Any, blocks: list[nn.Module] | None, device: torch.device,
          amp_dtype: torch.dtype | None, log: Callable[[str], None]) -> StaticBatch | None:
    """All fast-path switches of [train] on the loaded parts (before wrapping, before the optimizer). The compiled
    regions are compile_regions(network) (the middle block included) less the blocks train.blocks_to_swap streams
    (`blocks`, train.py's resident family blocks, is not needed for that). Returns the tail-batch padding when
    compiling."""
    if device.type == "cuda":  # process-wide numerics switches: fp32 matmuls / convolutions on tensor cores (TF32),
        # cuDNN autotuning per convolution shape (static shapes per bucket: tuned once per bucket)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg_train.allow_tf32)
        torch.backends.cudnn.benchmark = bool(cfg_train.cudnn_benchmark) and not cfg_train.deterministic
        log(f"cuda: TF32 {'on' if cfg_train.allow_tf32 else 'off'}, cudnn.benchmark "
            f"{'on' if torch.backends.cudnn.benchmark else 'off'}")
    if cfg_train.channels_last:  # off unless set: not measured faster yet (CUDA GroupNorm returns NCHW)
        for m in (comp.network, comp.vae):
            if m is not None:
                m.to(memory_format=torch.channels_last)  # 4-D conv weights; activations follow the weights
        log("channels_last: network and VAE convolutions")
    choose_attention(cfg_train.sdpa_backend, device, log)
    if resolve(cfg_train.compile, device):
        regions = compile_regions(comp.network)
        if getattr(cfg_train, "blocks_to_swap", 0):  # a swapped block's weights move each step: left eager
            from training import blockswap
            regions = blockswap.resident(comp.network, cfg_train.blocks_to_swap, regions)
        return compile_network(comp.network, log, regions)
    return None
