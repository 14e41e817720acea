"""Diffusion training objectives: SDXL DDPM (epsilon / v) and SD3 rectified flow.

An objective owns the noise schedule, the noising of clean latents, the regression target and the loss weighting,
so the training loop is the same for every model family:

    batch = objective.noise(x0, generator)             # NoisedBatch(x_t, t, target, timesteps)
    pred = model(batch.x_t, batch.t, ...)
    loss = objective.loss(pred, batch, weight).mean()

Options follow kohya-ss sd-scripts (`library/train_util.py` get_noise_noisy_latents_and_timesteps,
get_huber_threshold_if_needed, conditional_loss; `library/custom_train_functions.py`) and diffusers
(`training_utils.compute_density_for_timestep_sampling`, `compute_loss_weighting_for_sd3`, train_dreambooth_sd3).
All randomness comes from the given `torch.Generator` (or the global RNG when it is None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from diffusion.masks import masked_elementwise

# SDXL noise schedule (CONVENTIONS.md; sgm `sd_xl_base.yaml`): DDPM, 1000 steps, "scaled linear" betas.
BETA_START = 0.00085
BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000
# SD3 network timestep = sigma * 1000 (sd3.5 `ModelSamplingDiscreteFlow.timestep`).
FLOW_TIMESTEP_SCALE = 1000.0
# Smallest flow sigma before the shift: the SD3 reference grid is t / 1000 for t in 1..1000. Keeps sigma > 0 so the
# sigma_sqrt weighting (sigma ** -2) stays finite.
FLOW_SIGMA_MIN = 1.0 / 1000.0
# kohya get_snr_scale / apply_debiased_estimation cap the SNR at 1000 (SNR at t=0 is ~1175).
SNR_CAP = 1000.0
# Valid mode_scale range for the "mode" sampler (SD3 paper, eq. 20: the map is monotonic for -1 <= s <= 2/(pi-2)).
MODE_SCALE_MIN, MODE_SCALE_MAX = -1.0, 2.0 / (math.pi - 2.0)

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
DDPM_SAMPLERS = ("uniform", "logit_normal")
FLOW_SAMPLERS = ("uniform", "logit_normal", "mode", "cosmap")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
OBJECTIVES = ("ddpm", "flow")  # a model family's record names its objective (models/family.py Family.objective)


@dataclass
class NoisedBatch:
    """Network inputs and regression target for one training step."""

    x_t: Tensor  # network input latents
    t: Tensor  # network timestep input [B] (SDXL: integer-valued float 0..999; SD3: sigma * 1000)
    target: Tensor
    timesteps: Tensor  # SDXL: int64 timesteps; SD3: sigmas in (0, 1]; used for loss weighting


class Objective(Protocol):
    """What train.py uses: noise a clean batch, then score a prediction per sample. Validation
    (training/validation.py) noises at given timesteps: the sampler's quantiles `timesteps_at(u)`, then `noise_at`."""

    def noise(self, x0: Tensor, generator: torch.Generator | None = None) -> NoisedBatch: ...

    def noise_at(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> NoisedBatch: ...

    def timesteps_at(self, u: Tensor) -> Tensor: ...

    def loss(self, pred: Tensor, batch: NoisedBatch, weight: Tensor | None = None,
             mask: Tensor | None = None) -> Tensor: ...


# ---------------------------------------------------------------------------------------------------------------------
# Schedules and formulas (module-level so tests can check them in isolation)


def scaled_linear_alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """alphas_cumprod of the SDXL schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), T) ** 2."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1.

    Shifts sqrt(alphas_cumprod) so the last value is 0 and rescales so the first is unchanged. Working on
    sqrt(alphas_cumprod) directly equals the paper's round trip through betas (cumprod of the rebuilt alphas).
    """
    sqrt_ab = alphas_cumprod.double().sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    return sqrt_ab**2


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3 timestep shift: s' = shift * s / (1 + (shift - 1) * s) (sd3.5 `time_snr_shift`)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_loss_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    """Per-sample flow loss weight (diffusers `compute_loss_weighting_for_sd3`)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    if scheme == "none":
        return torch.ones_like(sigmas)
    raise ValueError(f"flow_loss_weighting={scheme!r} is not one of {FLOW_WEIGHTINGS}")


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: str, huber_c: Tensor | None = None) -> Tensor:
    """kohya `conditional_loss` with reduction="none"; huber_c is per sample [B] (already scheduled)."""
    if loss_type == "l2":
        return (pred - target) ** 2
    if huber_c is None:
        raise ValueError(f"loss_type={loss_type!r} needs a per-sample huber_c")
    c = huber_c.view(-1, *([1] * (pred.ndim - 1)))
    d2 = (pred - target) ** 2
    # sqrt(d^2 + c^2) - c, written without the cancellation that loses small errors in fp32
    root = d2 / (torch.sqrt(d2 + c**2) + c)
    if loss_type == "huber":  # pseudo-Huber: ~ (p - t)^2 for small errors, ~ 2c |p - t| for large
        return 2.0 * c * root
    if loss_type == "smooth_l1":  # ~ (p - t)^2 / c for small errors, ~ 2 |p - t| for large
        return 2.0 * root
    raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")


