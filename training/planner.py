"""Memory planner: what a run's config will need on the training device, worked out before any weight is loaded.

    python train.py cfg.toml --plan [--gpu-memory 24GiB]

Everything comes from shapes. The parts the run loads are built on the meta device (from the checkpoint's header,
or the preset), converted as the run converts them (fp8 base weights, LoRA adapters), and then:

  weights      numel x bytes of every loaded parameter and buffer, by part and dtype (fp8: codes + per-channel
               scales, training/fp8.py); with block swap the swapped blocks are in CPU memory but for the two largest
               (the one running and the one arriving, training/blockswap.py).
  gradients    every trained parameter's gradient in its dtype; with a fused backward pass one tensor at a time.
  optimizer    the optimizer itself stepped once on meta copies of the trained parameters (torch optimizers, our
               Adafactor; the fp32 copies stochastic rounding steps); bitsandbytes' 8-bit optimizers by their rule
               (tensors of >= min_8bit_size elements: one byte per element per state + one fp32 absmax per
               256-element block; smaller ones fp32 states; one 256-entry fp32 quantile map per state, shared).
  activations  one training micro-step simulated on the meta device -- VAE encode (latents not cached), text
               encoding, the network's forward at the largest bucket and batch size, the loss, the backward pass
               with gradient checkpointing as configured (and the fused steps freeing gradients) -- with every tensor
               tracked from its creation until it is freed (a dispatch mode keeping count of live storages). The
               peak of what the step allocates, less the parameter gradients alive at that moment, is the
               activation term. Autocast is emulated with the target device's policy (CUDA: matmuls, `@` and
               einsum included / convolutions / attention in the autocast dtype, norms and softmax in fp32, cast
               copies of trained fp32 weights cached for the forward, as torch does); attention as the fused kernels
               keep it (q, k, v, output, log-sum-exp, never the L x L matrix).
  reserve      a CUDA context and allocator allowance (not seen by torch.cuda.max_memory_allocated): an assumption,
               see docs/low-vram.md.

The total is the sum of the terms: weights + optimizer + gradients + activations (+ reserve), an upper bound on the
simulated step by the gradients not yet allocated at the activation peak (none with a fused backward pass).
docs/low-vram.md says how far each term was checked against real runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import models
from training import blockswap, fp8

GIB = 2**30
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + cuBLAS / cuDNN workspaces: an allowance, not a measurement
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation on top of the peak: an allowance
BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer states: one fp32 absmax per 256 elements (0.4x - 0.50)
BNB_MIN_8BIT = 4096  # bitsandbytes' min_8bit_size default: smaller tensors keep fp32 states
BNB_QMAP = 256 * 4  # one shared 256-entry fp32 quantile map per state
PCIE_BYTES_PER_S = {"PCIe 4.0 x16": 25e9, "PCIe 5.0 x16": 50e9}  # achievable pinned host-to-device, ~80% of peak
VAE_FACTOR = 8
CLIP_TOKENS = 77
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "fp8",
               torch.int64: "int64"}


# ---------------------------------------------------------------------------------------------------------------------
# Counting live tensors on the meta device


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages on `device_type` alive that were created inside this mode (views share their base's
    storage), and the peak. The simulated step counts meta tensors; bench/train_memory.py --measure counts a real
    CPU step's tensors with it."""

    def __init__(self, device_type: str = "meta") -> None:
        super().__init__()
        self.device_type = device_type
        self.storages: dict[int, list[int]] = {}  # storage id -> [live tensors, bytes]
        self.live = 0
        self.peak = 0

    def _track(self, t: Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        entry = self.storages.get(key)
        if entry is None:
            entry = self.storages[key] = [0, st.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.storages[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        dev = self.device_type
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, Tensor) and t.device.type == dev}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, Tensor) and t.device.type == dev:
                key = t.untyped_storage()._cdata
                if key in inputs and key not in self.storages:
                    continue  # a view (or in-place result) of a tensor made before the step: a weight, no new bytes
                self._track(t)
        return out


_LOWER = ("linear", "conv2d", "conv1d", "scaled_dot_product_attention")  # torch.nn.functional names
_LOWER_TORCH = ("matmul", "mm", "bmm", "baddbmm", "addmm", "einsum")  # einsum: its bmm runs in the autocast dtype
_LOWER_TENSOR = ("__matmul__", "matmul")  # `a @ b` is a C method: it does not pass through torch.matmul
_FP32_CUDA = ("layer_norm", "group_norm", "softmax", "log_softmax", "mse_loss", "rms_norm")


