"""Pipeline-level parity: `diffusion.sampling.sample` (schedule + sampler + CFG + network) against a sampling loop
built from diffusers' schedulers and models on the same tiny random weights, and determinism of
`diffusion.preview.generate`. fp32 on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from diffusion.preview import generate
from diffusion.prompts import SamplePrompt
from diffusion.sampling import sample
from tests.test_mmdit import _diffusers_model
from tests.test_mmdit import _randomize as _randomize_mmdit
from tests.test_unet_sdxl import PREFIX as UNET_PREFIX
from tests.test_unet_sdxl import _diffusers_config
from tests.test_unet_sdxl import _randomize as _randomize_unet

# SDXL scheduler as released (sgm configs/inference/sd_xl_base.yaml; diffusers' SDXL scheduler_config.json).
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      timestep_spacing="linspace", steps_offset=1)
# 999 / (steps - 1) is an integer (steps = 4, 10, 28), so every timestep is an integer and diffusers' linear
# interpolation of sigma between integer timesteps equals our (k-diffusion) log-sigma interpolation exactly.
STEPS = 10
CFG_SCALE = 5.0
SD3_SHIFT = 3.0
RTOL = 1e-4  # max |ours - ref| relative to max |ref|


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run many small ops: one intra-op thread is several times faster than two on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours - ref).abs().max().item() / ref.abs().max().item()


def _check_trajectory(ours: list[torch.Tensor], ref: list[torch.Tensor], final: torch.Tensor, ref_final: torch.Tensor,
                      steps: int) -> None:
    """Every intermediate latent and the final one agree; the message names the first step that diverges."""
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert _rel_err(a, b) <= RTOL, f"latents before step {i} differ: relative error {_rel_err(a, b):.2e}"
    assert final.shape == ref_final.shape and final.dtype == torch.float32
    err = _rel_err(final, ref_final)
    assert err <= RTOL, f"final latents differ: relative error {err:.2e}"


# ------------------------------------------------------------------------------------------------ SDXL


def _sdxl_inputs(comp):
    """Two prompts through our tiny text encoders (fed identically to both sides), per-sample sizes/crops
    (non-square latent 12x20 so an h/w swap shows), zeroed-text uncond as the original samplers do."""
    text = comp.encode_text(["a photo of a cat", "a red cube on a table"])
    neg = comp.uncond_text(text)
    original = torch.tensor([[1024.0, 768.0], [512.0, 640.0]])
    crop = torch.tensor([[0.0, 32.0], [16.0, 0.0]])
    target = torch.tensor([[96.0, 160.0], [96.0, 160.0]])
    noise = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(11))
    return text, neg, (original, crop, target), noise


def _diffusers_sdxl(comp, text, neg, sizes, noise, prediction_type: str, steps: int):
    """EulerDiscreteScheduler + UNet2DConditionModel loop as StableDiffusionXLPipeline runs it (CFG on the
    model output, input scaled by scale_model_input, start from noise * init_noise_sigma)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    dcfg = _diffusers_config(comp.unet.cfg)
    unet = UNet2DConditionModel(**dcfg).eval()
    sd = {UNET_PREFIX + k: v for k, v in comp.unet.state_dict().items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, dcfg), strict=True)

    sched = EulerDiscreteScheduler(**SDXL_SCHEDULER, prediction_type=prediction_type)
    sched.set_timesteps(steps)
    assert torch.equal(sched.timesteps, sched.timesteps.round())  # integer timesteps: see STEPS
    context = torch.cat([text["context"], neg["context"]])
    pooled = torch.cat([text["pooled"], neg["pooled"]])
    time_ids = torch.cat([torch.cat(sizes, dim=1)] * 2)  # (2B, 6): original (h, w), crop (top, left), target (h, w)
    latents = noise * sched.init_noise_sigma
    trajectory, cond_effect = [], []
    with torch.no_grad():
        for t in sched.timesteps:
            trajectory.append(latents)
            x_in = sched.scale_model_input(torch.cat([latents, latents]), t)
            out = unet(x_in, t, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            out_c, out_u = out.chunk(2)
            cond_effect.append(_rel_err(out_c, out_u))
            latents = sched.step(out_u + CFG_SCALE * (out_c - out_u), t, latents).prev_sample
    return latents, trajectory, sched, min(cond_effect)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers' scheduler
@pytest.mark.parametrize(("v_parameterization", "steps"), [(False, STEPS), (True, STEPS), (True, 4)],
                         ids=["eps", "v", "v-4steps"])
def test_sdxl_euler_cfg_matches_diffusers(v_parameterization: bool, steps: int) -> None:
    """Reference: diffusers EulerDiscreteScheduler (scaled_linear 0.00085..0.012, timestep_spacing="linspace",
    prediction_type epsilon / v_prediction) driving diffusers UNet2DConditionModel loaded with our weights
    through diffusers' convert_ldm_unet_checkpoint; diffusers embeds the raw time_ids itself, we build y
    with comp.conditioning. 10 Euler steps, CFG 5, the same initial noise; every step's latents compared."""
    pytest.importorskip("diffusers")
    comp = models.build("sdxl", "tiny", seed=0, v_parameterization=v_parameterization)
    _randomize_unet(comp.unet, seed=3)
    comp.unet.eval()
    text, neg, sizes, noise = _sdxl_inputs(comp)
    prediction_type = "v_prediction" if v_parameterization else "epsilon"
    ref, ref_traj, sched, cond_effect = _diffusers_sdxl(comp, text, neg, sizes, noise, prediction_type, steps)

    schedule = comp.sample_schedule()
    assert schedule.prediction == ("v" if v_parameterization else "eps")
    # diffusers builds betas and alpha_bar in float32, sgm (and we) in float64: 1 - alpha_bar near sigma_min
    # cancels, so the smallest sigma differs by ~1.3e-5 relative from rounding alone.
    torch.testing.assert_close(schedule.sigmas(steps), sched.sigmas.float(), rtol=5e-5, atol=0)

    cond = comp.conditioning(text, *sizes)
    uncond = comp.conditioning(neg, *sizes)
    traj: list[torch.Tensor] = []
    ours = sample(schedule, comp.network, noise, steps, "euler", "normal", cond=cond, uncond=uncond,
                  cfg_scale=CFG_SCALE, callback=lambda d: traj.append(d["x"].clone()))
    # not degenerate: the latents move, and cond vs uncond outputs differ far beyond the tolerance at every step
    assert ref.abs().max() > 0.1 and (ref - noise).abs().max() > 0.1 and cond_effect > 100 * RTOL
    _check_trajectory(traj, ref_traj, ours, ref, steps)


# ------------------------------------------------------------------------------------------------ SD3


def _diffusers_sd3(comp, text, neg, noise):
    """FlowMatchEulerDiscreteScheduler(shift=3) + SD3Transformer2DModel loop as StableDiffusion3Pipeline runs it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    net = _diffusers_model(comp.mmdit.cfg, comp.mmdit.state_dict())
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT)
    sched.set_timesteps(STEPS)
    context = torch.cat([text["context"], neg["context"]])
    pooled = torch.cat([text["pooled"], neg["pooled"]])
    latents = noise.clone()  # the pipeline starts from unit noise (sigma_max = 1)
    trajectory, cond_effect = [], []
    with torch.no_grad():
        for t in sched.timesteps:
            trajectory.append(latents)
            x_in = torch.cat([latents, latents])
            out = net(hidden_states=x_in, timestep=t.expand(x_in.shape[0]), encoder_hidden_states=context,
                      pooled_projections=pooled).sample
            out_c, out_u = out.chunk(2)
            cond_effect.append(_rel_err(out_c, out_u))
            latents = sched.step(out_u + CFG_SCALE * (out_c - out_u), t, latents).prev_sample
    return latents, trajectory, sched, min(cond_effect)


def test_sd3_euler_cfg_matches_diffusers() -> None:
    """Reference: diffusers FlowMatchEulerDiscreteScheduler(shift=3.0) driving diffusers SD3Transformer2DModel
    loaded with our weights through diffusers' convert_sd3_transformer_checkpoint_to_diffusers; prompt and
    (encoded) negative prompt embeddings from our tiny text encoders fed identically to both sides. 10 Euler
    steps, CFG 5, the same initial noise; every step's latents compared."""
    pytest.importorskip("diffusers")
    comp = models.build("sd3", "tiny", seed=0)
    _randomize_mmdit(comp.mmdit)
    comp.mmdit.eval()
    text = comp.encode_text(["a photo of a cat", "a red cube on a table"])
    neg = comp.encode_text(["", "blurry"])
    noise = torch.randn(2, comp.mmdit.cfg.in_channels, 12, 20, generator=torch.Generator().manual_seed(12))
    ref, ref_traj, sched, cond_effect = _diffusers_sd3(comp, text, neg, noise)

    schedule = comp.sample_schedule()
    assert schedule.shift == SD3_SHIFT
    torch.testing.assert_close(schedule.sigmas(STEPS), sched.sigmas.float(), rtol=1e-5, atol=1e-7)

    cond, uncond = comp.conditioning(text), comp.conditioning(neg)
    traj: list[torch.Tensor] = []
    ours = sample(schedule, comp.network, noise, STEPS, "euler", "normal", cond=cond, uncond=uncond,
                  cfg_scale=CFG_SCALE, callback=lambda d: traj.append(d["x"].clone()))
    assert ref.abs().max() > 0.1 and (ref - noise).abs().max() > 0.1 and cond_effect > 100 * RTOL
    _check_trajectory(traj, ref_traj, ours, ref, STEPS)


# ------------------------------------------------------------------------------------------------ preview


@pytest.mark.parametrize(("family", "sampler"), [("sdxl", "euler"), ("sdxl", "euler_ancestral"),
                                                 ("sd3", "euler"), ("sd3", "dpmpp_2m_sde")])
def test_generate_is_deterministic_given_seed(family: str, sampler: str) -> None:
    """Reference: the same call again (after disturbing the global RNG) must give the identical image; another
    seed must give a different one. Stochastic samplers included: their noise must come from the seed."""
    comp = models.build(family, "tiny", seed=0)
    comp.network.eval()

    calls: list[int] = []

    def image(seed: int) -> np.ndarray:
        calls.append(seed)
        torch.manual_seed(1000 + len(calls))  # a different global RNG state each call: the result must not depend on it
        p = SamplePrompt(prompt="a cat", width=64, height=96, seed=seed, scale=5.0, steps=4, sampler=sampler)
        img = generate(comp, p, "cpu")
        assert img.size == (64, 96)
        return np.asarray(img)

    first, again, other = image(1), image(1), image(2)
    assert np.array_equal(first, again), "the same seed gave a different image"
    assert not np.array_equal(first, other), "seeds 1 and 2 gave the same image"
