"""How the optimizer steps: one `Stepper` interface, chosen once by `make_stepper`, for the four ways of stepping:
plain (the optimizer's own step), fp16 loss-scaled, per-parameter with stochastic rounding, fused backward.
train.py calls `stepper.backward(loss)` and `stepper.step(loss_finite)` and never asks which one it has.

Per-parameter optimizer steps: fused backward pass and stochastic rounding of bf16 weight updates.

Fused backward (kohya `--fused_backward_pass`, OneTrainer "fused back pass"): each parameter is stepped inside its
post-accumulate-grad hook, as soon as its gradient is complete, and the gradient is freed right away, so at most
one parameter's gradient is alive at any moment instead of all of them. Any optimizer whose update of one parameter
depends only on that parameter's gradient and state works (AdamW, AdamW8bit, Adafactor, Lion, CAME, SGD); the step
is the optimizer's own `step()`, run with every group's parameter list narrowed to the one parameter. Prodigy's
step-size estimate sums over all parameters, so it is refused.

Clipping: the global norm is only known after the whole backward pass, too late. With max_grad_norm > 0 each
parameter's gradient is clipped to that norm on its own (kohya's rule for its fused pass: `clip_grad_norm_(tensor,
max_grad_norm)` in the hook); the logged grad_norm is still the global norm (sqrt of the summed squares). A
parameter whose gradient is not finite is not stepped and the step counts as bad.

Stochastic rounding (full_bf16): the parameter is stepped in fp32 (a temporary fp32 copy of that one parameter; the
optimizer state is fp32) and written back to bf16 rounding up with probability equal to the remainder, so updates
smaller than half a bf16 step are kept on average instead of being lost (unbiased: E[round(x)] = x). The random
bits come from a generator seeded by (run seed, step, parameter index): reproducible, also across a resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from core import dist
from core.config import Config

BF16_DROPPED_BITS = 16  # bf16 is the top 16 bits of an fp32
_NOT_PER_PARAMETER = ("prodigy",)  # optimizers whose step couples parameters (class names, lower case)


def _mix(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 0x9E3779B97F4A7C15 + int(p) + 1) % (1 << 63)
    return h


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """fp32 -> bf16, rounding up with probability (remainder / bf16 step): add 16 random low bits, truncate."""
    bits = x.float().view(torch.int32)  # same-size dtype view: any strides (channels_last kept)
    noise = torch.randint(0, 1 << BF16_DROPPED_BITS, bits.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    # int32 addition carries into the kept bits exactly when the dropped bits + noise overflow 2^16
    rounded = (bits + noise).bitwise_and_(-(1 << BF16_DROPPED_BITS))
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class ParamStepper:
    """Steps one parameter at a time through a torch optimizer (optionally fp32 + stochastic rounding)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_grad_norm: float = 0.0,
                 stochastic_rounding: bool = False, seed: int = 0):
        name = type(optimizer).__name__.lower()
        if name in _NOT_PER_PARAMETER:
            raise ValueError(f"{type(optimizer).__name__}'s step couples all parameters (its step size sums over "
                             "them): it cannot be stepped one parameter at a time (train.fused_backward_pass / "
                             "train.stochastic_rounding); use AdamW, Adafactor, Lion or CAME")
        self.optimizer, self.max_grad_norm, self.sr, self.seed = optimizer, max_grad_norm, stochastic_rounding, seed
        self.where: dict[Tensor, tuple[int, int]] = {}  # param -> (group index, global index)
        for gi, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                self.where[p] = (gi, len(self.where))
        self.step_count = 0  # optimizer steps done: part of the rounding seed

    def step(self, p: Tensor) -> tuple[float | Tensor, bool | Tensor]:
        """Clip (per-parameter rule, when set), step and free p.grad -> (squared grad norm before clipping, finite),
        both 0-d tensors on the device. A non-finite gradient is not stepped, decided on the device (no host read per
        parameter): the parameter and its optimizer state on the device are kept as they were (torch.where over a
        copy taken before the step; the copy lives for one parameter only)."""
        grad = p.grad
        if grad is None:
            return 0.0, True
        sq = grad.detach().float().pow(2).sum()
        finite = torch.isfinite(sq)
        with torch.no_grad():
            kept = [(p, p.detach().clone())]
            kept += [(v, v.clone()) for v in self.optimizer.state.get(p, {}).values()
                     if torch.is_tensor(v) and v.device == p.device and v.dim()]
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self._step_only(p)
        with torch.no_grad():
            for now, before in kept:
                if now.shape == before.shape and now.dtype == before.dtype:
                    now.copy_(torch.where(finite, now, before))
            fresh = [v for v in self.optimizer.state.get(p, {}).values()
                     if torch.is_tensor(v) and v.device == p.device and v.dim() and all(v is not n for n, _ in kept)]
            for v in fresh:  # state made by this step (the first): back to zeros, as it starts, if not finite
                v.copy_(torch.where(finite, v, torch.zeros_like(v)))
        p.grad = None
        return sq, finite

    @torch.no_grad()
    def _step_only(self, p: Tensor) -> None:
        gi, index = self.where[p]
        groups = self.optimizer.param_groups
        saved = [g["params"] for g in groups]
        promote = self.sr and p.dtype == torch.bfloat16
        if promote:  # the optimizer sees an fp32 parameter (and keeps fp32 state); bf16 again afterwards
            low, grad = p.data, p.grad
            p.data = low.float()
            p.grad = grad.float()
        try:
            for i, g in enumerate(groups):
                g["params"] = [p] if i == gi else []
            self.optimizer.step()
        finally:
            for g, s in zip(groups, saved):
                g["params"] = s
        if promote:
            gen = torch.Generator(device=p.device).manual_seed(_mix(self.seed, self.step_count, index))
            p.data = stochastic_round_to_bf16(p.data, gen)
            p.grad = grad