class AutocastEmulation:
    """torch.autocast's casts, which the meta device does not run, for `device_type`'s policy: the ops that run in
    the autocast dtype get their floating inputs cast (a trained leaf's cast cached until `clear()`, as autocast
    caches them for the forward), CUDA's fp32 ops get theirs cast to fp32. Attention runs as the fused CPU kernel
    (its saved tensors are those of the fused CUDA kernels: q, k, v, output, log-sum-exp). Installed by patching
    the torch.nn.functional / torch functions for the duration of `with` (checkpoint recomputation inside the
    backward pass must see the same casts, and function modes do not reach it)."""

    def __init__(self, dtype: torch.dtype | None, device_type: str):
        self.dtype = dtype
        self.fp32 = _FP32_CUDA if device_type == "cuda" else ()
        self.cache: dict[int, Tensor] = {}
        self.saved: list[tuple[Any, str, Any]] = []

    def clear(self) -> None:
        self.cache.clear()

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if not (isinstance(x, Tensor) and x.is_floating_point() and x.dtype != dtype):
            return x
        if x.is_leaf and x.requires_grad and dtype == self.dtype and not blockswap.in_backward():
            if id(x) not in self.cache:
                self.cache[id(x)] = x.to(dtype)
            return self.cache[id(x)]
        return x.to(dtype)

    def _wrap(self, name: str, fn: Any, lower: bool) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            target = (self.dtype if lower else torch.float32) if self.dtype is not None else None
            if target is not None:
                args = tuple(self._cast(a, target) for a in args)
                kwargs = {k: self._cast(v, target) for k, v in kwargs.items()}
            if name == "scaled_dot_product_attention" and kwargs.get("attn_mask") is None and len(args) == 3:
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    *args, is_causal=bool(kwargs.get("is_causal", False)), scale=kwargs.get("scale"))[0]
            return fn(*args, **kwargs)
        return run

    def __enter__(self) -> "AutocastEmulation":
        for owner, names, lower in ((F, _LOWER, True), (torch, _LOWER_TORCH, True), (Tensor, _LOWER_TENSOR, True),
                                    (F, self.fp32, False)):
            for name in names:
                fn = getattr(owner, name)
                self.saved.append((owner, name, fn if name in vars(owner) else None))  # None: inherited
                setattr(owner, name, self._wrap(name, fn, lower))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, fn in reversed(self.saved):
            if fn is None:
                delattr(owner, name)
            else:
                setattr(owner, name, fn)
        self.saved.clear()
        self.cache.clear()


# ---------------------------------------------------------------------------------------------------------------------
# The run's parts on the meta device


@dataclass
class Setup:
    """What the run loads and trains, from its config (the rules of train.py)."""
    family: str
    parts: list[str]  # loaded parts
    dtypes: dict[str, torch.dtype]  # by part
    fp8_parts: tuple[str, ...]
    lora: bool
    trained_text: bool  # text encoders trained (full fine-tune) or adapted (LoRA)
    text_cached: bool
    latents_cached: bool
    amp: torch.dtype | None
    batch: int
    size: tuple[int, int]  # largest bucket (width, height) in pixels
    ckpt: bool
    fused: bool
    sr: bool  # full_bf16 + stochastic rounding: steps in fp32, fp32 optimizer state
    swap: int
    world: int
    fsdp: bool


def setup_of(cfg: Any, world_size: int = 1) -> Setup:
    """The run's Setup (parts loaded as train.py loads them)."""
    fam = models.family(models.family_of(cfg.model))
    t, n = cfg.train, cfg.network
    smp = cfg.sample
    prompts = bool(smp.sample_prompts) and bool(smp.sample_every_n_steps or smp.sample_every_n_epochs or
                                                smp.sample_at_first)
    use_store = bool(cfg.cache.cache_dir)
    lora = bool(n.network_module)
    trained_text = t.train_text_encoder or (lora and not n.network_train_unet_only)
    need_text = not cfg.cache.cache_text_encoder_outputs or prompts or trained_text
    text_parts = [p for p in fam.text_encoders if not (p in fam.optional_parts and not cfg.model.use_t5)]
    parts = [fam.network] + (["vae"] if (not use_store or prompts) else []) \
        + (text_parts if need_text else [])
    weight = torch.bfloat16 if t.full_bf16 else torch.float16 if t.full_fp16 else torch.float32
    dt = models.DTYPES
    dtypes = {p: dt[cfg.model.text_encoder_dtype] for p in text_parts}
    if t.train_text_encoder:
        dtypes.update({p: weight for p in text_parts if p in fam.trainable_text_lr})
    dtypes.update({fam.network: weight, "vae": dt[cfg.model.vae_dtype]})
    res = cfg.data.resolution
    size = (res[0], res[1]) if isinstance(res, list) else (res, res)
    return Setup(family=fam.name, parts=parts, dtypes=dtypes, fp8_parts=fp8.fp8_parts(cfg.model, fam),
                 lora=lora, trained_text=trained_text,
                 text_cached=not need_text or cfg.cache.cache_text_encoder_outputs,
                 latents_cached=use_store, amp=None if t.mixed_precision == "no" else dt[t.mixed_precision],
                 batch=cfg.data.batch_size, size=size, ckpt=t.gradient_checkpointing, fused=t.fused_backward_pass,
                 sr=t.full_bf16 and t.stochastic_rounding, swap=getattr(t, "blocks_to_swap", 0), world=world_size,
                 fsdp=t.fsdp)


def meta_components(cfg: Any, s: Setup) -> Any:
    """The loaded parts built on the meta device in their dtypes: from the checkpoint's header (no tensor is read)
    or from the preset."""
    fam = models.family(s.family)
    opts = {"max_token_length": cfg.model.max_token_length, "t5_max_token_length": cfg.model.t5_max_token_length,
            "t5_tokenizer": cfg.model.t5_tokenizer, "use_t5": cfg.model.use_t5}
    path = cfg.model.pretrained_model_name_or_path
    if not path:
        comp = models.build(s.family, cfg.model.model_preset, device="meta", parts=s.parts, dtype=s.dtypes, **opts)
    else:
        from models.family import strip_prefix
        shapes = dict(models.open_checkpoint(path).shapes())
        separate = {"vae": cfg.model.vae, "te1": cfg.model.clip_l, "clip_l": cfg.model.clip_l,
                    "clip_g": cfg.model.clip_g, "t5": cfg.model.t5xxl}
        for name, p in separate.items():
            if p and name in fam.prefix and name in s.parts:
                sub = models.open_checkpoint(p).shapes()
                own = strip_prefix(sub, fam.prefix[name])
                shapes.update({fam.prefix[name] + k: v for k, v in (own or sub).items()})
        cfgs = fam.configs_from_shapes(shapes)
        if "vae" in s.parts and "vae" not in cfgs:  # a diffusers-named VAE file: the family's standard VAE
            cfgs["vae"] = fam.preset_configs(next(iter(fam.presets)))["vae"]
        modules = {}
        for name in s.parts:
            with torch.device("meta"):
                modules[name] = fam.module_for(name, cfgs[name]).to(s.dtypes.get(name))
        if models.sd3.CONTEXT_EMBEDDER in shapes:  # as models.load: the MMDiT's context width
            opts["context_dim"] = shapes[models.sd3.CONTEXT_EMBEDDER][1]
        comp = models._assemble(fam, modules, opts)  # noqa: SLF001 - models.load's meta build, nothing read
    for name in s.fp8_parts:
        if getattr(comp, name, None) is not None:
            getattr(comp, name).requires_grad_(False)
    fp8.apply(comp, s.fp8_parts, lambda _m: None)
    return comp


