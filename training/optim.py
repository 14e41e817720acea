"""Optimizers, block-wise learning rates, LR schedules and the loss recorder.

Schedules reproduce diffusers `optimization.get_scheduler` (same curves as transformers). Adafactor is a small own
implementation of the mode the sd-scripts docs recommend for SDXL (relative_step=False, scale_parameter=False,
warmup_init=False), numerically equal to `transformers.optimization.Adafactor` in that mode.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# name (lower case) -> (module, class, pip package); None module = built in here.
_EXTERNAL: dict[str, tuple[str, str, str]] = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "came": ("came_pytorch", "CAME", "came-pytorch"),
    # schedule-free (Defazio et al. 2024; kohya's names): no LR schedule, weights to evaluate differ from the trained
    # ones, so the loop switches them with OptimizerMode (optimizer.train() / .eval())
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree", "schedulefree"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "prodigyplusschedulefree": ("prodigyplus", "ProdigyPlusScheduleFree", "prodigy-plus-schedule-free"),
}
BUILTIN_OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "CAME", "Adafactor", "SGD",
                      "AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree", "ProdigyPlusScheduleFree")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# diffusers get_polynomial_decay_schedule_with_warmup default end LR.
POLYNOMIAL_LR_END = 1e-7
# diffusers get_cosine_schedule_with_warmup default: half a cosine wave (get_scheduler does not pass num_cycles).
COSINE_HALF_CYCLE = 0.5
_GROUP_KEYS = {"pattern", "lr", "weight_decay"}


# ---------------------------------------------------------------------------------------------------------------------
# Parameter groups


def _compile_groups(cfg: Any) -> list[tuple[str, re.Pattern[str], dict]]:
    """Validate cfg.param_groups and compile the patterns."""
    out = []
    for i, g in enumerate(cfg.param_groups):
        if not isinstance(g, dict) or "pattern" not in g:
            raise ValueError(f"[optimizer] param_groups[{i}] must be a table with a 'pattern' key, got {g!r}")
        unknown = set(g) - _GROUP_KEYS
        if unknown:
            raise ValueError(
                f"[optimizer] param_groups[{i}] has unknown keys {sorted(unknown)}; allowed: {sorted(_GROUP_KEYS)}"
            )
        try:
            rx = re.compile(g["pattern"])
        except re.error as e:
            raise ValueError(f"[optimizer] param_groups[{i}] pattern {g['pattern']!r} is not a valid regex: {e}") from e
        out.append((g["pattern"], rx, {k: v for k, v in g.items() if k != "pattern"}))
    return out


def build_param_groups_for_models(
    models: dict[str, Sequence[tuple[str, nn.Parameter]]], cfg: Any, base_lrs: dict[str, float]
) -> list[dict]:
    """Regex param groups over several models at once, each with its own base LR.

    Patterns are searched (re.search) in the parameter names of every model; the first matching pattern wins; a
    pattern that matches no trainable parameter in any model is an error. Groups are named "<model>" (unmatched
    parameters) or "<model>:<pattern>".
    """
    compiled = _compile_groups(cfg)
    used = [False] * len(compiled)
    groups: list[dict] = []
    for model_name, named_params in models.items():
        base_lr = base_lrs[model_name]
        buckets: list[list[nn.Parameter]] = [[] for _ in compiled]
        base: list[nn.Parameter] = []
        for name, p in named_params:
            if not p.requires_grad:
                continue
            for i, (_, rx, _) in enumerate(compiled):
                if rx.search(name):
                    buckets[i].append(p)
                    used[i] = True
                    break
            else:
                base.append(p)
        if base:
            groups.append({"params": base, "lr": base_lr, "name": model_name})
        for (pattern, _, opts), params in zip(compiled, buckets):
            if params:
                extra = {k: v for k, v in opts.items() if k != "lr"}  # e.g. weight_decay
                groups.append({"params": params, "lr": opts.get("lr", base_lr), "name": f"{model_name}:{pattern}",
                               **extra})
    unused = [compiled[i][0] for i, u in enumerate(used) if not u]
    if unused:
        raise ValueError(
            f"[optimizer] param_groups pattern(s) {unused} match no trainable parameter "
            f"(searched {sum(len(v) for v in models.values())} parameter names of {list(models)})"
        )
    return groups


def build_param_groups(named_params: Sequence[tuple[str, nn.Parameter]], cfg: Any, base_lr: float) -> list[dict]:
    """Regex LR groups for one model: first matching pattern wins, unmatched -> base group, unused pattern -> error."""
    groups = build_param_groups_for_models({"model": named_params}, cfg, {"model": base_lr})
    for g in groups:  # single model: drop the model prefix from group names
        g["name"] = "base" if g["name"] == "model" else g["name"].removeprefix("model:")
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Adafactor


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) with an explicit LR: factored second moment for >= 2-D tensors.

    Equals transformers' Adafactor(relative_step=False, scale_parameter=False, warmup_init=False). The update is
    computed in fp32 for fp16/bf16 parameters.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        relative_step: bool = False,
        scale_parameter: bool = False,
        warmup_init: bool = False,
    ):
        if relative_step or scale_parameter or warmup_init:
            raise ValueError(
                "Adafactor here supports only relative_step=False, scale_parameter=False, warmup_init=False "
                "(the explicit-LR mode); use the 'transformers.optimization.Adafactor' class path for the others"
            )
        if lr is None or lr <= 0:
            raise ValueError(f"Adafactor needs an explicit learning rate > 0, got {lr}")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    @staticmethod
    def _rms(x: Tensor) -> Tensor:
        return x.norm(2) / math.sqrt(x.numel())

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            eps1, _ = group["eps"]
            lr, beta1 = group["lr"], group["beta1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                if grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self.state[p]
                factored = grad.ndim >= 2
                if not state:
                    state["step"] = 0
                    if factored:
                        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    if beta1 is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                state["step"] += 1
                p32 = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
                beta2t = 1.0 - state["step"] ** group["decay_rate"]  # increasing second-moment decay
                sq = grad * grad + eps1
                if factored:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
                    col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
                    # rank-1 estimate of 1/sqrt(V): V ~ row col^T / mean(row)
                    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                    update = r * col.unsqueeze(-2).rsqrt() * grad
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
                    update = v.rsqrt() * grad
                update = update / (self._rms(update) / group["clip_threshold"]).clamp(min=1.0)  # update clipping
                update = update * lr
                if beta1 is not None:
                    m = state["exp_avg"]
                    m.mul_(beta1).add_(update, alpha=1.0 - beta1)
                    update = m
                if group["weight_decay"] != 0:
                    p32.add_(p32, alpha=-group["weight_decay"] * lr)
                p32.add_(-update)
                if p32 is not p:
                    p.copy_(p32)
        return loss


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer factory


def _import_class(module: str, cls: str, pip_name: str | None, what: str) -> type:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        hint = f"; install it with `pip install {pip_name}`" if pip_name else ""
        raise ImportError(f"optimizer {what!r} needs the module {module!r}, which is not installed{hint}") from e
    if not hasattr(mod, cls):
        raise ValueError(f"optimizer {what!r}: module {module!r} has no class {cls!r}")
    return getattr(mod, cls)


def _all_params(param_groups: list[dict]) -> list[Tensor]:
    return [p for g in param_groups for p in g["params"]]


def adamw_path(kwargs: dict, device_type: str | None) -> dict:
    """The step path AdamW is given when optimizer_kwargs choose none (no `fused` / `foreach`), for parameters all on
    `device_type` (None: mixed): fused on CUDA (one kernel for all parameters, in place), foreach on the CPU (torch
    defaults to a Python loop over the tensors there: slow tiny steps). training/planner.py counts the step's
    temporaries for this path."""
    if "fused" in kwargs or "foreach" in kwargs:
        return {}
    return {"cuda": {"fused": True}, "cpu": {"foreach": True}}.get(device_type or "", {})


def build_optimizer(param_groups: list[dict], cfg: Any) -> torch.optim.Optimizer:
    """Optimizer named by cfg.optimizer_type (a built-in name, case-insensitive, or "module.Class")."""
    name = cfg.optimizer_type
    kwargs = dict(cfg.optimizer_kwargs)
    lr = cfg.learning_rate
    if not param_groups or not _all_params(param_groups):
        raise ValueError("build_optimizer: no trainable parameters were given")
    # torch optimizers fill defaults into the group dicts they get; copy so the caller's groups stay reusable
    param_groups = [dict(g) for g in param_groups]
    key = name.lower()
    if key == "adamw":
        params = _all_params(param_groups)
        devices = {p.device.type for p in params}
        one = devices.pop() if len(devices) == 1 and all(p.is_floating_point() for p in params) else None
        kwargs.update(adamw_path(kwargs, one))
        return torch.optim.AdamW(param_groups, lr=lr, **kwargs)
    if key == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, **kwargs)
    if key == "adafactor":
        return Adafactor(param_groups, lr=lr, **kwargs)
    if key in _EXTERNAL:
        module, cls, pip_name = _EXTERNAL[key]
        return _import_class(module, cls, pip_name, name)(param_groups, lr=lr, **kwargs)
    if "." in name:
        module, _, cls = name.rpartition(".")
        opt_cls = _import_class(module, cls, None, name)
        if not (isinstance(opt_cls, type) and issubclass(opt_cls, torch.optim.Optimizer)):
            raise ValueError(f"optimizer_type {name!r} is not a torch.optim.Optimizer subclass")
        return opt_cls(param_groups, lr=lr, **kwargs)
    raise ValueError(
        f"[optimizer] unknown optimizer_type {name!r}; built-ins: {', '.join(BUILTIN_OPTIMIZERS)}, "
        "or a full class path such as 'torch.optim.RAdam'"
    )


def check_optimizer_type(cfg: Any) -> None:
    """optimizer_type names a built-in, an installed optional optimizer or an importable torch.optim.Optimizer class:
    one ValueError line (with the nearest built-in name for a typo) before anything is written or loaded."""
    name = cfg.optimizer_type
    key = name.lower()
    try:
        if key in _EXTERNAL:
            module, cls, pip_name = _EXTERNAL[key]
            _import_class(module, cls, pip_name, name)
        elif "." in name:
            module, _, cls = name.rpartition(".")
            opt_cls = _import_class(module, cls, None, name)
            if not (isinstance(opt_cls, type) and issubclass(opt_cls, torch.optim.Optimizer)):
                raise ValueError(f"optimizer_type {name!r} is not a torch.optim.Optimizer subclass")
        elif key not in ("adamw", "sgd", "adafactor"):
            import difflib
            close = difflib.get_close_matches(key, [b.lower() for b in BUILTIN_OPTIMIZERS], n=1)
            hint = f"; did you mean {BUILTIN_OPTIMIZERS[[b.lower() for b in BUILTIN_OPTIMIZERS].index(close[0])]!r}?" \
                if close else ""
            raise ValueError(f"optimizer.optimizer_type: unknown optimizer {name!r}{hint} (built-ins: "
                             f"{', '.join(BUILTIN_OPTIMIZERS)}, or a full class path such as 'torch.optim.RAdam')")
    except ImportError as e:
        raise ValueError(str(e)) from None


def is_schedule_free(optimizer_type: str) -> bool:
    """Whether optimizer_type names a schedule-free optimizer (kohya: the name ends in "ScheduleFree")."""
    return optimizer_type.lower().rpartition(".")[2].endswith("schedulefree")


def check_schedule_free(cfg: Any) -> None:
    """A schedule-free optimizer replaces the LR decay (its averaging is the schedule): a decaying lr_scheduler is a
    mistake, said before anything loads. Warm-up is allowed (constant_with_warmup, or optimizer_kwargs warmup_steps)."""
    if is_schedule_free(cfg.optimizer_type) and cfg.lr_scheduler not in ("constant", "constant_with_warmup"):
        raise ValueError(f"optimizer_type {cfg.optimizer_type!r} is schedule-free: use lr_scheduler = \"constant\" or "
                         f"\"constant_with_warmup\" (got {cfg.lr_scheduler!r})")


def check_fsdp_optimizer(cfg: Any, fsdp: bool) -> None:
    """bitsandbytes optimizers (AdamW8bit, Lion8bit, any bitsandbytes.optim class path) step their own kernels on a
    parameter's whole local storage and cannot take FSDP2's sharded (DTensor) parameters: the first step failed
    with a traceback. Said in one line before anything is written, naming what works instead."""
    name = cfg.optimizer_type
    module = _EXTERNAL.get(name.lower(), (name.rpartition(".")[0],))[0]
    if fsdp and module.split(".")[0] == "bitsandbytes":
        raise ValueError(f"optimizer.optimizer_type = {name!r} (bitsandbytes) does not work with train.fsdp = true: "
                         f"its kernels cannot step FSDP2's sharded parameters; use optimizer_type = \"AdamW\" with "
                         f"FSDP, or train.fsdp = false (DDP) to keep {name!r}")


class OptimizerMode:
    """The train / eval mode of optimizers that have one (schedule-free: training steps at y, the weights it means
    are x). `training()` before the loop's steps; `evaluating()` around validation, previews and saving, so those
    see, and exports hold, the eval-mode weights. Re-entrant (an export inside a validation block); a no-op for
    optimizers without the methods."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.enabled = callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))
        self._depth = 0

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> "OptimizerMode":
        """The one OptimizerMode of an optimizer (kept on it), so every caller shares its nesting depth."""
        mode = getattr(optimizer, "_sdtrain_mode", None)
        if mode is None:
            mode = cls(optimizer)
            optimizer._sdtrain_mode = mode  # type: ignore[attr-defined]
        return mode

    def training(self) -> None:
        """The trained weights in place (schedule-free optimizers refuse to step in eval mode)."""
        if self.enabled and self._depth == 0:
            self.optimizer.train()  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The eval-mode weights in place for the block, the training weights back after it."""
        if not self.enabled:
            yield
            return
        if self._depth == 0:
            self.optimizer.eval()  # type: ignore[attr-defined]
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.optimizer.train()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------------
# LR schedules (multipliers of each group's initial LR, as diffusers)


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, warmup: int, total: int, num_cycles: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))


def _cosine_with_restarts(step: int, warmup: int, total: int, num_cycles: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def _polynomial(step: int, warmup: int, total: int, power: float, lr_init: float, lr_end: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1.0 - (step - warmup) / max(1, total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


# lr_scheduler_kwargs each schedule takes: the keyword arguments of its diffusers function (optimization.py
# get_cosine_schedule_with_warmup(num_cycles), get_polynomial_decay_schedule_with_warmup(lr_end)) that no other
# option sets (num_cycles of cosine_with_restarts is lr_scheduler_num_cycles, power is lr_scheduler_power).
SCHEDULER_KWARGS = {"cosine": {"num_cycles": float}, "polynomial": {"lr_end": float}}


def scheduler_kwargs(cfg: Any) -> dict[str, float]:
    """cfg.lr_scheduler_kwargs checked against what the schedule takes (one clear error otherwise)."""
    kw = dict(getattr(cfg, "lr_scheduler_kwargs", None) or {})
    allowed = SCHEDULER_KWARGS.get(cfg.lr_scheduler, {})
    for k, v in kw.items():
        if k not in allowed:
            takes = ", ".join(allowed) or "none"
            raise ValueError(f"[optimizer] lr_scheduler_kwargs: {cfg.lr_scheduler!r} takes no {k!r} (it takes: {takes}; "
                             f"warm-up steps, cycles of cosine_with_restarts and power have their own options)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"[optimizer] lr_scheduler_kwargs.{k} must be a finite number >= 0, got {v!r}")
        kw[k] = allowed[k](v)
    return kw


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with the curves of diffusers get_scheduler (cosine = half wave; polynomial ends at 1e-7), with
    `lr_scheduler_kwargs` as the diffusers functions take them."""
    name, warmup = cfg.lr_scheduler, cfg.lr_warmup_steps
    kw = scheduler_kwargs(cfg)
    if total_steps <= 0:
        raise ValueError(f"build_scheduler: total_steps must be > 0, got {total_steps}")
    if warmup < 0 or warmup > total_steps:
        raise ValueError(f"[optimizer] lr_warmup_steps={warmup} must be in [0, total steps = {total_steps}]")
    fn: Callable[[int], float]
    if name == "constant":
        if warmup:
            raise ValueError("[optimizer] lr_scheduler='constant' ignores lr_warmup_steps; use 'constant_with_warmup'")
        fn = _constant
    elif name == "constant_with_warmup":
        fn = functools.partial(_constant_with_warmup, warmup=warmup)
    elif name == "linear":
        fn = functools.partial(_linear, warmup=warmup, total=total_steps)
    elif name == "cosine":
        fn = functools.partial(_cosine, warmup=warmup, total=total_steps,
                               num_cycles=kw.get("num_cycles", COSINE_HALF_CYCLE))
    elif name == "cosine_with_restarts":
        if cfg.lr_scheduler_num_cycles < 1:
            raise ValueError(f"[optimizer] lr_scheduler_num_cycles={cfg.lr_scheduler_num_cycles} must be >= 1")
        fn = functools.partial(_cosine_with_restarts, warmup=warmup, total=total_steps,
                               num_cycles=cfg.lr_scheduler_num_cycles)
    elif name == "polynomial":
        # diffusers takes lr_init from optimizer.defaults and applies the same multiplier to every group
        lr_init, lr_end = optimizer.defaults["lr"], kw.get("lr_end", POLYNOMIAL_LR_END)
        if not lr_init > lr_end:
            raise ValueError(f"polynomial schedule: learning rate {lr_init} must exceed its end LR {lr_end}")
        fn = functools.partial(_polynomial, warmup=warmup, total=total_steps, power=cfg.lr_scheduler_power,
                               lr_init=lr_init, lr_end=lr_end)
    else:
        raise ValueError(f"[optimizer] unknown lr_scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ---------------------------------------------------------------------------------------------------------------------
# Loss recorder


class LossRecorder:
    """kohya-style: windowed mean over the last `stride` losses and an exponential moving average with factor `gamma`.

    The moving average starts at the first loss (no zero-initialisation bias): ema <- gamma * ema + (1 - gamma) * loss.
    Both are nan before the first add.
    """

    def __init__(self, stride: int = 100, gamma: float = 0.9):
        if stride < 1:
            raise ValueError(f"LossRecorder stride must be >= 1, got {stride}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"LossRecorder gamma must be in [0, 1), got {gamma}")
        self.stride, self.gamma = stride, gamma
        self._window: deque[float] = deque(maxlen=stride)
        self._ema = math.nan
        self.count = 0

    def add(self, loss: float) -> None:
        """Record one step's loss."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"LossRecorder got a non-finite loss {loss}")
        self._window.append(loss)
        self._ema = loss if self.count == 0 else self.gamma * self._ema + (1.0 - self.gamma) * loss
        self.count += 1

    @property
    def windowed_mean(self) -> float:
        """Mean of the last `stride` losses."""
        return sum(self._window) / len(self._window) if self._window else math.nan

    @property
    def moving_average(self) -> float:
        """Exponential moving average of all losses."""
        return self._ema

    def state_dict(self) -> dict:
        return {"stride": self.stride, "gamma": self.gamma, "window": list(self._window), "ema": self._ema,
                "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        """Restore the history; this recorder's own stride and gamma are kept (a changed config wins on resume)."""
        missing = {"window", "ema", "count"} - set(d)
        if missing:
            raise KeyError(f"LossRecorder state is missing {sorted(missing)}")
        self._window = deque((float(x) for x in d["window"]), maxlen=self.stride)
        self._ema, self.count = float(d["ema"]), int(d["count"])