def fp32_state(optimizer: torch.optim.Optimizer) -> None:
    """Floating optimizer state back to fp32 (torch's load_state_dict casts it to the bf16 parameter dtype)."""
    for st in optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32 and v.dim() > 0:
                st[k] = v.float()


class FusedBackward:
    """Registers post-accumulate-grad hooks that step and free each parameter during backward.

    Use: build once after the optimizer; run backward as usual (the hooks step); then `finish()` returns
    (global grad norm before clipping, whether every gradient was finite) and counts the step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_grad_norm: float, stochastic_rounding: bool,
                 seed: int):
        self.stepper = ParamStepper(optimizer, max_grad_norm=max_grad_norm, stochastic_rounding=stochastic_rounding,
                                    seed=seed)
        self._sq: list[Tensor | float] = []
        self._finite = True
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.stepper.where]

    def _hook(self, p: Tensor) -> None:
        sq, ok = self.stepper.step(p)
        self._sq.append(sq)
        self._finite &= ok

    def finish(self, loss_finite: Tensor | bool = True) -> tuple[float, bool]:
        """(global grad norm before clipping, whether every gradient and the loss were finite), read from the device
        in one transfer: the step's only host sync."""
        sq = [s for s in self._sq if torch.is_tensor(s)]
        if sq or torch.is_tensor(self._finite) or torch.is_tensor(loss_finite):
            dev = sq[0].device if sq else torch.device("cpu")
            total = torch.stack(sq).sum() if sq else torch.zeros((), device=dev)
            ok_t = torch.as_tensor(self._finite, device=dev) & torch.as_tensor(loss_finite, device=dev)
            total_f, ok_f = torch.stack([total.double(), ok_t.double()]).tolist()
            ok = bool(ok_f)
        else:
            total_f, ok = 0.0, bool(loss_finite)
        self._sq, self._finite = [], True
        self.stepper.step_count += 1
        return math.sqrt(total_f) if ok else math.nan, ok

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def check_fused_settings(cfg: Config, world_size: int) -> None:
    """The combinations a fused backward pass cannot honour; raises ValueError with the reason."""
    t = cfg.train
    if not t.fused_backward_pass:
        return
    if t.gradient_accumulation_steps > 1:
        raise ValueError("train.fused_backward_pass steps each parameter during backward, so it cannot accumulate "
                         f"gradients: set train.gradient_accumulation_steps = 1 (is {t.gradient_accumulation_steps})")
    if t.mixed_precision == "fp16":
        raise ValueError("train.fused_backward_pass cannot be used with mixed_precision = \"fp16\" (the loss scaler "
                         "needs every gradient before any step); use bf16")
    if world_size > 1 or t.fsdp:
        raise ValueError("train.fused_backward_pass runs on one process only (the hooks fire before DDP / FSDP "
                         "reduce the gradients)")
    if cfg.optimizer.optimizer_type.lower() in _NOT_PER_PARAMETER:
        raise ValueError(f"train.fused_backward_pass: optimizer {cfg.optimizer.optimizer_type} couples all "
                         "parameters in its step; use AdamW, Adafactor, Lion or CAME")


def per_parameter_step(optimizer: torch.optim.Optimizer, stepper: ParamStepper,
                       params: list[nn.Parameter]) -> None:
    """The ordinary (not fused) step done one parameter at a time (for stochastic rounding); grads are freed."""
    for p in params:
        if p.grad is not None:
            stepper._step_only(p)
            p.grad = None
    stepper.step_count += 1


# ---------------------------------------------------------------------------------------------------------------------
# The stepper train.py uses: one interface, chosen once by make_stepper