# ---------------------------------------------------------------------------------------------------------------------
# Terms


@dataclass
class Term:
    """One part of the estimate, in bytes, with how it was counted."""
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    """The estimate of one config: resident terms, the step's terms, allowances, and what the options saved."""
    setup: Setup
    terms: list[Term] = field(default_factory=list)
    info: list[str] = field(default_factory=list)  # savings, block-swap traffic, what was not loaded
    reserve: int = 0

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms) + self.reserve

    def term(self, name: str) -> int:
        return sum(t.bytes for t in self.terms if t.name == name)


def _dtype_bytes(module: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        name = DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))
        out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def weight_bytes(comp: Any, parts: list[str]) -> dict[str, dict[str, int]]:
    """Bytes of every loaded part's parameters and buffers, by dtype name ("fp8" for fp8 codes)."""
    return {p: _dtype_bytes(getattr(comp, p)) for p in parts if getattr(comp, p, None) is not None}


def trained_params(cfg: Any, comp: Any, s: Setup) -> tuple[list[nn.Parameter], Any]:
    """The parameters the run trains (on meta) and the LoRA network (or None); everything else frozen, as train.py
    freezes it (autocast caches the casts of trained weights only)."""
    for m in comp.parts().values():
        m.requires_grad_(False)
    if s.lora:
        from networks import lora
        comp.network.requires_grad_(False)
        with torch.device("meta"):
            net = lora.create_network(comp, cfg.network, unet=not cfg.network.network_train_text_encoder_only,
                                      text=not cfg.network.network_train_unet_only)
        net.apply_to()
        return [p for p in net.parameters() if p.requires_grad], net
    comp.network.requires_grad_(True)
    params = list(comp.network.parameters())
    if cfg.train.train_text_encoder:
        for name, m in comp.text_encoders().items():
            if name in models.family(s.family).trainable_text_lr:
                params += list(m.requires_grad_(True).parameters())
    return params, None


def gradient_bytes(params: list[nn.Parameter], fused: bool) -> int:
    """Every trained parameter's gradient (its dtype); fused backward: the largest one (one at a time)."""
    sizes = [p.numel() * p.element_size() for p in params]
    return (max(sizes) if sizes else 0) if fused else sum(sizes)


def _bnb_bytes(params: list[nn.Parameter], states: int, min_8bit: int) -> int:
    total = states * BNB_QMAP
    for p in params:
        n = p.numel()
        total += states * (4 * n if n < min_8bit else n + 4 * math.ceil(n / BNB_BLOCK))
    return total


_FORMULA_STATES = {"lion": 1, "prodigy": 4, "came": 1}  # full-size states of optimizers not run on meta (+ below)


def optimizer_bytes(cfg: Any, params: list[nn.Parameter], s: Setup) -> tuple[int, str]:
    """Optimizer state bytes of `params` after a step, and how they were counted."""
    name = cfg.optimizer.optimizer_type.lower()
    kw = cfg.optimizer.optimizer_kwargs
    if name in ("adamw8bit", "lion8bit"):
        return _bnb_bytes(params, 2 if name == "adamw8bit" else 1, kw.get("min_8bit_size", BNB_MIN_8BIT)), \
            "bitsandbytes' 8-bit rule"
    if name in _FORMULA_STATES:
        full = sum(p.numel() * (4 if s.sr else p.element_size()) for p in params)
        extra = sum(4 * (math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]) * 2 if p.dim() >= 2
                    else 4 * p.numel() for p in params) if name == "came" else 0
        return _FORMULA_STATES[name] * full + extra, "formula (its package is not run here)"
    from training.optim import build_optimizer
    # the state of one parameter depends on its shape and dtype only: one meta copy of each kind is stepped
    kinds: dict[tuple, int] = {}
    for p in params:
        k = (tuple(p.shape), torch.float32 if s.sr else p.dtype)
        kinds[k] = kinds.get(k, 0) + 1
    copies = [nn.Parameter(torch.empty(shape, dtype=dtype, device="meta")) for shape, dtype in kinds]
    for c in copies:
        c.grad = torch.empty_like(c)
    ocfg = dataclasses.replace(cfg.optimizer, optimizer_kwargs={k: v for k, v in kw.items()
                                                                if k not in ("fused", "foreach", "capturable")})
    opt = build_optimizer([{"params": copies}], ocfg)
    opt.step()
    total = sum(n * sum(v.numel() * v.element_size() for v in opt.state[c].values() if torch.is_tensor(v))
                for c, n in zip(copies, kinds.values()))
    return total, "stepped once on meta tensors"


