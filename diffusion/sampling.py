"""Samplers, sigma schedules and classifier-free guidance for SDXL (VE) and SD3 (rectified flow).

Design (k-diffusion style, crowsonkb/k-diffusion `sampling.py`):
- A *denoiser* is `model(x, sigma, **extra) -> x0`: it returns the denoised sample for a noisy `x` at noise
  level `sigma` (a [B] tensor). The schedules below wrap a raw network (eps / v / velocity output) into one.
- Every sampler is a plain function `sample_xxx(model, x, sigmas, extra_args, callback, disable, generator,
  *, form=...)`; `x` enters as the initial noisy latent, `sigmas` is decreasing and ends with 0.
- `form` names how noise enters the latent, written generally as x = alpha * x0 + sigma * eps:
    "ve"   (SDXL, variance-exploding k-diffusion form):  alpha = 1,          sigma in [0, inf)
    "flow" (SD3 rectified flow):                          alpha = 1 - sigma,  sigma in [0, 1]
  Samplers are derived in this (alpha, sigma) form, so one function serves both families. Each schedule
  object carries its `form`, and `sample()` passes it on.
- All sampler state is kept in float32; the step coefficients are python floats (float64).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from tqdm.auto import trange

from diffusion import objectives
from diffusion.objectives import NUM_TRAIN_TIMESTEPS

Denoiser = Callable[..., Tensor]  # model(x, sigma[B], **extra) -> x0
Network = Callable[..., Tensor]  # network(x_in, t[B], **cond) -> eps | v | velocity

VE = "ve"
FLOW = "flow"
FORMS = (VE, FLOW)

# The SDXL noise schedule (DDPM "scaled linear", 1000 steps) is the training objective's: diffusion.objectives.
# Karras et al. 2022 (EDM), eq. 5: rho = 7.
KARRAS_RHO = 7.0
# With a zero-terminal-SNR schedule the last alpha_bar is 0 (sigma = inf); diffusers replaces it by the
# smallest positive fp16 subnormal so that sigma_max stays finite (about 4096).
ZERO_SNR_ALPHA_BAR = 2.0**-24
# SD3 / SD3.5 inference shift of the released models (sd3_infer.py SHIFT).
SD3_SHIFT = 3.0
SIGMA_KINDS = ("normal", "karras")


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown noise form {form!r}; allowed: {', '.join(FORMS)}")


def alpha_of(sigma: float, form: str) -> float:
    """Signal coefficient alpha of x = alpha * x0 + sigma * eps for the given form."""
    return 1.0 if form == VE else 1.0 - sigma


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn from `generator` (on its own device) when given."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)


def _setup(x: Tensor, sigmas: Tensor, extra_args: Mapping[str, Any] | None, disable: bool | None, form: str):
    """Common sampler prologue: python-float sigmas, a [B] ones vector, the step iterator."""
    _check_form(form)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}")
    sig = [float(s) for s in sigmas]
    if any(b > a for a, b in zip(sig, sig[1:])) or sig[-1] < 0:
        raise ValueError(f"sigmas must be non-increasing and non-negative, got {sig}")
    if form == FLOW and sig[0] > 1.0:
        raise ValueError(f"flow sigmas must lie in [0, 1], got sigma_max={sig[0]}")
    s_in = x.new_ones([x.shape[0]])
    return dict(extra_args or {}), sig, s_in, trange(len(sig) - 1, disable=disable)


def _report(callback: Callable | None, x: Tensor, i: int, sigma: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


# --------------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn).

    dx/dsigma = alpha'(sigma) x0 + (x - alpha x0) / sigma, which for alpha = 1 (VE) and alpha = 1 - sigma
    (flow) both reduce to (x - x0) / sigma: the flow velocity is eps - x0 = (x - x0) / sigma.
    """
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    for i in steps:
        denoised = model(x, sig[i] * s_in, **extra)
        _report(callback, x, i, sig[i], denoised)
        d = (x - denoised) / sig[i]
        x = x + d * (sig[i + 1] - sig[i])
    return x


