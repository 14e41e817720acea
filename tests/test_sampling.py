"""Samplers, schedules and guidance of diffusion/sampling.py against analytic answers and diffusers schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.sampling import (
    FLOW,
    SAMPLERS,
    VE,
    DiscreteSchedule,
    FlowSchedule,
    canonical_sampler_name,
    cfg_denoiser,
    get_sampler,
    sample,
)

# ----------------------------------------------------------------------------------------------------
# Toy problem: data N(MU, S^2) per dimension, whose exact denoiser is analytic in the (alpha, sigma) form.
# ----------------------------------------------------------------------------------------------------

MU = torch.tensor([1.0, -2.0])
S = 0.5
N = 4000
DETERMINISTIC = ("euler", "ddim", "heun", "dpmpp_2m")
STOCHASTIC = ("euler_ancestral", "dpmpp_2m_sde")
FIRST_ORDER = ("euler", "ddim", "euler_ancestral")
FORMS = {VE: DiscreteSchedule, FLOW: FlowSchedule}


def _alpha(sigma: torch.Tensor, form: str) -> torch.Tensor:
    return torch.ones_like(sigma) if form == VE else 1 - sigma


def exact_denoiser(form: str):
    """E[x0 | x] for x = alpha x0 + sigma eps, x0 ~ N(MU, S^2): MU + alpha S^2 / (alpha^2 S^2 + sigma^2) (x - alpha MU)."""

    def model(x, sigma):
        s = sigma[:, None].double()
        a = _alpha(s, form)
        return (MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)).float()

    return model


def start(form: str, sigma0: float, z: torch.Tensor) -> torch.Tensor:
    """A draw from the exact marginal at sigma0 built from standard normal z."""
    a0 = 1.0 if form == VE else 1.0 - sigma0
    return a0 * MU + math.sqrt(a0**2 * S**2 + sigma0**2) * z


@pytest.mark.parametrize("form", [VE, FLOW])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_toy_distribution(form, name):
    """Analytic reference: every sampler maps the exact marginal at sigma_max to N(MU, S^2) (mean / std; 40 Karras
    steps for the second-order samplers, 100 for the first-order ones, whose std is ~0.04 low at 40 steps)."""
    sigmas = FORMS[form]().sigmas(100 if name in FIRST_ORDER else 40, "karras")
    z = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name](exact_denoiser(form), start(form, float(sigmas[0]), z), sigmas, disable=True, form=form,
                         generator=torch.Generator().manual_seed(1))
    # standard errors: mean S / sqrt(N) = 0.008, std S / sqrt(2N) = 0.0056; tolerance ~4 SE + discretisation
    assert torch.allclose(out.mean(0), MU, atol=0.04), out.mean(0)
    assert torch.allclose(out.std(0), torch.full((2,), S), atol=0.03), out.std(0)


@pytest.mark.parametrize("form", [VE, FLOW])
@pytest.mark.parametrize("name,order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_toy_path_convergence(form, name, order):
    """Analytic reference: the 1-D probability-flow ODE of a Gaussian keeps z = (x - alpha MU) / sqrt(alpha^2 S^2 + sigma^2),
    so deterministic samplers must land on MU + S z; the error shrinks with the method's order."""
    schedule = FORMS[form]()
    z = torch.linspace(-2, 2, 9)[:, None].repeat(1, 2)
    errors = []
    for steps in (20, 40):
        sigmas = schedule.sigmas(steps, "karras")
        out = SAMPLERS[name](exact_denoiser(form), start(form, float(sigmas[0]), z), sigmas, disable=True, form=form)
        errors.append((out - (MU + S * z)).abs().max().item())
    # the final jump sigma_min -> 0 is exact only up to S * sigma_min^2 / (2 S^2) per unit z: a floor
    floor = 2 * 2 * float(sigmas[-2]) ** 2 / (2 * S)
    assert errors[1] < (0.06 if order == 1 else 0.005)
    assert errors[1] - floor < (errors[0] - floor) / (1.6 if order == 1 else 3.0)


@pytest.mark.parametrize("form", [VE, FLOW])
def test_ddim_eta0_equals_euler(form):
    """Analytic: DDIM's x_next = alpha_next x0 + sigma_next eps_hat equals the Euler step in both forms."""
    sigmas = FORMS[form]().sigmas(12)
    z = torch.randn(64, 2)
    x = start(form, float(sigmas[0]), z)
    a = SAMPLERS["ddim"](exact_denoiser(form), x, sigmas, disable=True, form=form)
    b = SAMPLERS["euler"](exact_denoiser(form), x, sigmas, disable=True, form=form)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", [VE, FLOW])