@contextlib.contextmanager
def _meta_generators() -> Iterator[None]:
    """Random numbers as a step on the meta device needs them: there is no meta generator, so torch.Generator gives
    a CPU one and torch.randint ignores it (on meta only shapes count)."""
    gen, randint = torch.Generator, torch.randint

    def generator(device: Any = None) -> torch.Generator:
        return gen()

    def rint(*args: Any, generator: Any = None, **kwargs: Any) -> Tensor:
        return randint(*args, **kwargs)
    torch.Generator, torch.randint = generator, rint  # type: ignore[misc, assignment]
    try:
        yield
    finally:
        torch.Generator, torch.randint = gen, randint  # type: ignore[misc]


def _step_path(ocfg: Any, device_type: str) -> str:
    """How the plain optimizer step runs on `device_type`: "foreach" (temporaries for every parameter at once) or
    "loop" (a parameter at a time; fused AdamW's in-place kernel counted so too). The user's fused / foreach
    kwargs, with AdamW's as training/optim.py build_optimizer completes them (adamw_path); else torch's default
    for its other optimizers (foreach on CUDA, a loop elsewhere)."""
    from training.optim import adamw_path
    kw = dict(ocfg.optimizer_kwargs)
    if ocfg.optimizer_type.lower() == "adamw":
        kw.update(adamw_path(kw, device_type))
    if kw.get("fused"):
        return "loop"
    if "foreach" in kw:
        return "foreach" if kw["foreach"] else "loop"
    return "foreach" if device_type == "cuda" else "loop"


def step_transient(cfg: Any, params: list[nn.Parameter], s: Setup, device_type: str = "cuda") -> int:
    """Bytes the optimizer step allocates while it runs, beyond the state. Per-parameter steps (a fused backward
    pass, stochastic rounding: training/steppers.py ParamStepper -- fp32 copies, the copies kept for a non-finite
    gradient, the optimizer's temporaries, the rounding): the most over the trained parameters. The plain step takes
    the path training/optim.py build_optimizer and torch choose (_step_path): a foreach path's temporaries cover every
    parameter at once (AdamW: a full-size sqrt of the second moments), so the sum over the parameters; a loop over
    the parameters, or fused AdamW's in-place kernel (CUDA), one parameter at a time at most, the most. Each kind
    (shape, dtype) is stepped twice on meta, the second step counted (the first makes the state). bitsandbytes and
    the optimizers counted by formula: 0 (not run here)."""
    name = cfg.optimizer.optimizer_type.lower()
    if name in ("adamw8bit", "lion8bit") or name in _FORMULA_STATES:
        return 0
    from training.optim import build_optimizer
    from training.steppers import ParamStepper
    per_param = s.fused or s.sr
    kw = {k: v for k, v in cfg.optimizer.optimizer_kwargs.items() if k not in ("fused", "foreach", "capturable")}
    foreach = _step_path(cfg.optimizer, device_type) == "foreach" and not per_param
    kinds: dict[tuple, int] = {}
    for p in params:
        k = (tuple(p.shape), p.dtype)
        kinds[k] = kinds.get(k, 0) + 1
    worst = total = 0
    with _meta_generators():
        for (shape, dtype), n in kinds.items():
            c = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
            opt = None
            if foreach:
                try:
                    opt = build_optimizer([{"params": [c]}], dataclasses.replace(
                        cfg.optimizer, optimizer_kwargs={**kw, "foreach": True}))
                except (TypeError, ValueError):  # an optimizer without a foreach path: a loop over the parameters
                    foreach = False
            opt = opt or build_optimizer([{"params": [c]}], dataclasses.replace(
                cfg.optimizer, optimizer_kwargs={**kw, **({"foreach": False} if name == "adamw" else {})}))
            stepper = ParamStepper(opt, max_grad_norm=cfg.optimizer.max_grad_norm, stochastic_rounding=s.sr) \
                if per_param else None
            live = LiveBytes()
            for counted in (False, True):
                c.grad = torch.empty_like(c)
                with live if counted else contextlib.nullcontext():
                    stepper.step(c) if stepper else opt.step()
            worst, total = max(worst, live.peak), total + n * live.peak
    return total if foreach else worst


# ---------------------------------------------------------------------------------------------------------------------
# The simulated micro-step