def _ancestral_step(sigma: float, sigma_next: float, eta: float, form: str) -> tuple[float, float, float]:
    """(sigma_down, sigma_up, rescale) of an ancestral step: go to sigma_down, scale, add sigma_up noise.

    VE: k-diffusion `get_ancestral_step` (eta = 1 is the DDPM posterior). Flow: ComfyUI
    `sample_euler_ancestral_RF` - sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta), then the
    latent is rescaled by alpha_next / alpha_down and fresh noise restores total noise sigma_next.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0, 1.0
    if form == VE:
        up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        return math.sqrt(sigma_next**2 - up**2), up, 1.0
    down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
    rescale = (1.0 - sigma_next) / (1.0 - down)
    up = math.sqrt(max(sigma_next**2 - (down * rescale) ** 2, 0.0))
    return down, up, rescale


def _add_ancestral_noise(x: Tensor, up: float, rescale: float, s_noise: float,
                         generator: torch.Generator | None) -> Tensor:
    """The tail of an ancestral step (see `_ancestral_step`): rescale, then fresh noise of scale `up` (none when 0)."""
    if up <= 0:
        return x
    return rescale * x + _randn_like(x, generator) * (s_noise * up)


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler ancestral: a deterministic Euler step down to sigma_down, then fresh noise up to sigma_next."""
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    for i in steps:
        denoised = model(x, sig[i] * s_in, **extra)
        _report(callback, x, i, sig[i], denoised)
        down, up, rescale = _ancestral_step(sig[i], sig[i + 1], eta, form)
        # The Euler step to sigma_down is exact along the DDIM direction in both forms (see sample_ddim).
        x = _add_ancestral_noise(x + (x - denoised) / sig[i] * (down - sig[i]), up, rescale, s_noise, generator)
    return x