def test_seeds(form):
    """Deterministic samplers repeat exactly; ancestral / SDE ones agree for one seed and differ across seeds."""
    sigmas = FORMS[form]().sigmas(8)
    x = start(form, float(sigmas[0]), torch.randn(16, 2))
    model = exact_denoiser(form)

    def run(name, seed):
        return SAMPLERS[name](model, x, sigmas, disable=True, form=form, generator=torch.Generator().manual_seed(seed))

    for name in DETERMINISTIC:
        assert torch.equal(run(name, 1), run(name, 2))
    for name in STOCHASTIC + ("ddim_eta",):
        if name == "ddim_eta":
            def run(_, seed):  # noqa: E306 - DDIM with eta = 1 is stochastic too
                return SAMPLERS["ddim"](model, x, sigmas, disable=True, form=form, eta=1.0,
                                        generator=torch.Generator().manual_seed(seed))
        assert torch.equal(run(name, 3), run(name, 3))
        assert not torch.allclose(run(name, 3), run(name, 4))


def test_sampler_registry():
    """Aliases of kohya / k-diffusion / A1111 resolve; unknown names list the valid ones."""
    assert canonical_sampler_name("k_euler") == "euler"
    assert canonical_sampler_name("Euler a") == "euler_ancestral"
    assert canonical_sampler_name("euler_a") == "euler_ancestral"
    assert canonical_sampler_name("dpm++2m") == "dpmpp_2m"
    assert canonical_sampler_name("DPM++ 2M SDE") == "dpmpp_2m_sde"
    assert get_sampler("ddim") is SAMPLERS["ddim"]
    with pytest.raises(ValueError, match="valid names: euler, euler_ancestral"):
        get_sampler("no_such_sampler")
    with pytest.raises(ValueError, match="allowed: normal, karras"):
        DiscreteSchedule().sigmas(10, "exponential")
    with pytest.raises(ValueError, match="positive integer"):
        FlowSchedule().sigmas(0)


# ----------------------------------------------------------------------------------------------------
# Parity with diffusers schedulers (oracles) on identical toy networks.
# ----------------------------------------------------------------------------------------------------


def toy_network(x_in, t):
    """A nonlinear toy network that depends on x and on the timestep t (scalar or [B])."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x_in.ndim - 1)))
    return torch.tanh(1.3 * x_in) * (1 + t / 1000) + 0.1 * x_in


def toy_network_no_t(x_in, t):
    return torch.tanh(1.3 * x_in) + 0.1 * x_in


def _close(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


def _sdxl_scheduler(cls, **kw):
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)


@pytest.mark.parametrize("steps", [10, 28])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_discrete_sigmas_normal_vs_diffusers(steps, zero_snr):
    """diffusers EulerDiscreteScheduler(scaled_linear, timestep_spacing="linspace") sigmas and timesteps; step
    counts where 999 / (steps - 1) is an integer, where linear and log-sigma interpolation coincide."""
    diffusers = pytest.importorskip("diffusers")
    ref = _sdxl_scheduler(diffusers.EulerDiscreteScheduler, timestep_spacing="linspace", rescale_betas_zero_snr=zero_snr)
    ref.set_timesteps(steps)
    ours = DiscreteSchedule(zero_terminal_snr=zero_snr)
    sigmas = ours.sigmas(steps)
    _close(sigmas, ref.sigmas)
    _close(ours.sigma_to_t(sigmas[:-1]) / 1000, ref.timesteps / 1000)
    # diffusers accumulates alpha_bar in float32, we in float64 (as sgm): near zero SNR that differs by ~2e-5
    torch.testing.assert_close(ours.sigmas_train, ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5, rtol=5e-5, atol=0)


@pytest.mark.parametrize("steps", [7, 25])
def test_discrete_sigmas_karras_vs_diffusers(steps):
    """diffusers EulerDiscreteScheduler(use_karras_sigmas=True) sigmas and (log-sigma interpolated) timesteps."""
    diffusers = pytest.importorskip("diffusers")
    ref = _sdxl_scheduler(diffusers.EulerDiscreteScheduler, use_karras_sigmas=True)
    ref.set_timesteps(steps)
    ours = DiscreteSchedule()
    sigmas = ours.sigmas(steps, "karras")
    _close(sigmas, ref.sigmas)
    _close(ours.sigma_to_t(sigmas[:-1]) / 1000, ref.timesteps / 1000)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("kind", ["normal", "karras"])
def test_euler_discrete_vs_diffusers(prediction, kind):
    """diffusers EulerDiscreteScheduler loop (scale_model_input, step) with a toy eps / v network equals our
    sample(DiscreteSchedule, "euler"); noise scaled by init_noise_sigma on both sides."""
    diffusers = pytest.importorskip("diffusers")
    steps = 10
    ref = _sdxl_scheduler(
        diffusers.EulerDiscreteScheduler,
        prediction_type="epsilon" if prediction == "eps" else "v_prediction",
        timestep_spacing="linspace",
        use_karras_sigmas=kind == "karras",
    )
    ref.set_timesteps(steps)
    noise = torch.randn(2, 4, 8, 8)
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(toy_network(ref.scale_model_input(x, t), t), t, x).prev_sample
    ours = sample(DiscreteSchedule(prediction), toy_network, noise, steps, "euler", kind)
    _close(ours, x)


@pytest.mark.parametrize("steps", [8, 28])
def test_flow_sigmas_and_euler_vs_diffusers(steps):
    """diffusers FlowMatchEulerDiscreteScheduler(shift=3.0): same sigmas, and N Euler steps with a toy velocity
    network (called with t = sigma * 1000) give the same latents."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(steps)
    _close(FlowSchedule(3.0).sigmas(steps), ref.sigmas)
    noise = torch.randn(2, 4, 8, 8)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(toy_network(x, t), t, x).prev_sample
    _close(sample(FlowSchedule(3.0), toy_network, noise, steps, "euler"), x)