def _cached_text(comp: Any, s: Setup, batch: int) -> dict[str, Tensor]:
    """What the loader gives for cached text-encoder outputs (train.py casts them to fp32)."""
    c = comp.network.cfg
    if hasattr(c, "context_dim"):  # the SDXL UNet: CLIP chunks of 77; y = pooled bigG + 6 size embeddings of 256
        t = CLIP_TOKENS * (comp.max_token_length // 75)
        return {"context": torch.empty(batch, t, c.context_dim, device="meta"),
                "pooled": torch.empty(batch, c.adm_in_channels - 6 * 256, device="meta")}
    return {"context": torch.empty(batch, CLIP_TOKENS + comp.t5_max_token_length, c.context_in_dim, device="meta"),
            "pooled": torch.empty(batch, c.adm_in_channels, device="meta")}


def simulate_step(comp: Any, s: Setup, trained: list[nn.Parameter], ckpt: bool,
                  device_type: str = "cuda") -> dict[str, int]:
    """One micro-step on the meta device (see the module doc) -> {"peak": bytes the step allocates at most,
    "grads": the trained parameters' gradients alive at its end (0 with a fused backward pass, which frees each at
    once), "activations": the peak beyond those gradients}."""
    net = comp.network
    net.train()
    old_ckpt = net.gradient_checkpointing
    net.gradient_checkpointing = ckpt
    for p in trained:
        p.requires_grad_(True)
        p.grad = None
    live = LiveBytes()
    grads = {"grads": 0}

    def on_grad(p: Tensor) -> None:
        if s.fused:  # the fused backward pass steps and frees it at once
            p.grad = None
        else:
            grads["grads"] += p.numel() * p.element_size()

    handles = [p.register_post_accumulate_grad_hook(on_grad) for p in trained]
    auto = AutocastEmulation(s.amp, device_type)
    b, (w, h) = s.batch, s.size
    try:
        with live, auto:
            if s.latents_cached:
                latents = torch.empty(b, net.cfg.in_channels, h // VAE_FACTOR, w // VAE_FACTOR, device="meta")
            else:
                with torch.no_grad():
                    images = torch.empty(b, 3, h, w, device="meta", dtype=comp.vae.encoder.conv_in.weight.dtype
                                         if hasattr(comp.vae, "encoder") else torch.float32)
                    with _no_autocast(auto):
                        latents = comp.encode_images(images).float()
                    del images
            if comp.text_encoders() and not s.text_cached:
                # T5 checks its token ids on the host, which meta tensors cannot: zeros in its place (the reference
                # allows it); its forward is frozen and over before the network runs
                t5 = getattr(comp, "t5", None)
                if t5 is not None:
                    comp.t5 = None
                try:
                    with contextlib.nullcontext() if s.trained_text else torch.no_grad():
                        text = comp.encode_text(["a photo"] * b, device="meta")
                finally:
                    if t5 is not None:
                        comp.t5 = t5
            else:
                text = _cached_text(comp, s, b)
            text = {k: v.float() for k, v in text.items()}
            sizes = tuple(torch.empty(b, 2, device="meta") for _ in range(3))
            cond = comp.conditioning(text, *sizes)
            noise = torch.empty_like(latents)
            x_t = latents * 0.5 + noise * 0.5
            t = torch.empty(b, device="meta")
            pred = net(x_t, t, **cond)
            auto.clear()  # autocast's cast cache ends with its region (the forward)
            loss = (pred.float() - noise).pow(2).mean()
            del pred, cond, text, x_t
            loss.backward()
            del loss
    finally:
        for hd in handles:
            hd.remove()
        net.gradient_checkpointing = old_ckpt
        for p in trained:
            p.grad = None
    # without a fused pass every gradient is alive at the end, so peak >= grads: the total weights + optimizer +
    # gradients + activations is the simulated peak exactly
    return {"peak": live.peak, "grads": grads["grads"], "activations": live.peak - grads["grads"],
            }


def forward_flops(comp: Any, s: Setup) -> int:
    """FLOPs of one network forward at the largest bucket and batch size (torch's FlopCounterMode on the meta
    device; a pass of its own: the counter's module hooks would keep the simulated step's tensors alive)."""
    from torch.utils.flop_counter import FlopCounterMode
    net, (w, h), b = comp.network, s.size, s.batch
    text = {k: v for k, v in _cached_text(comp, s, b).items()}
    cond = comp.conditioning(text, *(torch.empty(b, 2, device="meta") for _ in range(3)))
    x = torch.empty(b, net.cfg.in_channels, h // VAE_FACTOR, w // VAE_FACTOR, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, torch.empty(b, device="meta"), **cond)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _no_autocast(auto: AutocastEmulation) -> Iterator[None]:
    """The VAE runs outside the training autocast (train.py encodes under autocast(enabled=False))."""
    saved, auto.dtype = auto.dtype, None
    try:
        yield
    finally:
        auto.dtype = saved


# ---------------------------------------------------------------------------------------------------------------------
# The plan


def _gib(n: float) -> str:
    """Bytes as GiB (MiB below 0.1 GiB: the tiny presets)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"


def estimate(cfg: Any, world_size: int = 1, device_type: str = "cuda", both_ckpt: bool = False,
             cache: dict | None = None, simulate: bool = True) -> Plan:
    """The memory plan of `cfg` (see the module doc). `both_ckpt`: also simulate the other checkpointing setting
    (for the report); `cache`: simulation results kept between calls (suggestions re-plan variants); `simulate`:
    False leaves the activations out (a cheap estimate: weights, gradients, optimizer)."""
    s = setup_of(cfg, world_size)
    fam = models.family(s.family)
    comp = meta_components(cfg, s)
    plan = Plan(s)
    net = comp.network
    params, lora_net = trained_params(cfg, comp, s)

    # weights, by part and dtype; what fp8 saved; what block swap keeps in CPU memory
    wb = weight_bytes(comp, s.parts)
    swap_keep, swap_info = 0, ""
    if s.swap:
        blocks = blockswap.swappable_blocks(net)
        chosen = blockswap.choose(blocks, s.swap)
        sizes = sorted((blockswap.block_bytes(blocks[i]) for i in chosen), reverse=True)
        swap_keep = sum(sizes) - sum(sizes[:2])
        swap_info = f"block swap: {s.swap} of {len(blocks)} blocks ({_gib(sum(sizes))}) in CPU memory, " \
                    f"at most 2 on the device ({_gib(sum(sizes[:2]))})"
    for part, by_dtype in wb.items():
        total = sum(by_dtype.values())
        note = ", ".join(f"{k} {_gib(v)}" for k, v in by_dtype.items())
        if part == fam.network and swap_keep:
            total -= swap_keep
            note += f"; -{_gib(swap_keep)} swapped to CPU"
        if s.fsdp and (part == fam.network or (s.trained_text and part in fam.text_encoders)):
            total //= max(1, s.world)
            note += f"; sharded over {s.world} ranks (FSDP)"
        plan.terms.append(Term(f"weights: {part}", total, note))
    if lora_net is not None:  # the adapters themselves (fp32): modules of their own, in no part's parameters
        ab = sum(t.numel() * t.element_size() for t in (*lora_net.parameters(), *lora_net.buffers()))
        plan.terms.append(Term("weights: adapters", ab // (max(1, s.world) if s.fsdp else 1), "LoRA adapters (fp32)"))
    not_loaded = [p for p in ("vae", *fam.text_encoders) if p not in s.parts]
    if not_loaded:
        plan.info.append(f"not loaded: {', '.join(not_loaded)} (cached latents / text-encoder outputs, or unused)")
    if s.fp8_parts:
        fp8_mods = [m for part in s.fp8_parts if getattr(comp, part, None) is not None
                    for m in getattr(comp, part).modules() if isinstance(m, fp8._FP8Weight)]
        before = sum(m.weight_fp8.numel() * m.compute_dtype.itemsize for m in fp8_mods)
        after = sum(m.weight_fp8.numel() + 4 * m.weight_scale.numel() for m in fp8_mods)
        loaded = ", ".join(p for p in s.fp8_parts if p in s.parts)
        plan.info.append(f"fp8 base ({loaded}): {len(fp8_mods)} weights {_gib(before)} -> "
                         f"{_gib(after)} (saves {_gib(before - after)})")
    if swap_info:
        plan.info.append(swap_info)

    # gradients and optimizer state of the trained parameters
    shard = max(1, s.world) if s.fsdp else 1
    g = gradient_bytes(params, s.fused) // shard
    what = "LoRA adapters (fp32)" if s.lora else \
        "network" + (" + text encoders" if cfg.train.train_text_encoder else "")
    plan.terms.append(Term("gradients", g, f"{what}, {sum(p.numel() for p in params) / 1e6:.1f}M parameters"
                           + ("; fused backward: one tensor at a time" if s.fused else "")
                           + ("; in DDP's buckets between steps" if s.world > 1 and not s.fsdp else "")))
    ob, how = optimizer_bytes(cfg, params, s)
    if s.swap and not s.lora:  # the swapped blocks' optimizer state travels with them (training/blockswap.py)
        blocks = blockswap.swappable_blocks(net)
        per = sorted((_state_share(cfg, list(blocks[i].parameters()), s) for i in blockswap.choose(blocks, s.swap)),
                     reverse=True)
        off = sum(per) - sum(per[:2])
        ob -= off
        how += f"; -{_gib(off)} with the swapped blocks in CPU memory"
    plan.terms.append(Term("optimizer", ob // shard, f"{cfg.optimizer.optimizer_type} ({how})"))

    # activations: the simulated step
    if not simulate:
        plan.reserve = 0
        return plan
    key = _sim_key(cfg, s)
    cache = cache if cache is not None else {}
    if key not in cache:
        cache[key] = simulate_step(comp, s, params, s.ckpt, device_type)
    sim = cache[key]
    note = f"largest bucket {s.size[0]}x{s.size[1]}, batch {s.batch}, checkpointing {'on' if s.ckpt else 'off'}"
    if both_ckpt:
        other = _sim_key(cfg, s, not s.ckpt)
        if other not in cache:
            cache[other] = simulate_step(comp, s, params, not s.ckpt, device_type)
        note += f" ({'off' if s.ckpt else 'on'}: {_gib(cache[other]['activations'])})"
    # a per-parameter step runs inside the backward pass (fused) or after it, the gradients alive (plain + rounding)
    transient = step_transient(cfg, params, s, device_type)
    act = sim["activations"] + transient if s.fused else max(sim["activations"], transient)
    if transient:
        note += f"; optimizer step {_gib(transient)}"
    plan.terms.append(Term("activations", act, note + "; simulated step" +
                           ("" if s.fused else ", its peak less the gradients")))
    if s.fsdp:
        blocks = blockswap.swappable_blocks(net)
        big = max(blockswap.block_bytes(b) for b in blocks)
        plan.terms.append(Term("FSDP buffers", 2 * big, "all-gather of the running and the next block (estimate)"))
    if s.swap:
        moved = 2 * sum(blockswap.block_bytes(blocks[i]) for i in blockswap.choose(blocks, s.swap))
        if not s.lora:
            moved *= 2
        secs = ", ".join(f"{moved / bw:.2f} s on {k}" for k, bw in PCIE_BYTES_PER_S.items())
        plan.info.append(f"block swap moves {moved / 1e9:.1f} GB per step ({secs}), overlapped with "
                         f"{(4 if s.ckpt else 3) * forward_flops(comp, s) / 1e12:.0f} TFLOP of compute per step "
                         f"(3 forwards' worth{' + the recomputed forward' if s.ckpt else ''})")
    plan.reserve = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * sum(t.bytes for t in plan.terms)) \
        if device_type == "cuda" else 0
    if lora_net is not None:
        del lora_net
    return plan


def _state_share(cfg: Any, params: list[nn.Parameter], s: Setup) -> int:
    """Optimizer state of `params` that block swap moves (tensors of >= blockswap.STATE_MIN_NUMEL elements)."""
    big = [p for p in params if p.numel() >= blockswap.STATE_MIN_NUMEL]
    return optimizer_bytes(cfg, big, s)[0] if big else 0


def _sim_key(cfg: Any, s: Setup, ckpt: bool | None = None) -> tuple:
    return (s.amp, s.batch, s.size, s.ckpt if ckpt is None else ckpt, s.fp8_parts, s.lora, s.trained_text,
            s.text_cached,
            s.latents_cached, s.fused, str(s.dtypes), repr(cfg.network))  # dora_wd, factor, targets: all shape the step


def report(plan: Plan, budget: int | None = None) -> str:
    """The plan as lines: one per term, the total, what the options did, and the budget verdict."""
    s = plan.setup
    lines = [f"memory plan ({s.family}, {'LoRA' if s.lora else 'full fine-tune'}, {s.world} process(es)"
             f"{', FSDP' if s.fsdp else ''}): peak per device"]
    for t in plan.terms:
        lines.append(f"  {t.name:<24} {_gib(t.bytes):>11}  {t.note}")
    if plan.reserve:
        lines.append(f"  {'reserve':<24} {_gib(plan.reserve):>11}  CUDA context {_gib(CUDA_CONTEXT_BYTES)} + "
                     f"{ALLOCATOR_SLACK:.0%} allocator slack (allowances)")
    lines.append(f"  {'total':<24} {_gib(plan.total):>11}")
    lines += [f"  {line}" for line in plan.info]
    if budget is not None:
        verdict = "fits" if plan.total <= budget else f"does NOT fit (over by {_gib(plan.total - budget)})"
        lines.append(f"  budget {_gib(budget)}: {verdict}")
    return "\n".join(lines)


def summary_line(plan: Plan, budget: int | None) -> str:
    """One line for the start-up summary."""
    parts = ", ".join(f"{name} {_gib(sum(t.bytes for t in plan.terms if t.name.startswith(name)))}"
                      for name in ("weights", "gradients", "optimizer", "activations"))
    tail = f" of {_gib(budget)}" if budget else ""
    return f"{_gib(plan.total)}{tail} estimated ({parts}; train.py --plan for the details)"


# ---------------------------------------------------------------------------------------------------------------------
# Settings that fit


Change = tuple[str, dict[str, dict[str, Any]]]  # (label, {table: {field: value}})


def _variants(cfg: Any, s: Setup) -> list[Change]:
    """Changes to try, cheapest first (for speed and quality): (label, {table: {field: value}})."""
    t, out = cfg.train, []
    if not t.gradient_checkpointing:
        out.append(("train.gradient_checkpointing = true", {"train": {"gradient_checkpointing": True}}))
    if not s.text_cached and not s.trained_text:
        out.append(("cache.cache_text_encoder_outputs = true", {"cache": {"cache_text_encoder_outputs": True}}))
    if not s.text_cached and cfg.model.text_encoder_dtype == "fp32" and not cfg.train.train_text_encoder:
        # frozen fp32 encoders: half the weights, and no bf16 copy per use for adapters' backward passes
        out.append(("model.text_encoder_dtype = \"bf16\"", {"model": {"text_encoder_dtype": "bf16"}}))
    if not s.latents_cached:
        out.append(("cache.cache_dir = <folder> (cache.py first)", {"cache": {"cache_dir": "<cache>"}}))
    if not s.lora:
        opt = cfg.optimizer.optimizer_type.lower()
        if opt in ("adamw", "lion", "sgd"):
            out.append(("optimizer.optimizer_type = \"AdamW8bit\"", {"optimizer": {"optimizer_type": "AdamW8bit"}}))
        if opt != "adafactor":
            out.append(("optimizer.optimizer_type = \"Adafactor\" (optimizer_kwargs = {})",
                        {"optimizer": {"optimizer_type": "Adafactor", "optimizer_kwargs": {}}}))
        if not t.full_bf16 and t.mixed_precision == "bf16":
            out.append(("train.full_bf16 = true", {"train": {"full_bf16": True}}))
        if not t.fused_backward_pass and s.world == 1 and t.gradient_accumulation_steps == 1:
            out.append(("train.fused_backward_pass = true", {"train": {"fused_backward_pass": True}}))
    else:
        if not t.full_bf16 and t.mixed_precision == "bf16":
            out.append(("train.full_bf16 = true", {"train": {"full_bf16": True}}))
        if not (cfg.model.fp8_base or cfg.model.fp8_base_unet):
            out.append(("model.fp8_base = true", {"model": {"fp8_base": True}}))
    return out


def _with(cfg: Any, changes: dict[str, dict[str, Any]]) -> Any:
    tables = {}
    for table, fields in changes.items():
        if table == "cache" and "cache_dir" in fields:
            fields = {**fields, "cache_dir": cfg.cache.cache_dir or "<cache>"}
        tables[table] = dataclasses.replace(getattr(cfg, table), **fields)
    return dataclasses.replace(cfg, **tables)


def allowed(cfg: Any, check: Callable[[Any], None] | None) -> bool:
    """Whether a run would accept `cfg`: the config loader's checks (the config rebuilt from its values, as a file
    holding them would be read) and `check`, the run's own settings checks (train.check_combination)."""
    from core.config import config_from_dict, to_dict

    def present(v: Any) -> Any:  # a file holds no None: the key is left out (its default)
        if isinstance(v, dict):
            return {k: present(x) for k, x in v.items() if x is not None}
        return [present(x) for x in v] if isinstance(v, list) else v
    try:
        config_from_dict(present(to_dict(cfg)))
        if check is not None:
            check(cfg)
    except ValueError:  # ConfigError included
        return False
    return True


def as_overrides(changes: list[Change]) -> list[str]:
    """The changes as command-line overrides (`table.field=value`, values in TOML syntax)."""
    return [f"{table}.{name}={json.dumps(value)}" for _, change in changes for table, fields in change.items()
            for name, value in fields.items()]


def fitting(cfg: Any, budget: int, world_size: int = 1, device_type: str = "cuda", cache: dict | None = None,
            check: Callable[[Any], None] | None = None) -> tuple[list[Change], int] | None:
    """The cheapest changes to `cfg` that fit `budget` and their estimated total ([] when the config fits), or None
    when nothing tried fits. The changes of _variants are added cheapest first until the plan fits (a change the
    run would refuse -- `allowed(..., check)` fails -- or that cannot be built is skipped), then each one not needed
    is dropped again; failing that, the fewest blocks to swap that fit (binary search: the total falls with every
    block), then a smaller batch. Every result passed `allowed`."""
    cache = cache if cache is not None else {}
    s = setup_of(cfg, world_size)

    def total_with(changes: list[Change]) -> float:
        c = cfg
        for _, change in changes:
            c = _with(c, change)
        if not allowed(c, check):
            return math.inf
        try:
            return estimate(c, world_size, device_type, cache=cache).total
        except (ValueError, TypeError):  # a combination that cannot be built (e.g. kwargs the new optimizer refuses)
            return math.inf

    def pruned(chosen: list[Change], tail: list[Change]) -> tuple[list[Change], int]:
        """`chosen` (+ `tail`) less each change a later one made unnecessary, and the total; the costliest (latest)
        are tried first, so that the cheap ones stay."""
        for step_back in reversed(list(chosen)):
            rest = [c for c in chosen if c is not step_back]
            if total_with(rest + tail) <= budget:
                chosen = rest
        return chosen + tail, int(total_with(chosen + tail))

    if total_with([]) <= budget:
        return [], int(total_with([]))
    chosen: list[Change] = []
    for step in _variants(cfg, s):
        total = total_with(chosen + [step])
        if total == math.inf:
            continue
        if total <= budget:
            return pruned(chosen, [step])
        chosen.append(step)
    t = cfg.train
    if not t.fsdp and (s.lora or (world_size == 1 and t.gradient_accumulation_steps == 1)):
        need = {"gradient_checkpointing": True} if not t.gradient_checkpointing else {}
        if not s.lora and not t.fused_backward_pass:
            need["fused_backward_pass"] = True
        cur = cfg
        for _, change in chosen:
            cur = _with(cur, change)
        n_blocks = len(blockswap.swappable_blocks(meta_components(cur, setup_of(cur, world_size)).network))

        def swap(n: int) -> Change:  # with what swapping needs, named
            label = ", ".join([f"train.{k} = true" for k in need] + [f"train.blocks_to_swap = {n}"])
            return (label, {"train": {**need, "blocks_to_swap": n}})
        if total_with(chosen + [swap(n_blocks)]) <= budget:
            lo, hi = 1, n_blocks  # fits with hi
            while lo < hi:
                mid = (lo + hi) // 2
                if total_with(chosen + [swap(mid)]) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            return pruned(chosen, [swap(hi)])
    b = cfg.data.batch_size
    while b > 1:
        b //= 2
        smaller = (f"data.batch_size = {b}", {"data": {"batch_size": b}})
        if total_with(chosen + [smaller]) <= budget:
            return pruned(chosen, [smaller])
    return None


def suggest(cfg: Any, budget: int, world_size: int = 1, device_type: str = "cuda", cache: dict | None = None,
            check: Callable[[Any], None] | None = None) -> str | None:
    """One line naming the cheapest settings that fit `budget` (`fitting`), or None when the config fits or nothing
    tried does."""
    found = fitting(cfg, budget, world_size, device_type, cache, check)
    if not found or not found[0]:
        return None
    changes, total = found
    return "fits with " + ", ".join(label for label, _ in changes) + f" (estimated {_gib(total)})"


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'24GiB', '24G', '24GB' (as GiB: what GPUs are sold as), '80000MiB' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"--gpu-memory {text!r}: give a size such as 24GiB or 80GB")
    value, unit = float(m.group(1)), m.group(2).upper()
    return int(value * 1024 ** " KMGT".index(unit or " ")) if unit else int(value)


def device_budget(device: torch.device) -> int | None:
    """The training device's memory (CUDA), else None."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


# ---------------------------------------------------------------------------------------------------------------------
# train.py


def plan_command(cfg: Any, world_size: int, device: torch.device, gpu_memory: str | None,
                 check: Callable[[Any], None] | None = None, out: Callable[[str], None] = print) -> int:
    """train.py --plan: the plan (for a CUDA device, both checkpointing settings), the verdict against --gpu-memory
    (default: this machine's GPU) and, when over, one line naming the cheapest settings that fit and that the run's
    settings checks `check` accept."""
    budget = parse_size(gpu_memory) if gpu_memory else device_budget(device)
    cache: dict = {}
    plan = estimate(cfg, world_size, "cuda", both_ckpt=True, cache=cache)
    out(report(plan, budget))
    if budget is not None and plan.total > budget:
        fix = suggest(cfg, budget, world_size, cache=cache, check=check)
        out(f"  {fix}" if fix else "  no setting tried fits: a larger GPU, FSDP over several, or a smaller resolution")
    return 0


def startup_line(cfg: Any, world_size: int, device: torch.device, gpu_memory: str | None,
                 warn: Callable[[str], None], check: Callable[[Any], None] | None = None) -> str:
    """The start-up summary's memory estimate, made before any weight is loaded, for a GPU run or when --gpu-memory
    is given (else "": a CPU run's memory is the machine's RAM, and the meta-device build costs seconds); a warning
    naming settings that fit when it exceeds the device's memory (or --gpu-memory)."""
    budget = parse_size(gpu_memory) if gpu_memory else device_budget(device)
    if budget is None:
        return ""
    cache: dict = {}
    plan = estimate(cfg, world_size, "cuda", cache=cache)
    if plan.total > budget:
        fix = suggest(cfg, budget, world_size, cache=cache, check=check)
        warn(f"memory: the estimated peak {_gib(plan.total)} exceeds {_gib(budget)}"
             + (f"; {fix}" if fix else "; no setting tried fits (train.py --plan)"))
    return summary_line(plan, budget)
