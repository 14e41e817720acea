"""kohya's --sample_sampler names map to real implementations of those samplers, each checked against the diffusers
scheduler kohya uses for it (library/train_util.py get_my_scheduler) on the same toy network and sigmas."""

from __future__ import annotations

import pytest
import torch

from diffusion.sampling import SAMPLERS, VE, DiscreteSchedule, canonical_sampler_name

KOHYA_NAMES = ("ddim", "pndm", "heun", "dpmsolver", "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a",
               "k_dpm_2", "k_dpm_2_a")


def toy_network(x_in, t):
    """Nonlinear in x, independent of t (so sigma -> t interpolation conventions cannot matter)."""
    return torch.tanh(1.3 * x_in) + 0.1 * x_in


def _scheduler(name, **kw):
    diffusers = pytest.importorskip("diffusers")
    return getattr(diffusers, name)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)


def _diffusers_loop(ref, noise, generator=None):
    """The pipeline loop: start from noise * init_noise_sigma, scale_model_input, step."""
    x = noise * ref.init_noise_sigma
    start = x.clone()
    for t in ref.timesteps:
        kw = {"generator": generator} if generator is not None else {}
        x = ref.step(toy_network(ref.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return start, x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("cls, ours, steps", [
    ("LMSDiscreteScheduler", "k_lms", 10),
    ("KDPM2DiscreteScheduler", "k_dpm_2", 8),
    ("KDPM2AncestralDiscreteScheduler", "k_dpm_2_a", 8),
])
def test_k_samplers_match_diffusers(cls, ours, steps):
    ref = _scheduler(cls)
    ref.set_timesteps(steps)
    sigmas = ref.sigmas.float().unique_consecutive()  # KDPM2 lists each sigma twice (two half steps)
    assert len(sigmas) == steps + 1 and float(sigmas[-1]) == 0
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5) if ours.endswith("_a") else None
    start, want = _diffusers_loop(ref, noise, g)
    fn = SAMPLERS[canonical_sampler_name(ours)]
    got = fn(DiscreteSchedule().denoiser(toy_network), start, sigmas, disable=True, form=VE,
             generator=torch.Generator().manual_seed(5) if g is not None else None)
    assert (want - start).abs().max() > 0.1  # the latents moved
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dpmsolver_multistep_matches_diffusers():
    """kohya's "dpmsolver": DPMSolverMultistepScheduler(algorithm_type="dpmsolver", order 2, midpoint) ending at
    sigma_min (final_sigmas_type "sigma_min", >= 15 steps so every step after the first is second order). diffusers
    steps in the VP scaling x / sqrt(1 + sigma^2); ours in VE, so both ends are rescaled."""
    ref = _scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    ref.set_timesteps(16)
    sigmas = ref.sigmas.float()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(toy_network(ref.scale_model_input(x, t), t), t, x).prev_sample
    start = noise * (1 + float(sigmas[0]) ** 2) ** 0.5
    got = SAMPLERS[canonical_sampler_name("dpmsolver")](DiscreteSchedule().denoiser(toy_network), start, sigmas,
                                                        disable=True, form=VE)
    torch.testing.assert_close(got / (1 + float(sigmas[-1]) ** 2) ** 0.5, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [8, 9])
def test_dpmsingle_matches_diffusers(steps):
    """kohya's "dpmsingle": DPMSolverSinglestepScheduler defaults (dpmsolver++, order 2, final sigma 0)."""
    ref = _scheduler("DPMSolverSinglestepScheduler")
    ref.set_timesteps(steps)
    sigmas = ref.sigmas.float()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(toy_network(ref.scale_model_input(x, t), t), t, x).prev_sample
    start = noise * (1 + float(sigmas[0]) ** 2) ** 0.5
    got = SAMPLERS[canonical_sampler_name("dpmsingle")](DiscreteSchedule().denoiser(toy_network), start, sigmas,
                                                        disable=True, form=VE)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps, prediction, spacing", [(9, "epsilon", "leading"), (2, "epsilon", "leading"),
                                                        (1, "v_prediction", "trailing")])
def test_pndm_matches_diffusers_plms(steps, prediction, spacing):
    """kohya's "pndm": diffusers PNDMScheduler with the Stable Diffusion scheduler config (skip_prk_steps, steps_offset
    1, set_alpha_to_one false): PLMS with a pseudo improved Euler first step, N + 1 network calls; the last step ends
    at alphas_cumprod[0]'s sigma. diffusers steps in the VP scaling, ours in VE: both ends are rescaled. v-prediction
    only with one step: diffusers combines the raw v outputs of several steps (then converts with the current x), we
    combine the derivatives (eps), as the paper does; one step has nothing to combine."""
    ref = _scheduler("PNDMScheduler", skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                     prediction_type=prediction, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ab = ref.alphas_cumprod.double()
    ts = ref.timesteps.unique_consecutive()
    assert len(ts) == steps and len(ref.timesteps) == steps + (steps > 1)
    sigmas = torch.cat([((1 - ab[ts]) / ab[ts]).sqrt(), ((1 - ab[:1]) / ab[:1]).sqrt()]).float()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(toy_network(ref.scale_model_input(x, t), t), t, x).prev_sample
    calls = []

    def counted(x_in, t):
        calls.append(1)
        return toy_network(x_in, t)

    start = noise * (1 + float(sigmas[0]) ** 2) ** 0.5
    sched = DiscreteSchedule(prediction="v" if prediction == "v_prediction" else "eps")
    got = SAMPLERS[canonical_sampler_name("pndm")](sched.denoiser(counted), start, sigmas, disable=True, form=VE)
    assert len(calls) == len(ref.timesteps)
    assert (x - noise).abs().max() > 0.1
    torch.testing.assert_close(got / (1 + float(sigmas[-1]) ** 2) ** 0.5, x, rtol=1e-4, atol=1e-4)


def test_karras_sigmas_reach_prompts_and_previews(tmp_path, monkeypatch):
    """--sigmas in prompt lines, sigmas / use_karras_sigmas in TOML, [sample] sample_sigmas as the default; previews
    sample with it (the sigma kind handed to diffusion.sampling.sample)."""
    from diffusion import preview
    from diffusion.prompts import load_prompts
    (tmp_path / "p.txt").write_text("a cat --sigmas karras\na dog\n")
    assert [p.sigmas for p in load_prompts(str(tmp_path / "p.txt"), {})] == ["karras", "normal"]
    assert [p.sigmas for p in load_prompts(str(tmp_path / "p.txt"), {"sigmas": "karras"})] == ["karras", "karras"]
    (tmp_path / "p.toml").write_text('[[prompts]]\nprompt = "x"\nuse_karras_sigmas = true\n')
    assert load_prompts(str(tmp_path / "p.toml"), {})[0].sigmas == "karras"
    with pytest.raises(ValueError, match="sigmas"):
        load_prompts(str(tmp_path / "p.txt"), {"sigmas": "exponential"})
    seen = []
    monkeypatch.setattr(preview, "sample", lambda *a, **kw: seen.append(kw["sigma_kind"]) or torch.zeros(1, 4, 8, 8))
    import models
    comp = models.build("sdxl", "tiny")
    p = load_prompts(str(tmp_path / "p.txt"), {"width": 64, "height": 64, "steps": 2})[0]
    preview.generate(comp, p, "cpu")
    assert seen == ["karras"]
