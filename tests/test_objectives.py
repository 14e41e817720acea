"""Tests for diffusion/objectives.py: schedules, noising, targets, noise options and loss weightings.

References: diffusers (DDPMScheduler, FlowMatchEulerDiscreteScheduler, training_utils) as oracles on identical inputs,
and closed-form / statistical answers computed here independently of the product code.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffusion.objectives import (
    DDPMObjective,
    FlowObjective,
    NoisedBatch,
    build_objective,
    shift_sigmas,
)

from core.config import LossConfig


def cfg(**kw) -> LossConfig:
    return dataclasses.replace(LossConfig(), **kw)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ddpm_scheduler(**kw):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw
    )


def ref_snr(**kw) -> torch.Tensor:
    """SNR = a / (1 - a) from diffusers' alphas_cumprod (float64)."""
    a = ddpm_scheduler(**kw).alphas_cumprod.double()
    return a / (1 - a)


# ---------------------------------------------------------------------------------------------------------------------
# DDPM schedule and noising


def test_alphas_cumprod_matches_diffusers_scaled_linear():
    """diffusers DDPMScheduler(scaled_linear, 0.00085..0.012): same alphas_cumprod (no conversion)."""
    ref = ddpm_scheduler().alphas_cumprod
    ours = DDPMObjective(cfg()).alphas_cumprod
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)