def scheduled_huber_c(schedule: str, huber_c: float, t: Tensor, noise_to_signal: Tensor) -> Tensor:
    """kohya get_huber_threshold_if_needed (huber_scale 1): per-sample c from timesteps t in [0, 1000].

    noise_to_signal is kohya's `sigmas = sqrt((1 - a) / a)` of the DDPM schedule (for flow: sigma / (1 - sigma)).
    """
    if schedule == "constant":
        return torch.full_like(t, huber_c, dtype=torch.float32)
    if schedule == "exponential":  # c at t = 1000, 1 at t = 0
        alpha = -math.log(huber_c) / NUM_TRAIN_TIMESTEPS
        return torch.exp(-alpha * t.float())
    if schedule == "snr":  # 1 at the clean end, c at pure noise
        return (1.0 - huber_c) / (1.0 + noise_to_signal.float()) ** 2 + huber_c
    raise ValueError(f"huber_schedule={schedule!r} is not one of {HUBER_SCHEDULES}")


def _broadcast(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] matching like.ndim."""
    return v.view(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


def _gen_device(x: Tensor, generator: torch.Generator | None) -> torch.device:
    """Draw on the generator's device (a CPU generator cannot fill CUDA tensors), else on x's device."""
    return generator.device if generator is not None else x.device


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    out = torch.randn(shape, generator=generator, device=_gen_device(like, generator), dtype=torch.float32)
    return out.to(device=like.device, dtype=like.dtype)


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    out = torch.rand(shape, generator=generator, device=_gen_device(like, generator), dtype=torch.float32)
    return out.to(like.device)


def pyramid_noise_like(
    noise: Tensor, iterations: int, discount: float, generator: torch.Generator | None = None
) -> Tensor:
    """Multi-resolution noise (Whitaker 2023, kohya `pyramid_noise_like`): add upsampled coarser noise, renormalise.

    Level i is drawn at (H, W) / r**i with r ~ U(2, 4) and weighted discount**i; level 0 is full resolution.
    """
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(_rand((1,), noise, generator).item()) * 2.0 + 2.0  # random scale factor instead of always 2x
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = _randn((b, c, hn, wn), noise, generator)
        out = out + torch.nn.functional.interpolate(level, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break  # coarsest possible level reached
    return out / out.std()  # back to roughly unit variance


# ---------------------------------------------------------------------------------------------------------------------
# Shared base: config validation and the noise recipe (offset / multires / adaptive)


def _get(cfg: Any, name: str) -> Any:
    if not hasattr(cfg, name):
        raise AttributeError(
            f"loss config {type(cfg).__name__} has no field {name!r} (expected core.config.LossConfig)"
        )
    return getattr(cfg, name)


class _ObjectiveBase:
    """Validation and the noise recipe shared by both families."""

    family: str = ""

    def __init__(self, loss_cfg: Any) -> None:
        self.cfg = loss_cfg
        self._validate_common()

    def _validate_common(self) -> None:
        c = self.cfg
        if _get(c, "loss_type") not in LOSS_TYPES:
            raise ValueError(f"[loss] loss_type={c.loss_type!r} is not supported; allowed: {', '.join(LOSS_TYPES)}")
        if c.loss_type != "l2":
            if _get(c, "huber_schedule") not in HUBER_SCHEDULES:
                raise ValueError(
                    f"[loss] huber_schedule={c.huber_schedule!r} is not supported; "
                    f"allowed: {', '.join(HUBER_SCHEDULES)}"
                )
            if not _get(c, "huber_c") > 0.0:
                raise ValueError(f"[loss] huber_c={c.huber_c} must be > 0")
        nonneg = ("noise_offset", "ip_noise_gamma", "min_snr_gamma", "v_pred_like_loss", "multires_noise_iterations")
        for name in nonneg:
            if _get(c, name) < 0:
                raise ValueError(f"[loss] {name}={getattr(c, name)} must be >= 0")
        if _get(c, "multires_noise_discount") < 0:
            raise ValueError(f"[loss] multires_noise_discount={c.multires_noise_discount} must be >= 0")
        if c.noise_offset > 0 and c.multires_noise_iterations > 0:
            raise ValueError("[loss] noise_offset and multires_noise_iterations cannot be used together (as in kohya)")
        if _get(c, "adaptive_noise_scale") != 0 and c.noise_offset == 0:
            raise ValueError("[loss] adaptive_noise_scale only modifies noise_offset; set noise_offset > 0 as well")
        if _get(c, "noise_offset_random_strength") and c.noise_offset == 0:
            raise ValueError("[loss] noise_offset_random_strength needs noise_offset > 0")
        if _get(c, "ip_noise_gamma_random_strength") and c.ip_noise_gamma == 0:
            raise ValueError("[loss] ip_noise_gamma_random_strength needs ip_noise_gamma > 0")
        lo, hi = _get(c, "min_timestep"), _get(c, "max_timestep")
        if not 0 <= lo < hi <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"[loss] need 0 <= min_timestep < max_timestep <= {NUM_TRAIN_TIMESTEPS}, got {lo} and {hi}"
            )
        if _get(c, "logit_std") <= 0:
            raise ValueError(f"[loss] logit_std={c.logit_std} must be > 0")
        _get(c, "logit_mean")

    def _base_noise(self, x0: Tensor, generator: torch.Generator | None) -> Tensor:
        """Gaussian noise plus kohya's noise_offset (+ random strength, adaptive) or multires noise."""
        c = self.cfg
        noise = _randn(tuple(x0.shape), x0, generator)
        if c.noise_offset > 0:
            # Crosslabs "diffusion with offset noise": a per-(sample, channel) constant lets the model shift means.
            offset: float | Tensor = c.noise_offset
            if c.noise_offset_random_strength:
                offset = _rand((1,), x0, generator).to(x0.dtype) * c.noise_offset
            if c.adaptive_noise_scale != 0:
                latent_mean = x0.mean(dim=tuple(range(2, x0.ndim)), keepdim=True).abs()
                offset = torch.clamp(offset + c.adaptive_noise_scale * latent_mean, min=0.0)
            shape = tuple(x0.shape[:2]) + (1,) * (x0.ndim - 2)
            noise = noise + offset * _randn(shape, x0, generator)
        if c.multires_noise_iterations > 0:
            noise = pyramid_noise_like(noise, c.multires_noise_iterations, c.multires_noise_discount, generator)
        return noise

    def _input_perturbation(self, noise: Tensor, generator: torch.Generator | None) -> Tensor:
        """Ning et al. 2023 input perturbation: the noise used for x_t gets extra gamma * xi; the target does not."""
        c = self.cfg
        if c.ip_noise_gamma <= 0:
            return noise
        strength: float | Tensor = c.ip_noise_gamma
        if c.ip_noise_gamma_random_strength:
            strength = _rand((1,), noise, generator).to(noise.dtype) * c.ip_noise_gamma
        return noise + strength * _randn(tuple(noise.shape), noise, generator)

    def _per_sample(self, pred: Tensor, target: Tensor, huber_c: Tensor | None, weight: Tensor | None,
                    mask: Tensor | None = None) -> Tensor:
        """Elementwise loss (times the loss mask, [B, 1, h, w] at latent resolution, with loss.masked_loss), mean
        over all but the batch axis, times the per-sample weight. -> [B]"""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        loss = elementwise_loss(pred.float(), target.float(), self.cfg.loss_type, huber_c)
        if mask is not None and getattr(self.cfg, "masked_loss", False):
            loss = masked_elementwise(loss, mask, self.cfg.unmasked_weight, self.cfg.normalize_masked_area_loss)
        loss = loss.mean(dim=tuple(range(1, loss.ndim)))  # [B]
        if weight is not None:
            if weight.shape != loss.shape:
                raise ValueError(f"loss weight shape {tuple(weight.shape)} != batch shape {tuple(loss.shape)}")
            loss = loss * weight.to(loss)
        return loss