def test_flow_karras_vs_diffusers():
    """diffusers FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True) sigmas."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True)
    ref.set_timesteps(20)
    _close(FlowSchedule(3.0).sigmas(20, "karras"), ref.sigmas)


@pytest.mark.parametrize("form", [VE, FLOW])
@pytest.mark.parametrize("name,algorithm", [("dpmpp_2m", "dpmsolver++"), ("dpmpp_2m_sde", "sde-dpmsolver++")])
def test_dpmpp_vs_diffusers(form, name, algorithm):
    """diffusers DPMSolverMultistepScheduler (order 2, midpoint, final_sigmas_type zero, >= 15 steps so only the
    last step is first order) on its own sigmas, which we feed to our sampler; diffusers works in the VP scaling
    (x_vp = x / sqrt(1 + sigma^2) for VE), so our start is noise * sqrt(1 + sigma_0^2); same generator draws."""
    diffusers = pytest.importorskip("diffusers")
    if form == VE:
        ref = _sdxl_scheduler(diffusers.DPMSolverMultistepScheduler, algorithm_type=algorithm, use_karras_sigmas=True,
                              final_sigmas_type="zero")
        schedule = DiscreteSchedule()
    else:
        ref = diffusers.DPMSolverMultistepScheduler(algorithm_type=algorithm, use_flow_sigmas=True, flow_shift=3.0,
                                                    prediction_type="flow_prediction", final_sigmas_type="zero")
        schedule = FlowSchedule()
    ref.set_timesteps(16)
    noise = torch.randn(2, 4, 8, 8)
    x = noise.clone()
    g = torch.Generator().manual_seed(7)
    for t in ref.timesteps:
        x = ref.step(toy_network_no_t(ref.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    sigmas = ref.sigmas.float()
    x0 = noise * math.sqrt(1 + float(sigmas[0]) ** 2) if form == VE else noise
    ours = SAMPLERS[name](schedule.denoiser(toy_network_no_t), x0, sigmas, disable=True, form=form,
                          generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_euler_ancestral_vs_diffusers():
    """diffusers EulerAncestralDiscreteScheduler (linspace spacing) with the same generator draws: k-diffusion's
    sigma_up / sigma_down ancestral step."""
    diffusers = pytest.importorskip("diffusers")
    ref = _sdxl_scheduler(diffusers.EulerAncestralDiscreteScheduler, timestep_spacing="linspace")
    ref.set_timesteps(10)
    noise = torch.randn(2, 4, 8, 8)
    x = noise * ref.init_noise_sigma
    g = torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        x = ref.step(toy_network(ref.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    ours = sample(DiscreteSchedule(), toy_network, noise, 10, "euler_a", generator=torch.Generator().manual_seed(3))
    _close(ours, x)


@pytest.mark.parametrize("flow", [False, True])
def test_heun_vs_diffusers(flow):
    """diffusers HeunDiscreteScheduler / FlowMatchHeunDiscreteScheduler (network ignoring t) on their sigmas."""
    diffusers = pytest.importorskip("diffusers")
    if flow:
        ref = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
        schedule, form = FlowSchedule(), FLOW
    else:
        ref = _sdxl_scheduler(diffusers.HeunDiscreteScheduler, use_karras_sigmas=True)
        schedule, form = DiscreteSchedule(), VE
    ref.set_timesteps(12)
    noise = torch.randn(2, 4, 8, 8)
    x = noise * getattr(ref, "init_noise_sigma", 1.0)
    x_start = x.clone()
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x
        x = ref.step(toy_network_no_t(x_in, t), t, x).prev_sample
    sigmas = torch.cat([ref.sigmas[::2], ref.sigmas[-1:]]).unique_consecutive().float()
    ours = SAMPLERS["heun"](schedule.denoiser(toy_network_no_t), x_start, sigmas,
                            disable=True, form=form)
    _close(ours, x)


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------


def cond_network(x_in, t, context):
    """Toy network whose output depends on a conditioning tensor (per sample)."""
    return torch.tanh(x_in + context[:, :, None, None]) * (1 + t[:, None, None, None] / 1000)


def test_cfg_scale_one_equals_cond():
    """Analytic: scale 1 gives the conditional prediction (and needs no uncond)."""
    model = DiscreteSchedule().denoiser(cond_network)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 0.5])
    c = torch.randn(2, 4)
    expect = model(x, sigma, context=c)
    torch.testing.assert_close(cfg_denoiser(model, {"context": c}, None, 1.0)(x, sigma), expect)
    torch.testing.assert_close(cfg_denoiser(model, {"context": c}, {"context": -c}, 1.0, 0.7)(x, sigma), expect)


def test_cfg_batches_one_forward():
    """cond and uncond go through one forward of batch 2B; result is u + s (c - u) of separate calls."""
    calls = []

    def model(x, sigma, context):
        calls.append(x.shape[0])
        return DiscreteSchedule().denoiser(cond_network)(x, sigma, context=context)

    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 0.5])
    c, u = torch.randn(2, 4), torch.zeros(2, 4)
    out = cfg_denoiser(model, {"context": c}, {"context": u}, 5.0)(x, sigma)
    assert calls == [4]
    xc, xu = model(x, sigma, context=c), model(x, sigma, context=u)
    torch.testing.assert_close(out, xu + 5.0 * (xc - xu))
    with pytest.raises(ValueError, match="uncond"):
        cfg_denoiser(model, {"context": c}, None, 5.0)
    with pytest.raises(ValueError, match="differ beyond the batch"):
        cfg_denoiser(model, {"context": c}, {"context": torch.zeros(2, 5)}, 5.0)


def test_cfg_rescale_vs_diffusers_v_prediction():
    """diffusers SDXL pipeline path on a v-prediction toy network: v_cfg = v_u + w (v_c - v_u), then
    `rescale_noise_cfg(v_cfg, v_c, phi)`, then the scheduler's v -> x0 conversion
    x0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1); our cfg_denoiser works on x0 and converts itself."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    schedule = DiscreteSchedule("v")
    x, sigma = torch.randn(2, 4, 8, 8) * 3, torch.tensor([3.0, 0.5])
    c, u = torch.randn(2, 4), torch.zeros(2, 4)
    w, phi = 7.0, 0.7
    s = sigma[:, None, None, None]
    t = schedule.sigma_to_t(sigma)
    x_in = x / (s**2 + 1).sqrt()
    v_c, v_u = cond_network(x_in, t, c), cond_network(x_in, t, u)
    v = rescale_noise_cfg(v_u + w * (v_c - v_u), v_c, guidance_rescale=phi)
    expect = x / (s**2 + 1) - v * s / (s**2 + 1).sqrt()
    out = cfg_denoiser(schedule.denoiser(cond_network), {"context": c}, {"context": u}, w, phi)(x, sigma)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_cfg_rescale_flow_restatement():
    """Independent restatement for flow (alpha = 1 - sigma): v = (alpha eps - sigma x0) / sqrt(alpha^2 + sigma^2),
    std ratio per sample over all non-batch dims (Lin et al. 2023, Sec. 3.4), mix with phi, invert."""
    schedule = FlowSchedule()
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.3])
    c, u = torch.randn(2, 4), torch.zeros(2, 4)
    w, phi = 4.5, 0.5
    model = schedule.denoiser(cond_network)
    out = cfg_denoiser(model, {"context": c}, {"context": u}, w, phi, form=FLOW)(x, sigma)
    expect = []
    for i in range(2):
        xi, si = x[i : i + 1], float(sigma[i])
        ai, n = 1 - si, math.hypot(1 - si, si)
        x0c = model(xi, sigma[i : i + 1], context=c[i : i + 1])
        x0u = model(xi, sigma[i : i + 1], context=u[i : i + 1])
        to_v = lambda x0: (ai * (xi - ai * x0) / si - si * x0) / n  # noqa: E731
        vc, vu = to_v(x0c), to_v(x0u)
        vg = vu + w * (vc - vu)
        vf = phi * vg * vc.std() / vg.std() + (1 - phi) * vg
        expect.append((ai * xi / n - si * vf) / n)
    torch.testing.assert_close(out, torch.cat(expect), rtol=1e-5, atol=1e-5)