def test_zero_terminal_snr_matches_diffusers_and_paper():
    """diffusers DDPMScheduler(rescale_betas_zero_snr=True) oracle; Lin et al.: last value 0, first value kept."""
    ours = DDPMObjective(cfg(zero_terminal_snr=True)).alphas_cumprod
    ref = ddpm_scheduler(rescale_betas_zero_snr=True).alphas_cumprod
    plain = ddpm_scheduler().alphas_cumprod
    assert ours[-1].item() == 0.0
    torch.testing.assert_close(ours[0], plain[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(ours[:-1], ref[:-1], rtol=0, atol=2e-6)
    assert ref[-1].item() < 1e-6  # diffusers clamps its last alpha to a tiny value instead of 0


@pytest.mark.parametrize("v", [False, True])
def test_ddpm_noising_and_targets_match_diffusers(v):
    """diffusers DDPMScheduler.add_noise / get_velocity on the same x0, eps, t (eps read off the eps objective)."""
    sched = ddpm_scheduler()
    x0 = torch.randn(6, 4, 8, 8)
    eps_batch = DDPMObjective(cfg()).noise(x0, gen(3))
    batch = DDPMObjective(cfg(), v_parameterization=v).noise(x0, gen(3))
    eps, t = eps_batch.target, eps_batch.timesteps
    assert torch.equal(batch.timesteps, t) and batch.timesteps.dtype == torch.long
    assert torch.equal(batch.t, t.float())
    torch.testing.assert_close(batch.x_t, sched.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    ref_target = sched.get_velocity(x0, eps, t) if v else eps
    torch.testing.assert_close(batch.target, ref_target, rtol=1e-5, atol=1e-5)


def test_uniform_timesteps_respect_bounds():
    """Analytic: uniform integers on [200, 300): all inside, both ends reached, mean 249.5."""
    obj = DDPMObjective(cfg(min_timestep=200, max_timestep=300))
    t = obj.sample_timesteps(20000, torch.zeros(1), gen())
    assert t.min().item() == 200 and t.max().item() == 299
    assert abs(t.double().mean().item() - 249.5) < 1.0


def test_sdxl_logit_normal_timesteps():
    """Analytic: logit(t / 1000) of logit-normal timesteps has the requested mean and std."""
    obj = DDPMObjective(cfg(timestep_sampler_type="logit_normal", logit_mean=0.4, logit_std=0.7))
    t = obj.sample_timesteps(40000, torch.zeros(1), gen())
    assert 0 <= t.min() and t.max() <= 999
    u = (t.double() + 0.5) / 1000  # bin centre
    z = torch.log(u / (1 - u))
    assert abs(z.mean().item() - 0.4) < 0.02
    assert abs(z.std().item() - 0.7) < 0.02


def test_generator_reproducibility():
    """Same seed -> identical batch; a different seed -> different noise (no hidden global RNG use)."""
    x0 = torch.randn(2, 4, 8, 8)
    obj = DDPMObjective(cfg(noise_offset=0.1, ip_noise_gamma=0.1))
    a, b, c = obj.noise(x0, gen(1)), obj.noise(x0, gen(1)), obj.noise(x0, gen(2))
    for f in ("x_t", "t", "target", "timesteps"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.target, c.target)
    flow = FlowObjective(cfg(multires_noise_iterations=3))
    a, b = flow.noise(x0, gen(5)), flow.noise(x0, gen(5))
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t)


# ---------------------------------------------------------------------------------------------------------------------
# Noise options (statistics of the eps target = the sampled noise)


def spatial_means(noise: torch.Tensor) -> torch.Tensor:
    return noise.mean(dim=(2, 3))  # (B, C)


def test_noise_offset_adds_per_channel_constant():
    """Crosslabs offset noise: per-(sample, channel) mean has variance offset^2 + 1/(HW) (analytic)."""
    h = w = 16
    x0 = torch.zeros(512, 4, h, w)
    noise = DDPMObjective(cfg(noise_offset=0.3)).noise(x0, gen()).target
    std = spatial_means(noise).std().item()
    assert abs(std - math.sqrt(0.3**2 + 1 / (h * w))) < 0.02
    plain = DDPMObjective(cfg()).noise(x0, gen()).target
    assert abs(spatial_means(plain).std().item() - math.sqrt(1 / (h * w))) < 0.005


def test_noise_offset_random_strength():
    """kohya: one strength U(0, offset) per batch -> per-batch offset estimates vary inside [0, offset]."""
    h = w = 16
    obj = DDPMObjective(cfg(noise_offset=0.5, noise_offset_random_strength=True))
    g = gen()
    est = []
    for _ in range(12):
        m = spatial_means(obj.noise(torch.zeros(256, 4, h, w), g).target)
        est.append(math.sqrt(max(m.var().item() - 1 / (h * w), 0.0)))
    assert max(est) < 0.5 * 1.15
    assert max(est) - min(est) > 0.1  # strength changes between batches
    assert 0.1 < sum(est) / len(est) < 0.4  # E[U(0, 0.5)] = 0.25


def test_adaptive_noise_scale():
    """kohya apply_noise_offset: offset_c = offset + scale * |mean_c(x0)|, so channel c's mean std grows with |m_c|."""
    h = w = 16
    means = torch.tensor([0.0, 1.0, -2.0, 3.0])
    x0 = means.view(1, 4, 1, 1).expand(512, 4, h, w).clone()
    noise = DDPMObjective(cfg(noise_offset=0.1, adaptive_noise_scale=0.2)).noise(x0, gen()).target
    std = spatial_means(noise).std(dim=0)
    expected = torch.sqrt((0.1 + 0.2 * means.abs()) ** 2 + 1 / (h * w))
    torch.testing.assert_close(std, expected, rtol=0.08, atol=0)


def test_multires_noise_statistics():
    """Pyramid noise: unit std overall, and far more low-frequency energy than white noise (var of map means)."""
    h = w = 32
    noise = DDPMObjective(cfg(multires_noise_iterations=6, multires_noise_discount=0.5)).noise(
        torch.zeros(64, 4, h, w), gen()
    ).target
    assert abs(noise.std().item() - 1.0) < 1e-4
    assert spatial_means(noise).var().item() > 5 / (h * w)
    # neighbouring pixels are positively correlated (white noise: 0)
    corr = torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1]
    assert corr.item() > 0.03  # white noise: 0 +- 0.002 at this size


@pytest.mark.parametrize("random_strength", [False, True])
def test_ip_noise_gamma(random_strength):
    """Ning et al.: x_t = sqrt(a) x0 + sqrt(1-a)(eps + g xi), target eps -> residual / sqrt(1-a) has std g."""
    gamma = 0.3
    alphas = DDPMObjective(cfg()).alphas_cumprod
    obj = DDPMObjective(cfg(ip_noise_gamma=gamma, ip_noise_gamma_random_strength=random_strength))
    g = gen()
    stds = []
    for _ in range(6 if random_strength else 1):
        b = obj.noise(torch.zeros(64, 4, 16, 16), g)
        s1ma = (1 - alphas[b.timesteps]).sqrt().view(-1, 1, 1, 1)
        stds.append(((b.x_t / s1ma) - b.target).std().item())
    if random_strength:
        assert max(stds) <= gamma * 1.02 and max(stds) - min(stds) > 0.05
    else:
        assert abs(stds[0] - gamma) < 0.01


# ---------------------------------------------------------------------------------------------------------------------
# DDPM loss weightings: ratio of the weighted to the plain per-sample loss, vs formulas from diffusers' alphas


def fixed_batch(t: list[int], v: bool = False) -> tuple[NoisedBatch, torch.Tensor]:
    tt = torch.tensor(t)
    target = torch.randn(len(t), 4, 4, 4)
    batch = NoisedBatch(x_t=torch.zeros_like(target), t=tt.float(), target=target, timesteps=tt)
    return batch, target + torch.randn_like(target)


def weight_ratio(v: bool, t: list[int], **kw) -> torch.Tensor:
    batch, pred = fixed_batch(t)
    weighted = DDPMObjective(cfg(**kw), v_parameterization=v).loss(pred, batch)
    plain = DDPMObjective(cfg(zero_terminal_snr=kw.get("zero_terminal_snr", False)), v_parameterization=v).loss(
        pred, batch
    )
    return (weighted / plain).double()


T_SAMPLE = [0, 1, 10, 100, 500, 900, 999]


@pytest.mark.parametrize("v", [False, True])
def test_min_snr_gamma_weights(v):
    """Hang et al. 2023 from diffusers' SNR: eps min(SNR,g)/SNR, v min(SNR,g)/(SNR+1)."""
    snr = ref_snr()[T_SAMPLE]
    expected = torch.clamp(snr, max=5.0) / (snr + 1 if v else snr)
    torch.testing.assert_close(weight_ratio(v, T_SAMPLE, min_snr_gamma=5.0), expected, rtol=1e-4, atol=0)


def test_min_snr_with_zero_terminal_snr_is_finite():
    """At SNR = 0 the eps min-SNR weight takes its limit 1 (diffusers sets it to 1); v weight is 0/(0+1) = 0."""
    eps = weight_ratio(False, [998, 999], min_snr_gamma=5.0, zero_terminal_snr=True)
    assert torch.isfinite(eps).all() and eps[1].item() == pytest.approx(1.0)
    v = weight_ratio(True, [999], min_snr_gamma=5.0, zero_terminal_snr=True)
    assert v[0].item() == pytest.approx(0.0)


def test_scale_v_pred_like_noise_pred():
    """kohya get_snr_scale: weight SNR'/(SNR'+1) with SNR' = min(SNR, 1000)."""
    snr = torch.clamp(ref_snr()[T_SAMPLE], max=1000)
    ratio = weight_ratio(True, T_SAMPLE, scale_v_pred_loss_like_noise_pred=True)
    torch.testing.assert_close(ratio, snr / (snr + 1), rtol=1e-4, atol=0)


def test_v_pred_like_loss():
    """kohya add_v_prediction_like_loss: loss + loss / scale * k -> ratio 1 + k (SNR'+1)/SNR'."""
    snr = torch.clamp(ref_snr()[T_SAMPLE], max=1000)
    ratio = weight_ratio(False, T_SAMPLE, v_pred_like_loss=0.2)
    torch.testing.assert_close(ratio, 1 + 0.2 * (snr + 1) / snr, rtol=1e-4, atol=0)


def test_debiased_estimation():
    """Debiased estimation (Yu et al. 2024, kohya): weight 1/sqrt(min(SNR, 1000))."""
    snr = torch.clamp(ref_snr()[T_SAMPLE], max=1000)
    torch.testing.assert_close(
        weight_ratio(True, T_SAMPLE, debiased_estimation_loss=True), snr.rsqrt(), rtol=1e-4, atol=0
    )


def test_per_sample_weight_and_reduction():
    """Analytic: l2 per-sample loss = mean over C,H,W of (pred - target)^2, times the given weight."""
    batch, pred = fixed_batch([5, 50, 500])
    w = torch.tensor([1.0, 0.5, 2.0])
    out = DDPMObjective(cfg()).loss(pred, batch, w)
    torch.testing.assert_close(out, ((pred - batch.target) ** 2).mean(dim=(1, 2, 3)) * w)
    with pytest.raises(ValueError, match="weight shape"):
        DDPMObjective(cfg()).loss(pred, batch, torch.ones(2))


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_scheduled_huber_losses(loss_type, schedule):
    """kohya conditional_loss + get_huber_threshold_if_needed, thresholds from diffusers' alphas_cumprod."""
    c0 = 0.2
    batch, pred = fixed_batch(T_SAMPLE)
    t = batch.timesteps.double()
    a = ddpm_scheduler().alphas_cumprod.double()[batch.timesteps]
    c = {
        "constant": torch.full_like(t, c0),
        "exponential": c0 ** (t / 1000),  # exp(-(-ln c / 1000) t)
        "snr": (1 - c0) / (1 + ((1 - a) / a).sqrt()) ** 2 + c0,
    }[schedule].view(-1, 1, 1, 1)
    d2 = (pred.double() - batch.target.double()) ** 2
    el = 2 * (torch.sqrt(d2 + c**2) - c)
    if loss_type == "huber":
        el = el * c
    out = DDPMObjective(cfg(loss_type=loss_type, huber_c=c0, huber_schedule=schedule)).loss(pred, batch)
    torch.testing.assert_close(out.double(), el.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)


def test_pseudo_huber_limits():
    """Analytic limits: huber ~ squared error for |d| << c, smooth_l1 ~ 2|d| for |d| >> c."""
    batch, _ = fixed_batch([10, 20])
    small = batch.target + 1e-3
    huber = DDPMObjective(cfg(loss_type="huber", huber_c=1.0, huber_schedule="constant")).loss(small, batch)
    torch.testing.assert_close(huber, torch.full((2,), 1e-6), rtol=1e-3, atol=0)
    big = batch.target + 100.0
    sl1 = DDPMObjective(cfg(loss_type="smooth_l1", huber_c=0.01, huber_schedule="constant")).loss(big, batch)
    torch.testing.assert_close(sl1, torch.full((2,), 200.0), rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# SD3 rectified flow


def test_flow_interpolation_and_target_exact():
    """CONVENTIONS.md: x_t = (1-s) x0 + s eps, target eps - x0, t = 1000 s (eps = target + x0)."""
    x0 = torch.randn(8, 16, 8, 8)
    b = FlowObjective(cfg()).noise(x0, gen())
    s = b.timesteps.view(-1, 1, 1, 1)
    eps = b.target + x0
    torch.testing.assert_close(b.x_t, (1 - s) * x0 + s * eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.t, b.timesteps * 1000)
    assert abs(eps.std().item() - 1) < 0.05 and (b.timesteps > 0).all() and (b.timesteps <= 1).all()


def test_shift_formula_matches_diffusers_flow_scheduler():
    """diffusers FlowMatchEulerDiscreteScheduler(shift=3).sigmas vs shift_sigmas on its unshifted grid t/1000."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    base = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(shift_sigmas(base, 3.0).float(), sched.sigmas[:1000].float(), rtol=1e-6, atol=1e-6)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s))  # closed form


def test_flow_uniform_sampler_with_shift():
    """Inverting the shift (u = s / (k - (k-1) s)) recovers U(0, 1): mean 1/2, variance 1/12."""
    k = 3.0
    s = FlowObjective(cfg(discrete_flow_shift=k)).sample_sigmas(40000, torch.zeros(1), gen()).double()
    u = s / (k - (k - 1) * s)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003


def test_flow_logit_normal_sampler():
    """SD3 paper: with shift 1 the logit of the sigmas is N(mean, std)."""
    s = FlowObjective(
        cfg(timestep_sampler_type="logit_normal", logit_mean=-0.3, logit_std=1.2, discrete_flow_shift=1.0)
    ).sample_sigmas(40000, torch.zeros(1), gen()).double()
    s = s[(s > 1e-3) & (s < 1)]  # the lower clamp only touches the far tail
    z = torch.log(s / (1 - s))
    assert abs(z.mean().item() + 0.3) < 0.03 and abs(z.std().item() - 1.2) < 0.03


def test_flow_mode_sampler_matches_diffusers():
    """diffusers compute_density_for_timestep_sampling("mode") with the same generator seed (shift 1)."""
    training_utils = pytest.importorskip("diffusers.training_utils")
    ref = training_utils.compute_density_for_timestep_sampling("mode", 4096, mode_scale=1.29, generator=gen(7))
    ours = FlowObjective(cfg(timestep_sampler_type="mode", discrete_flow_shift=1.0)).sample_sigmas(
        4096, torch.zeros(1), gen(7)
    )
    torch.testing.assert_close(ours, ref.clamp(1e-3, 1), rtol=0, atol=1e-6)


def test_flow_cosmap_sampler_density():
    """SD3 paper CosMap: empirical CDF vs the integral of diffusers' cosmap density 2 / (pi (1 - 2t + 2t^2))."""
    training_utils = pytest.importorskip("diffusers.training_utils")
    s = FlowObjective(cfg(timestep_sampler_type="cosmap", discrete_flow_shift=1.0)).sample_sigmas(
        40000, torch.zeros(1), gen()
    ).double()
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    dens = training_utils.compute_loss_weighting_for_sd3("cosmap", grid)
    cdf = torch.cumulative_trapezoid(dens, grid)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        idx = int(q * 2000) - 1
        assert abs((s <= grid[idx + 1]).double().mean().item() - cdf[idx].item()) < 0.01


def test_flow_timestep_bounds():
    """min/max_timestep bound the network timestep t = 1000 s."""
    t = FlowObjective(cfg(min_timestep=100, max_timestep=400)).noise(torch.zeros(4000, 1, 1, 1), gen()).t
    assert t.min().item() >= 100 and t.max().item() <= 400 and t.max().item() > 350


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_flow_loss_weighting_matches_diffusers(scheme):
    """diffusers compute_loss_weighting_for_sd3 per sample, on the same sigmas."""
    training_utils = pytest.importorskip("diffusers.training_utils")
    x0 = torch.randn(6, 4, 8, 8)
    b = FlowObjective(cfg()).noise(x0, gen())
    pred = torch.randn_like(x0)
    plain = FlowObjective(cfg()).loss(pred, b)
    weighted = FlowObjective(cfg(flow_loss_weighting=scheme)).loss(pred, b)
    torch.testing.assert_close(weighted, plain * training_utils.compute_loss_weighting_for_sd3(scheme, b.timesteps))


def test_flow_precondition_outputs():
    """diffusers train_dreambooth_sd3 precondition_outputs: loss on pred * (-s) + x_t against x0."""
    x0 = torch.randn(4, 4, 8, 8)
    obj = FlowObjective(cfg(flow_precondition_outputs=True))
    b = obj.noise(x0, gen())
    assert torch.equal(b.target, x0)
    s = b.timesteps.view(-1, 1, 1, 1)
    velocity = (b.x_t - x0) / s  # the exact velocity eps - x0
    assert obj.loss(velocity, b).max().item() < 1e-8
    pred = torch.randn_like(x0)
    ref = ((pred * (-s) + b.x_t - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(obj.loss(pred, b), ref)


def test_flow_huber_snr_schedule():
    """Flow analogue of kohya's snr schedule: noise/signal = s/(1-s) -> c(s) = (1-c)(1-s)^2 + c."""
    x0 = torch.randn(5, 4, 4, 4)
    b = FlowObjective(cfg(loss_type="huber", huber_c=0.1)).noise(x0, gen())
    pred = torch.randn_like(x0)
    s = b.timesteps.double().view(-1, 1, 1, 1)
    c = 0.9 * (1 - s) ** 2 + 0.1
    d2 = (pred.double() - b.target.double()) ** 2
    ref = (2 * c * (torch.sqrt(d2 + c**2) - c)).mean(dim=(1, 2, 3))
    out = FlowObjective(cfg(loss_type="huber", huber_c=0.1)).loss(pred, b)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "kind, kw, match",
    [
        ("ddpm", dict(min_timestep=500, max_timestep=500), "min_timestep < max_timestep"),
        ("flow", dict(min_timestep=10, max_timestep=5), "min_timestep < max_timestep"),
        ("ddpm", dict(timestep_sampler_type="mode"), "not available for SDXL"),
        ("ddpm", dict(timestep_sampler_type="cosmap"), "not available for SDXL"),
        ("ddpm", dict(flow_loss_weighting="cosmap"), "SD3 only"),
        ("ddpm", dict(flow_precondition_outputs=True), "SD3 only"),
        ("flow", dict(min_snr_gamma=5.0), "min_snr_gamma"),
        ("flow", dict(zero_terminal_snr=True, debiased_estimation_loss=True), "debiased_estimation_loss"),
        ("ddpm", dict(zero_terminal_snr=True, debiased_estimation_loss=True), "max_timestep <= 999"),
        ("ddpm", dict(noise_offset=0.1, multires_noise_iterations=4), "cannot be used together"),
        ("ddpm", dict(adaptive_noise_scale=0.1), "set noise_offset"),
        ("ddpm", dict(ip_noise_gamma_random_strength=True), "needs ip_noise_gamma"),
        ("ddpm", dict(loss_type="l1"), "loss_type"),
        ("flow", dict(timestep_sampler_type="beta"), "not supported for SD3"),
        ("flow", dict(timestep_sampler_type="mode", mode_scale=3.0), "mode_scale"),
    ],
)
def test_invalid_settings_raise(kind, kw, match):
    """Impossible or meaningless combinations give a clear ValueError naming the option."""
    with pytest.raises(ValueError, match=match):
        build_objective(kind, cfg(**kw))


def test_build_objective_dispatch():
    """build_objective picks the objective a family's record names (SDXL "ddpm", SD3 "flow") and rejects unknown
    objectives / v-pred on SD3's flow."""
    import models
    assert (models.family("sdxl").objective, models.family("sd3").objective) == ("ddpm", "flow")
    assert isinstance(build_objective("ddpm", cfg(), v_parameterization=True), DDPMObjective)
    assert isinstance(build_objective("flow", cfg()), FlowObjective)
    # v-pred-only weightings on an eps model are allowed
    build_objective("ddpm", cfg(scale_v_pred_loss_like_noise_pred=True))
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("sd15", cfg())
    with pytest.raises(ValueError, match="v_parameterization"):
        build_objective("flow", cfg(), v_parameterization=True)