class Stepper:
    """One optimizer step after a step's backward passes: the optimizer's own step over all parameters.

    The interface train.py sees: `backward(loss)` for each micro-batch, then `step(loss_finite)` -> (gradient norm
    before clipping, whether a step was taken); `state_dict()` / `load_state_dict()` for what a resume keeps (the
    loss scale); `close()` at the end. A non-finite loss (`loss_finite`, the same on every rank) or gradient norm
    skips the step, the weights untouched; that decision is the step's one host read."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float):
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm

    def backward(self, loss: Tensor) -> None:
        """Gradients of one micro-batch's (already divided) loss, added into .grad."""
        loss.backward()

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _clip(self, params: list[nn.Parameter]) -> Tensor:
        """The global gradient norm (a tensor, not read), after clipping to max_grad_norm (0: logged only, no
        scaling pass). No sync: scales on the device; FSDP: on the local shards."""
        return dist.full_tensor(dist.clip_grad_norm_(params, self.max_grad_norm or None))

    def step(self, loss_finite: Tensor | bool = True) -> tuple[Tensor | float, bool]:
        """Clip, then step unless the loss or the gradient norm is not finite."""
        params = self._params()
        norm = self._clip(params)
        if not bool(torch.as_tensor(loss_finite, device=norm.device) & torch.isfinite(norm)):  # the host read
            return norm, False
        self._apply(params)
        return norm, True

    def _apply(self, params: list[nn.Parameter]) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any] | None:
        """What a resume state keeps of the stepper (progress.json "scaler"): the loss scaler's state, or None."""
        return None

    def load_state_dict(self, sd: dict[str, Any] | None) -> None:
        """After a resume, once the optimizer's state is loaded: the stepper's own state back."""

    def close(self) -> None:
        """Undo what the stepper attached to the parameters (the fused pass's hooks)."""


class _FP16Scaler(torch.amp.GradScaler):
    """GradScaler that also unscales fp16 gradients (full_fp16 keeps the weights themselves in fp16)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):  # type: ignore[override]
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


class ScaledStepper(Stepper):
    """mixed_precision = "fp16": the loss is scaled before backward and the gradients unscaled before clipping; an
    overflow makes the scaler skip the step and lower its scale (part of its normal work: still "applied")."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float, scaler: torch.amp.GradScaler):
        super().__init__(optimizer, max_grad_norm)
        self.scaler = scaler

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, loss_finite: Tensor | bool = True) -> tuple[Tensor | float, bool]:
        if not bool(loss_finite):
            return math.nan, False
        self.scaler.unscale_(self.optimizer)
        norm = self._clip(self._params())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return norm, True

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict()

    def load_state_dict(self, sd: dict[str, Any] | None) -> None:
        if sd:
            self.scaler.load_state_dict(sd)


class PerParameterStepper(Stepper):
    """full_bf16 with stochastic rounding: the ordinary step, one parameter at a time in fp32 (ParamStepper)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float, seed: int):
        super().__init__(optimizer, max_grad_norm)
        self.params = ParamStepper(optimizer, stochastic_rounding=True, seed=seed)

    def _apply(self, params: list[nn.Parameter]) -> None:
        per_parameter_step(self.optimizer, self.params, params)

    def load_state_dict(self, sd: dict[str, Any] | None) -> None:
        fp32_state(self.optimizer)  # the fp32 steps keep fp32 state; torch's loader cast it to bf16


class FusedBackwardStepper(Stepper):
    """train.fused_backward_pass: every parameter was stepped inside backward (FusedBackward's hooks; parameters
    with a non-finite gradient were left alone); `step` only collects the norm and whether all were finite."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float, stochastic_rounding: bool, seed: int):
        super().__init__(optimizer, max_grad_norm)
        self.hooks = FusedBackward(optimizer, max_grad_norm=max_grad_norm, stochastic_rounding=stochastic_rounding,
                                   seed=seed)

    def step(self, loss_finite: Tensor | bool = True) -> tuple[Tensor | float, bool]:
        return self.hooks.finish(loss_finite)  # one read for the norm, the gradients' and the loss's finiteness

    def load_state_dict(self, sd: dict[str, Any] | None) -> None:
        if self.hooks.stepper.sr:
            fp32_state(self.optimizer)  # as PerParameterStepper

    def close(self) -> None:
        self.hooks.remove()


def make_stepper(cfg: Config, optimizer: torch.optim.Optimizer, device: torch.device) -> Stepper:
    """The run's stepper, chosen once: fused backward hooks (train.fused_backward_pass), the fp16 loss scaler
    (mixed_precision = "fp16"; its full_fp16 variant unscales fp16 gradients), per-parameter steps (full_bf16 with
    stochastic rounding), else the plain step. The config allows at most one of these (check_fused_settings,
    core/config.py)."""
    t, clip = cfg.train, cfg.optimizer.max_grad_norm
    sr = t.full_bf16 and t.stochastic_rounding
    if t.fused_backward_pass:
        return FusedBackwardStepper(optimizer, clip, stochastic_rounding=sr, seed=cfg.seed)
    if t.mixed_precision == "fp16":
        return ScaledStepper(optimizer, clip, (_FP16Scaler if t.full_fp16 else torch.amp.GradScaler)(device.type))
    if sr:
        return PerParameterStepper(optimizer, clip, seed=cfg.seed)
    return Stepper(optimizer, clip)