@torch.no_grad()
def sample_ddim(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in the (alpha, sigma) form.

    x_next = alpha_next x0 + sqrt(sigma_next^2 - c^2) eps_hat + c z, eps_hat = (x - alpha x0) / sigma,
    c = eta * sigma_next * sqrt(1 - e^{-2h}), h = lambda_next - lambda, lambda = log(alpha / sigma)
    (eq. 16 written with the SNR; eta = 1 is the DDPM posterior). With eta = 0 this equals `sample_euler`
    for both forms: VE gives x0 + sigma_next (x - x0) / sigma, flow gives the same
    (sigma_next / sigma) x + (1 - sigma_next / sigma) x0 - the Euler step is exact along the DDIM path.
    """
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    for i in steps:
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s * s_in, **extra)
        _report(callback, x, i, s, denoised)
        if s_next == 0:
            x = denoised
            continue
        a, a_next = alpha_of(s, form), alpha_of(s_next, form)
        eps = (x - a * denoised) / s
        exp_neg_h = (s_next * a) / (s * a_next)
        c = eta * s_next * math.sqrt(max(1.0 - exp_neg_h**2, 0.0))
        x = a_next * denoised + math.sqrt(max(s_next**2 - c**2, 0.0)) * eps
        if c > 0:
            x = x + c * _randn_like(x, generator)
    return x


@torch.no_grad()
def sample_heun(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1, no churn)."""
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    for i in steps:
        denoised = model(x, sig[i] * s_in, **extra)
        _report(callback, x, i, sig[i], denoised)
        d = (x - denoised) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:  # the derivative is undefined at sigma = 0: the last step is plain Euler
            x = x + d * dt
            continue
        x_2 = x + d * dt
        denoised_2 = model(x_2, sig[i + 1] * s_in, **extra)
        d_2 = (x_2 - denoised_2) / sig[i + 1]
        x = x + (d + d_2) / 2 * dt
    return x


def _exp_neg_h(s: float, s_next: float, form: str) -> tuple[float, float]:
    """(e^{-h}, h) with h = lambda_next - lambda, lambda = log(alpha / sigma); h = inf from alpha = 0."""
    a, a_next = alpha_of(s, form), alpha_of(s_next, form)
    ratio = (s_next * a) / (s * a_next)
    return ratio, (-math.log(ratio) if ratio > 0 else math.inf)


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, lambda = log(alpha / sigma).

    x_next = (sigma_next / sigma) x + alpha_next (1 - e^{-h}) D, with D the multistep combination
    (1 + 1/2r) x0_i - (1/2r) x0_{i-1}, r = h_{i-1} / h_i; first-order on the first and the last step.
    """
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    old_denoised: Tensor | None = None
    h_last = math.inf
    for i in steps:
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s * s_in, **extra)
        _report(callback, x, i, s, denoised)
        if s_next == 0:
            x = denoised
        else:
            exp_neg_h, h = _exp_neg_h(s, s_next, form)
            d = denoised
            if old_denoised is not None:
                half_inv_r = h / (2.0 * h_last)  # 1 / (2r); 0 when the previous step started at alpha = 0
                d = (1.0 + half_inv_r) * denoised - half_inv_r * old_denoised
            x = (s_next / s) * x + alpha_of(s_next, form) * (1.0 - exp_neg_h) * d
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion `sample_dpmpp_2m_sde`, midpoint), (alpha, sigma) form.

    x_next = (sigma_next / sigma) e^{-eta h} x + alpha_next (1 - e^{-(1+eta) h}) x0
             + sigma_next sqrt(1 - e^{-2 eta h}) z  (+ the second-order midpoint correction).
    Noise is i.i.d. Gaussian per step (k-diffusion defaults to a Brownian tree; same distribution).
    """
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    old_denoised: Tensor | None = None
    h_last = math.inf
    for i in steps:
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s * s_in, **extra)
        _report(callback, x, i, s, denoised)
        if s_next == 0:
            x = denoised
        else:
            exp_neg_h, h = _exp_neg_h(s, s_next, form)
            a_next = alpha_of(s_next, form)
            gain = a_next * (1.0 - exp_neg_h ** (1.0 + eta))
            x = (s_next / s) * exp_neg_h**eta * x + gain * denoised
            if old_denoised is not None:
                x = x + 0.5 * gain * (h / h_last) * (denoised - old_denoised)
            if eta > 0:
                x = x + _randn_like(x, generator) * (s_noise * s_next * math.sqrt(max(1.0 - exp_neg_h ** (2 * eta), 0.0)))
            h_last = h
        old_denoised = denoised
    return x


def _lms_coeff(order: int, sig: list[float], i: int, j: int) -> float:
    """Integral from sigma_i to sigma_{i+1} of the Lagrange basis polynomial of node sigma_{i-j} over the nodes
    sigma_i .. sigma_{i-order+1} (k-diffusion `linear_multistep_coeff`). The integrand has degree order - 1 <= 3,
    so 3-point Gauss-Legendre quadrature is exact (k-diffusion / diffusers use scipy's adaptive quad)."""
    nodes = [sig[i - k] for k in range(order)]

    def basis(tau: float) -> float:
        p = 1.0
        for k in range(order):
            if k != j:
                p *= (tau - nodes[k]) / (nodes[j] - nodes[k])
        return p

    a, b = sig[i], sig[i + 1]
    half, mid = (b - a) / 2, (a + b) / 2
    r = math.sqrt(3 / 5)
    return half * (5 / 9 * basis(mid - half * r) + 8 / 9 * basis(mid) + 5 / 9 * basis(mid + half * r))


@torch.no_grad()
def sample_lms(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
    order: int = 4,
) -> Tensor:
    """Linear multistep (k-diffusion `sample_lms`, diffusers LMSDiscreteScheduler, order 4): Adams-Bashforth on
    dx/dsigma = (x - x0) / sigma with the last `order` derivatives, the coefficients integrated exactly."""
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    ds: list[Tensor] = []
    for i in steps:
        denoised = model(x, sig[i] * s_in, **extra)
        _report(callback, x, i, sig[i], denoised)
        ds.append((x - denoised) / sig[i])
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        x = x + sum(_lms_coeff(cur, sig, i, j) * d for j, d in enumerate(reversed(ds)))
    return x