# ---------------------------------------------------------------------------------------------------------------------
# SDXL: DDPM with epsilon or v prediction


class DDPMObjective(_ObjectiveBase):
    """SDXL objective: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; target eps or v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""

    family = "sdxl"

    def __init__(self, loss_cfg: Any, v_parameterization: bool = False, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        super().__init__(loss_cfg)
        c = loss_cfg
        self.v_parameterization = v_parameterization
        self.num_train_timesteps = num_train_timesteps
        if c.max_timestep > num_train_timesteps:
            raise ValueError(f"[loss] max_timestep={c.max_timestep} exceeds num_train_timesteps={num_train_timesteps}")
        if c.timestep_sampler_type not in DDPM_SAMPLERS:
            raise ValueError(
                f"[loss] timestep_sampler_type={c.timestep_sampler_type!r} is not available for SDXL; allowed: "
                f"{', '.join(DDPM_SAMPLERS)} (mode and cosmap are rectified-flow samplers for SD3)"
            )
        if _get(c, "flow_loss_weighting") != "none":
            raise ValueError(
                f"[loss] flow_loss_weighting={c.flow_loss_weighting!r} is for SD3 only; use 'none' for SDXL"
            )
        if _get(c, "flow_precondition_outputs"):
            raise ValueError("[loss] flow_precondition_outputs is for SD3 only; set it to false for SDXL")
        for name in ("scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss", "zero_terminal_snr"):
            _get(c, name)
        if c.zero_terminal_snr and c.max_timestep == num_train_timesteps:
            # SNR is exactly 0 at the last timestep; these weightings divide by it (kohya would produce inf).
            for name in ("debiased_estimation_loss", "v_pred_like_loss"):
                if getattr(c, name):
                    raise ValueError(
                        f"[loss] {name} divides by the SNR, which zero_terminal_snr makes 0 at "
                        f"t={num_train_timesteps - 1}; set max_timestep <= {num_train_timesteps - 1} "
                        "or disable one of them"
                    )

        alphas_cumprod = scaled_linear_alphas_cumprod(num_train_timesteps)
        if c.zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        self.alphas_cumprod: Tensor = alphas_cumprod.float()
        self.snr: Tensor = (alphas_cumprod / (1.0 - alphas_cumprod)).float()  # alpha^2 / sigma^2 per timestep
        # kohya's huber "sigmas": noise-to-signal ratio sqrt((1 - a) / a)
        self._noise_to_signal: Tensor = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt().float()
        self._on_device: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    def _table(self, name: str, device: torch.device) -> Tensor:
        """A schedule table (alphas_cumprod, snr, _noise_to_signal) on `device`, copied there once: indexing the host
        table with device timesteps (or copying it per micro-batch) would stall the GPU at every step."""
        src = getattr(self, name)
        key = (name, str(device))
        hit = self._on_device.get(key)
        if hit is None or hit[0] is not src:  # a table replaced since: copy again
            hit = self._on_device[key] = (src, src.to(device))
        return hit[1]

    def sample_timesteps(self, batch_size: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Integer timesteps in [min_timestep, max_timestep): uniform, or logit-normal over the range (t / 1000)."""
        c = self.cfg
        lo, hi = c.min_timestep, c.max_timestep
        dev = _gen_device(like, generator)
        if c.timestep_sampler_type == "uniform":
            t = torch.randint(lo, hi, (batch_size,), generator=generator, device=dev)
        else:  # logit_normal: sigmoid(N(mean, std)) in (0, 1) spread over [lo, hi)
            z = torch.randn((batch_size,), generator=generator, device=dev) * c.logit_std + c.logit_mean
            t = (lo + torch.sigmoid(z) * (hi - lo)).long().clamp(lo, hi - 1)
        return t.to(like.device)

    def timesteps_at(self, u: Tensor) -> Tensor:
        """The timesteps at quantiles u in (0, 1) of the training sampler (validation's fixed, stratified set)."""
        c = self.cfg
        lo, hi = c.min_timestep, c.max_timestep
        if c.timestep_sampler_type == "logit_normal":
            u = torch.sigmoid(math.sqrt(2.0) * torch.erfinv(2.0 * u.double() - 1.0) * c.logit_std + c.logit_mean)
        return (lo + u.double() * (hi - lo)).long().clamp(lo, hi - 1)

    def noise(self, x0: Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        """Sample timesteps and noise and build x_t and the target."""
        b = x0.shape[0]
        noise = self._base_noise(x0, generator)  # (B, C, H, W)
        t = self.sample_timesteps(b, x0, generator)  # (B,)
        return self.noise_at(x0, noise, t, self._input_perturbation(noise, generator))

    def noise_at(self, x0: Tensor, noise: Tensor, timesteps: Tensor, noise_in: Tensor | None = None) -> NoisedBatch:
        """x_t and the target at integer `timesteps` [B] for this noise (`noise_in`: the perturbed noise x_t uses)."""
        t = timesteps.to(x0.device)
        a = _broadcast(self._table("alphas_cumprod", x0.device)[t], x0)  # (B, 1, 1, 1)
        sqrt_a, sqrt_1ma = a.sqrt(), (1.0 - a).sqrt()
        x_t = sqrt_a * x0 + sqrt_1ma * (noise if noise_in is None else noise_in)
        target = sqrt_a * noise - sqrt_1ma * x0 if self.v_parameterization else noise
        return NoisedBatch(x_t=x_t, t=t.float(), target=target, timesteps=t)

    def loss(self, pred: Tensor, batch: NoisedBatch, weight: Tensor | None = None,
             mask: Tensor | None = None) -> Tensor:
        """Per-sample loss [B] with kohya's order: mean, weight, min-SNR, v-scale, v-like, debiased."""
        c = self.cfg
        t = batch.timesteps.long().to(pred.device)  # the tables are indexed on the device: no read back
        huber_c = None
        if c.loss_type != "l2":
            huber_c = scheduled_huber_c(c.huber_schedule, c.huber_c, t, self._table("_noise_to_signal", t.device)[t])
        loss = self._per_sample(pred, batch.target, huber_c, weight, mask)
        snr = self._table("snr", loss.device)[t]  # (B,)
        if c.min_snr_gamma > 0:
            # Hang et al. 2023: eps weight min(SNR, g) / SNR, v weight min(SNR, g) / (SNR + 1).
            clipped = torch.clamp(snr, max=c.min_snr_gamma)
            if self.v_parameterization:
                w = clipped / (snr + 1.0)
            else:  # SNR = 0 (zero terminal SNR) -> the limit of min(SNR, g) / SNR is 1
                w = torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
            loss = loss * w
        capped = torch.clamp(snr, max=SNR_CAP)
        scale = capped / (capped + 1.0)  # kohya get_snr_scale: v-loss = eps-loss * SNR / (SNR + 1)
        if c.scale_v_pred_loss_like_noise_pred:
            loss = loss * scale
        if c.v_pred_like_loss > 0:
            loss = loss + loss / scale * c.v_pred_like_loss
        if c.debiased_estimation_loss:  # Yu et al. 2024: weight 1 / sqrt(SNR)
            loss = loss / capped.sqrt()
        return loss


# ---------------------------------------------------------------------------------------------------------------------
# SD3: rectified flow


class FlowObjective(_ObjectiveBase):
    """SD3 objective: x_t = (1 - s) x0 + s eps, target eps - x0, network timestep s * 1000 (CONVENTIONS.md)."""

    family = "sd3"

    def __init__(self, loss_cfg: Any):
        super().__init__(loss_cfg)
        c = loss_cfg
        if c.timestep_sampler_type not in FLOW_SAMPLERS:
            raise ValueError(
                f"[loss] timestep_sampler_type={c.timestep_sampler_type!r} is not supported for SD3; allowed: "
                f"{', '.join(FLOW_SAMPLERS)}"
            )
        if _get(c, "flow_loss_weighting") not in FLOW_WEIGHTINGS:
            raise ValueError(
                f"[loss] flow_loss_weighting={c.flow_loss_weighting!r} is not supported; "
                f"allowed: {', '.join(FLOW_WEIGHTINGS)}"
            )
        if _get(c, "discrete_flow_shift") <= 0:
            raise ValueError(f"[loss] discrete_flow_shift={c.discrete_flow_shift} must be > 0")
        if c.timestep_sampler_type == "mode" and not MODE_SCALE_MIN <= _get(c, "mode_scale") <= MODE_SCALE_MAX:
            raise ValueError(
                f"[loss] mode_scale={c.mode_scale} must be in [{MODE_SCALE_MIN}, {MODE_SCALE_MAX:.4f}] "
                "(SD3 paper: outside it the mode map is not monotonic)"
            )
        ddpm_only = {
            "min_snr_gamma": c.min_snr_gamma > 0,
            "scale_v_pred_loss_like_noise_pred": bool(_get(c, "scale_v_pred_loss_like_noise_pred")),
            "v_pred_like_loss": c.v_pred_like_loss > 0,
            "debiased_estimation_loss": bool(_get(c, "debiased_estimation_loss")),
            "zero_terminal_snr": bool(_get(c, "zero_terminal_snr")),
        }
        bad = [k for k, on in ddpm_only.items() if on]
        if bad:
            raise ValueError(
                f"[loss] {', '.join(bad)} are DDPM (SDXL) options and do not apply to SD3 rectified flow; "
                "use flow_loss_weighting / timestep_sampler_type instead"
            )
        _get(c, "flow_precondition_outputs")

    def sample_sigmas(self, batch_size: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sigmas in (0, 1]: density sample u, shift, then map linearly into [min_timestep, max_timestep] / 1000.

        Continuous, as in the SD3 paper (diffusers' train_dreambooth_sd3 snaps u to the 1000-step scheduler grid).
        """
        c = self.cfg
        dev = _gen_device(like, generator)
        kind = c.timestep_sampler_type
        if kind == "logit_normal":  # SD3 paper: sigmoid of N(m, s)
            u = torch.sigmoid(torch.randn((batch_size,), generator=generator, device=dev) * c.logit_std + c.logit_mean)
        else:
            u = torch.rand((batch_size,), generator=generator, device=dev)
            if kind == "mode":  # SD3 paper eq. 20 (diffusers compute_density_for_timestep_sampling "mode")
                u = 1.0 - u - c.mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
            elif kind == "cosmap":  # SD3 paper: t = 1 - 1 / (tan(pi u / 2) + 1), density 2 / (pi (1 - 2t + 2t^2))
                u = 1.0 - 1.0 / (torch.tan(math.pi * u / 2.0) + 1.0)
        return self._shift_into_range(u).to(like.device)

    def _shift_into_range(self, u: Tensor) -> Tensor:
        """Sampler output u in (0, 1] -> sigma: clamp, shift, map linearly into [min_timestep, max_timestep] / 1000."""
        c = self.cfg
        u = u.double().clamp(FLOW_SIGMA_MIN, 1.0)
        s = shift_sigmas(u, c.discrete_flow_shift)
        lo, hi = c.min_timestep / FLOW_TIMESTEP_SCALE, c.max_timestep / FLOW_TIMESTEP_SCALE
        if (lo, hi) != (0.0, 1.0):
            s = lo + s * (hi - lo)
        return s.float()

    def timesteps_at(self, u: Tensor) -> Tensor:
        """The sigmas at quantiles u in (0, 1) of the training sampler (validation's fixed, stratified set): the
        sampler's map applied to u in place of its random draw (logit_normal: the normal quantile of u)."""
        c = self.cfg
        u = u.double()
        kind = c.timestep_sampler_type
        if kind == "logit_normal":
            u = torch.sigmoid(math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0) * c.logit_std + c.logit_mean)
        elif kind == "mode":  # a decreasing map: the quantile u of its output is the map of 1 - u
            v = 1.0 - u
            u = 1.0 - v - c.mode_scale * (torch.cos(math.pi * v / 2.0) ** 2 - 1.0 + v)
        elif kind == "cosmap":
            u = 1.0 - 1.0 / (torch.tan(math.pi * u / 2.0) + 1.0)
        return self._shift_into_range(u)

    def noise(self, x0: Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        """Sample sigmas and noise and build x_t and the target."""
        noise = self._base_noise(x0, generator)  # (B, C, H, W)
        sigmas = self.sample_sigmas(x0.shape[0], x0, generator)  # (B,)
        return self.noise_at(x0, noise, sigmas, self._input_perturbation(noise, generator))

    def noise_at(self, x0: Tensor, noise: Tensor, timesteps: Tensor, noise_in: Tensor | None = None) -> NoisedBatch:
        """x_t and the target at `timesteps` = sigmas [B] for this noise (`noise_in`: the perturbed noise x_t uses)."""
        sigmas = timesteps.to(x0.device)
        s = _broadcast(sigmas, x0)  # (B, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * (noise if noise_in is None else noise_in)
        # precondition_outputs: the loss compares the implied x0 (x_t - s * pred) with x0 instead of velocities
        target = x0 if self.cfg.flow_precondition_outputs else noise - x0
        return NoisedBatch(x_t=x_t, t=sigmas * FLOW_TIMESTEP_SCALE, target=target, timesteps=sigmas)

    def loss(self, pred: Tensor, batch: NoisedBatch, weight: Tensor | None = None,
             mask: Tensor | None = None) -> Tensor:
        """Per-sample loss [B]: (optionally preconditioned) regression, then the flow weighting."""
        c = self.cfg
        sigmas = batch.timesteps.float().to(pred.device)
        if c.flow_precondition_outputs:
            pred = batch.x_t - _broadcast(sigmas, batch.x_t) * pred  # diffusers: model_pred * (-sigmas) + x_t
        huber_c = None
        if c.loss_type != "l2":
            # kohya's DDPM noise-to-signal ratio sqrt((1 - a) / a) is sigma / (1 - sigma) on the flow path
            nts = sigmas / (1.0 - sigmas).clamp(min=torch.finfo(torch.float32).tiny)
            huber_c = scheduled_huber_c(c.huber_schedule, c.huber_c, sigmas * FLOW_TIMESTEP_SCALE, nts)
        loss = self._per_sample(pred, batch.target, huber_c, weight, mask)
        return loss * flow_loss_weighting(c.flow_loss_weighting, sigmas).to(loss)


def build_objective(kind: str, loss_cfg: Any, v_parameterization: bool = False) -> Objective:
    """The objective a model family trains with (its record's `objective`): "ddpm" -> DDPMObjective (SDXL),
    "flow" -> FlowObjective (SD3)."""
    if kind == "ddpm":
        return DDPMObjective(loss_cfg, v_parameterization=v_parameterization)
    if kind == "flow":
        if v_parameterization:
            raise ValueError("v_parameterization is an SDXL (DDPM) option; SD3 is trained with rectified flow")
        return FlowObjective(loss_cfg)
    raise ValueError(f"unknown objective {kind!r}; allowed: {', '.join(OBJECTIVES)}")