def _log_midpoint(a: float, b: float) -> float:
    """exp of the mean of log a and log b: DPM2's midpoint sigma (k-diffusion `sample_dpm_2`)."""
    return math.exp(0.5 * (math.log(a) + math.log(b)))


@torch.no_grad()
def sample_dpm_2(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
) -> Tensor:
    """DPM-Solver-2 as k-diffusion writes it (`sample_dpm_2`, diffusers KDPM2DiscreteScheduler): a midpoint step in
    log sigma on dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Algorithm 2's second-order step at the log-space
    midpoint); the last step, to sigma = 0, is Euler."""
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    for i in steps:
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s * s_in, **extra)
        _report(callback, x, i, s, denoised)
        d = (x - denoised) / s
        if s_next == 0:
            x = x + d * (s_next - s)
            continue
        s_mid = _log_midpoint(s, s_next)
        x_2 = x + d * (s_mid - s)
        d_2 = (x_2 - model(x_2, s_mid * s_in, **extra)) / s_mid
        x = x + d_2 * (s_next - s)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver-2 (k-diffusion `sample_dpm_2_ancestral`, diffusers KDPM2AncestralDiscreteScheduler):
    the DPM2 midpoint step down to sigma_down, then fresh noise up to sigma_next (see `_ancestral_step`)."""
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    for i in steps:
        s = sig[i]
        denoised = model(x, s * s_in, **extra)
        _report(callback, x, i, s, denoised)
        down, up, rescale = _ancestral_step(s, sig[i + 1], eta, form)
        d = (x - denoised) / s
        if down == 0:
            x = x + d * (down - s)
        else:
            s_mid = _log_midpoint(s, down)
            x_2 = x + d * (s_mid - s)
            d_2 = (x_2 - model(x_2, s_mid * s_in, **extra)) / s_mid
            x = x + d_2 * (down - s)
        x = _add_ancestral_noise(x, up, rescale, s_noise, generator)
    return x


@torch.no_grad()
def sample_dpm_solver_2m(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
) -> Tensor:
    """DPM-Solver-2M, the noise-prediction multistep solver (Lu et al. 2022, DPM-Solver++ paper eq. for
    "dpmsolver"; diffusers DPMSolverMultistepScheduler(algorithm_type="dpmsolver"), midpoint), lambda = log(alpha /
    sigma): x_next = alpha_next x0 + sigma_next eps - 1/2 sigma_next (e^h - 1) (h / h_last) (eps - eps_last), whose
    first part is the first-order step (DDIM); first order on the first step and on a step to sigma = 0."""
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    old_eps: Tensor | None = None
    h_last = math.inf
    for i in steps:
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s * s_in, **extra)
        _report(callback, x, i, s, denoised)
        a, a_next = alpha_of(s, form), alpha_of(s_next, form)
        eps = (x - a * denoised) / s
        if s_next == 0:
            x = denoised
            continue
        _, h = _exp_neg_h(s, s_next, form)
        x = a_next * denoised + s_next * eps
        if old_eps is not None and math.isfinite(h_last):
            coef = a_next * s / a - s_next  # sigma_next (e^h - 1), finite wherever alpha > 0
            x = x - 0.5 * coef * (h / h_last) * (eps - old_eps)
        old_eps, h_last = eps, h
    return x


def singlestep_orders(steps: int) -> list[int]:
    """Orders of DPM-Solver++(2S)'s steps as diffusers' DPMSolverSinglestepScheduler.get_order_list (solver_order 2,
    lower_order_final, final sigma 0): pairs (first order to the intermediate point, second order over the pair);
    the last step (two with an even count) first order."""
    orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    orders[-1] = 1
    return orders


@torch.no_grad()
def sample_dpmpp_2s(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
) -> Tensor:
    """Singlestep DPM-Solver++(2S) as diffusers' DPMSolverSinglestepScheduler runs it (data prediction, midpoint):
    the schedule's sigmas are taken in pairs; the first of a pair is a first-order step to the intermediate
    sigma, the second restarts from the pair's first sample: x_next = (sigma_next / sigma_a) x_a +
    alpha_next (1 - e^{-h}) (D_a + (h / 2 h_0) (D_mid - D_a)), h over the pair, h_0 over its first half."""
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    orders = singlestep_orders(len(sig) - 1)
    x_a, d_a, s_a = x, None, sig[0]
    for i in steps:
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s * s_in, **extra)
        _report(callback, x, i, s, denoised)
        if orders[i] == 1:
            x_a, d_a, s_a = x, denoised, s
            if s_next == 0:
                x = denoised
            else:
                exp_neg_h, _ = _exp_neg_h(s, s_next, form)
                x = (s_next / s) * x + alpha_of(s_next, form) * (1.0 - exp_neg_h) * denoised
            continue
        assert d_a is not None
        exp_neg_h, h = _exp_neg_h(s_a, s_next, form) if s_next > 0 else (0.0, math.inf)
        _, h_0 = _exp_neg_h(s_a, s, form)
        half_inv_r = 0.0 if not math.isfinite(h) or not math.isfinite(h_0) else h / (2.0 * h_0)
        d = d_a + half_inv_r * (denoised - d_a)
        x = (s_next / s_a) * x_a + alpha_of(s_next, form) * (1.0 - exp_neg_h) * d
    return x


# Linear multistep coefficients of PLMS by the number of stored derivatives (Liu et al. 2022, eq. 12; diffusers
# PNDMScheduler.step_plms): Adams-Bashforth of orders 2, 3 and 4 on equal steps.
PLMS_COEFFS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_pndm(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    *,
    form: str = VE,
) -> Tensor:
    """PNDM's pseudo linear multistep sampler (PLMS; Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models")
    as diffusers' PNDMScheduler runs it with skip_prk_steps = true (the Stable Diffusion scheduler configs; crowsonkb's
    PLMS): the transfer from sigma to sigma_next along a derivative d is the DDIM step, x + (sigma_next - sigma) d with
    d = (x - x0) / sigma (eps in VE, the velocity in flow form). The first step is a pseudo improved Euler step (two
    evaluations, derivatives averaged), the next ones Adams-Bashforth of orders 2, 3, then 4 on the stored
    derivatives (`PLMS_COEFFS`), whose first entries are the ones at the start of each step (the first step's
    correction evaluation is not stored). N steps take N + 1 evaluations (N >= 2). For v-prediction networks diffusers
    combines the raw v outputs instead (converted to eps with the current x afterwards); we combine eps, as the paper.
    kohya's `pndm` is PNDMScheduler with its defaults, which start with 3 pseudo Runge-Kutta steps (12 evaluations at
    half-step timesteps the sigma grid does not hold); we start with the pseudo improved Euler step of the SD
    configs instead."""
    extra, sig, s_in, steps = _setup(x, sigmas, extra_args, disable, form)
    history: list[Tensor] = []  # derivatives at the start of each step, newest last
    for i in steps:
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s * s_in, **extra)
        _report(callback, x, i, s, denoised)
        d = (x - denoised) / s
        history = [*history[-3:], d]
        if len(history) == 1 and len(sig) > 2 and s_next > 0:  # pseudo improved Euler: a second evaluation
            x_2 = x + d * (s_next - s)
            d_2 = (x_2 - model(x_2, s_next * s_in, **extra)) / s_next
            x = x + (d + d_2) / 2 * (s_next - s)
            continue
        coeffs = PLMS_COEFFS.get(len(history), (1.0,))
        d_plms = sum(c * h for c, h in zip(coeffs, reversed(history)))
        x = x + d_plms * (s_next - s)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "ddim": sample_ddim,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "lms": sample_lms,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "dpm_solver_2m": sample_dpm_solver_2m,
    "dpmpp_2s": sample_dpmpp_2s,
    "pndm": sample_pndm,
}

# kohya sd-scripts (--sample_sampler), k-diffusion ("k_*") and A1111 display names -> canonical names.
# Lookup is case-insensitive with spaces and hyphens read as "_".
SAMPLER_ALIASES: dict[str, str] = {
    "k_euler": "euler",
    "euler_a": "euler_ancestral",
    "k_euler_a": "euler_ancestral",
    "k_euler_ancestral": "euler_ancestral",
    "k_heun": "heun",
    "dpm++2m": "dpmpp_2m",
    "dpm++_2m": "dpmpp_2m",
    "dpmpp2m": "dpmpp_2m",
    "k_dpmpp_2m": "dpmpp_2m",
    "dpmsolver++": "dpmpp_2m",
    "dpm++2m_sde": "dpmpp_2m_sde",
    "dpm++_2m_sde": "dpmpp_2m_sde",
    "dpmpp2m_sde": "dpmpp_2m_sde",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "k_lms": "lms",  # kohya: LMSDiscreteScheduler
    "k_dpm_2": "dpm_2",  # kohya: KDPM2DiscreteScheduler
    "k_dpm_2_a": "dpm_2_ancestral",  # kohya: KDPM2AncestralDiscreteScheduler
    "dpmsolver": "dpm_solver_2m",  # kohya: DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    "dpmsingle": "dpmpp_2s",  # kohya: DPMSolverSinglestepScheduler (its default algorithm: dpmsolver++, order 2)
    "dpm2": "dpm_2",
    "dpm2_a": "dpm_2_ancestral",
}

# A1111 display names of the canonical samplers (for the PNG "parameters" text).
A1111_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "ddim": "DDIM",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "lms": "LMS",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "dpm_solver_2m": "DPM-Solver 2M",
    "dpmpp_2s": "DPM++ 2S",
    "pndm": "PLMS",
}


def canonical_sampler_name(name: str) -> str:
    """Map a sampler name or alias (kohya / k-diffusion / A1111) to its canonical SAMPLERS key."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(
            f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)} "
            f"(aliases: {', '.join(SAMPLER_ALIASES)})"
        )
    return key


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function for a name or alias; unknown names raise ValueError listing the valid ones."""
    return SAMPLERS[canonical_sampler_name(name)]


# --------------------------------------------------------------------------------------------------------
# Schedules and denoisers
# --------------------------------------------------------------------------------------------------------


def _per_sample(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a float32 [B] tensor on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against x."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. 2022 eq. 5: `steps` sigmas from sigma_max to sigma_min, then a trailing 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).float()


class DiscreteSchedule:
    """SDXL's discrete DDPM schedule seen as k-diffusion VE sigmas, with eps or v networks."""

    form = VE

    def __init__(self, prediction: str = "eps", zero_terminal_snr: bool = False) -> None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.prediction = prediction
        self.zero_terminal_snr = zero_terminal_snr
        # float64 as sgm's make_beta_schedule; stored as float32 like the released buffers.
        alphas_cumprod = objectives.scaled_linear_alphas_cumprod()
        if zero_terminal_snr:
            alphas_cumprod = objectives.rescale_zero_terminal_snr(alphas_cumprod)
            alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR
        self.alphas_cumprod: Tensor = alphas_cumprod.float()
        self.sigmas_train: Tensor = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()  # [1000], increasing
        self.log_sigmas: Tensor = self.sigmas_train.double().log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas_train[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas_train[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep of a sigma by interpolation in log-sigma (k-diffusion DiscreteSchedule)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().clamp_min(1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        return (low + w).reshape(sigma.shape).float()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma of a continuous timestep by interpolation in log-sigma (k-diffusion DiscreteSchedule)."""
        t = t.double().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        log_sigmas = self.log_sigmas.to(t.device)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().float()

    def sigmas(self, steps: int, kind: str = "normal") -> Tensor:
        """Sampling sigmas (steps + 1 values, the last 0).

        "normal": timesteps evenly spaced from 999 to 0 (k-diffusion get_sigmas, A1111 "normal", diffusers
        timestep_spacing="linspace" - diffusers interpolates sigma linearly between integer timesteps, we
        in log-sigma as k-diffusion, so they agree exactly where the timesteps are integers);
        "karras": rho = 7 between the trained sigma_min and sigma_max.
        """
        _check_steps(steps)
        if kind == "normal":
            t = torch.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, steps, dtype=torch.float64)
            return torch.cat([self.t_to_sigma(t), torch.zeros(1)])
        if kind == "karras":
            return karras_sigmas(self.sigma_min, self.sigma_max, steps)
        raise ValueError(f"unknown sigma schedule {kind!r}; allowed: {', '.join(SIGMA_KINDS)}")

    def denoiser(self, network: Network) -> Denoiser:
        """Wrap `network(x_in, t, **cond) -> eps | v` into `model(x, sigma, **cond) -> x0`.

        k-diffusion scalings with sigma_data = 1: c_in = 1 / sqrt(sigma^2 + 1); eps: x0 = x - sigma eps;
        v: x0 = c_skip x + c_out v, c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1).
        """

        def model(x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
            sigma = _per_sample(sigma, x)  # (B,)
            s = _bcast(sigma, x)  # (B, 1, 1, 1)
            c_in = (s**2 + 1).rsqrt()
            out = network(x * c_in, self.sigma_to_t(sigma), **cond).float()  # (B, C, H, W)
            if self.prediction == "eps":
                return x - s * out
            return x / (s**2 + 1) - out * s * c_in

        return model

    def initial_noise_scale(self, sigmas: Tensor) -> float:
        """Scale of unit noise at the first sigma: sigmas[0] (k-diffusion; diffusers' "linspace" init_noise_sigma)."""
        return float(sigmas[0])


class FlowSchedule:
    """SD3 rectified-flow schedule: x = (1 - sigma) x0 + sigma eps, network predicts the velocity eps - x0."""

    form = FLOW

    def __init__(self, shift: float = SD3_SHIFT) -> None:
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        self.shift = float(shift)

    def shift_sigma(self, sigma: Tensor) -> Tensor:
        """SD3 time shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
        return objectives.shift_sigmas(sigma, self.shift)

    def sigmas(self, steps: int, kind: str = "normal") -> Tensor:
        """Sampling sigmas (steps + 1 values, the last 0).

        "normal" as sd3_infer.py get_sigmas (and diffusers FlowMatchEulerDiscreteScheduler): unshifted
        sigmas evenly spaced from 1 down to the *shifted* sigma of timestep 1 (the trained sigma_min,
        shift(1/1000)), then shifted. "karras": rho = 7 between the first and last of those.
        """
        _check_steps(steps)
        sigma_min = float(self.shift_sigma(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64)))
        sig = self.shift_sigma(torch.linspace(1.0, sigma_min, steps, dtype=torch.float64))
        if kind == "normal":
            return torch.cat([sig, sig.new_zeros(1)]).float()
        if kind == "karras":
            return karras_sigmas(float(sig[-1]), float(sig[0]), steps)
        raise ValueError(f"unknown sigma schedule {kind!r}; allowed: {', '.join(SIGMA_KINDS)}")

    def denoiser(self, network: Network) -> Denoiser:
        """Wrap `network(x, t = sigma * 1000, **cond) -> velocity` into `model(x, sigma, **cond) -> x0 = x - sigma v`."""

        def model(x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
            sigma = _per_sample(sigma, x)  # (B,)
            v = network(x, sigma * NUM_TRAIN_TIMESTEPS, **cond).float()  # (B, C, H, W)
            return x - _bcast(sigma, x) * v

        return model

    def initial_noise_scale(self, sigmas: Tensor) -> float:
        """Scale of unit noise at the first sigma (1 for a full denoise: x = eps at sigma = 1)."""
        return float(sigmas[0])


Schedule = DiscreteSchedule | FlowSchedule


# --------------------------------------------------------------------------------------------------------
# Classifier-free guidance and the entry point
# --------------------------------------------------------------------------------------------------------


def _cat_cond(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """Concatenate cond and uncond keyword tensors on the batch axis (cond first)."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out: dict[str, Any] = {}
    for k in cond:
        c, u = cond[k], uncond[k]
        if isinstance(c, Tensor) and isinstance(u, Tensor):
            if c.shape[1:] != u.shape[1:]:
                raise ValueError(
                    f"cond[{k!r}] {tuple(c.shape)} and uncond[{k!r}] {tuple(u.shape)} differ beyond the batch "
                    "axis; pad them to the same length to batch guidance in one forward"
                )
            out[k] = torch.cat([c, u])
        elif isinstance(c, Tensor) or isinstance(u, Tensor) or c != u:
            raise ValueError(f"cond[{k!r}] and uncond[{k!r}] must both be tensors or be equal")
        else:
            out[k] = c
    return out


def cfg_denoiser(
    model: Denoiser,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    scale: float,
    rescale: float = 0.0,
    *,
    form: str = VE,
) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser, cond and uncond in one forward.

    x0 = x0_u + scale (x0_c - x0_u) (guidance on x0 equals guidance on eps / v / velocity: all are affine
    in x0 for a fixed x). `rescale` = phi of Lin et al. 2023 (Sec. 3.4), applied as in their v-prediction
    setting (and ComfyUI's RescaleCFG): v_cfg is scaled by std(v_c) / std(v_cfg) per sample, mixed with
    weight phi, where v = alpha_n eps - sigma_n x0 with alpha_n, sigma_n = (alpha, sigma) / sqrt(alpha^2 + sigma^2).
    """
    _check_form(form)
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    cond = dict(cond)
    if scale == 1.0:  # guidance (and its rescale, a no-op when x0 = x0_c) reduces to the cond branch
        return lambda x, sigma, **extra: model(x, sigma, **cond, **extra)
    if uncond is None:
        raise ValueError(f"cfg scale {scale} != 1 needs an unconditional input (uncond is None)")
    both = _cat_cond(cond, uncond)

    def guided(x: Tensor, sigma: Tensor | float, **extra: Any) -> Tensor:
        sigma = _per_sample(sigma, x)  # (B,)
        x0_c, x0_u = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **extra).chunk(2)
        x0 = x0_u + scale * (x0_c - x0_u)
        if rescale == 0.0:
            return x0
        s = _bcast(sigma, x).double()
        a = 1.0 - s if form == FLOW else torch.ones_like(s)
        norm = (a**2 + s**2).sqrt()
        a_n, s_n = a / norm, s / norm

        def to_v(x0_: Tensor) -> Tensor:
            eps = (x - a * x0_) / s
            return a_n * eps - s_n * x0_

        v_c, v_cfg = to_v(x0_c), to_v(x0)
        dims = list(range(1, x.ndim))
        factor = v_c.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)
        v = v_cfg * (rescale * factor + (1.0 - rescale))
        # Invert v: with x_n = x / norm = a_n x0 + s_n eps, x0 = a_n x_n - s_n v.
        return (a_n * x / norm - s_n * v).to(x.dtype)

    return guided


@torch.no_grad()
def sample(
    schedule: Schedule,
    network: Network,
    noise: Tensor,
    steps: int,
    sampler: str = "euler",
    sigma_kind: str = "normal",
    cond: dict | None = None,
    uncond: dict | None = None,
    cfg_scale: float = 1.0,
    rescale: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample clean latents (in the model's latent space, float32) from unit Gaussian `noise`.

    `network(x_in, t, **cond)` is the raw model (eps / v for a DiscreteSchedule, velocity for a FlowSchedule);
    run it under autocast or in float32 - the sampler state is float32. `generator` drives the noise of
    ancestral / SDE samplers.
    """
    fn = get_sampler(sampler)
    sigmas = schedule.sigmas(steps, sigma_kind).to(noise.device)
    model = cfg_denoiser(schedule.denoiser(network), cond or {}, uncond, cfg_scale, rescale, form=schedule.form)
    x = noise.float() * schedule.initial_noise_scale(sigmas)
    return fn(model, x, sigmas, None, callback, not progress, generator, form=schedule.form)
