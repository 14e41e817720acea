"""Fused backward pass, stochastic rounding and the optional optimizer packages (training/steppers.py, training/optim.py).

References: the ordinary `loss.backward(); optimizer.step()` on an identical copy of the model (bit-exact for SGD
and AdamW), live gradient bytes counted by hooks during backward, and the analytic mean of stochastic rounding.
"""

from __future__ import annotations

import contextlib
import copy
import types

import pytest
import torch
from torch import nn

from training.steppers import (FusedBackward, ParamStepper, check_fused_settings, make_stepper, per_parameter_step,
                        stochastic_round_to_bf16)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 10, generator=g)) for _ in range(n)]


def loss_of(net, x, y):
    return ((net(x) - y) ** 2).mean()


def optimizers():
    return {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2, foreach=True)}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_equals_ordinary_step_bit_exact(name):
    """3 steps: fused hooks (each parameter stepped in backward) == backward then optimizer.step(), bit for bit."""
    make = optimizers()[name]
    ref, fused = tiny_net(), tiny_net()
    opt_r, opt_f = make(ref.parameters()), make(fused.parameters())
    hooks = FusedBackward(opt_f, max_grad_norm=0.0, stochastic_rounding=False, seed=0)
    for x, y in batches(3):
        loss_of(ref, x, y).backward()
        norm_r = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), float("inf"))
        opt_r.step()
        opt_r.zero_grad(set_to_none=True)
        loss_of(fused, x, y).backward()
        norm_f, ok = hooks.finish()
        assert ok and norm_f == pytest.approx(float(norm_r), rel=1e-5)  # the logged global norm
        assert all(p.grad is None for p in fused.parameters())  # every gradient freed in the hooks
    for a, b in zip(ref.parameters(), fused.parameters()):
        assert torch.equal(a, b)


def test_peak_live_gradient_bytes_one_parameter():
    """Counted by a hook that fires before each fused step: the live gradients never exceed the largest parameter
    (the ordinary pass holds every gradient at once)."""
    def peak(fused: bool) -> int:
        net = tiny_net()
        params = list(net.parameters())
        seen = [0]

        def count(_p):
            seen[0] = max(seen[0], sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None))

        for p in params:  # registered first: runs before the stepping hook of the same parameter
            p.register_post_accumulate_grad_hook(count)
        opt = torch.optim.AdamW(params, lr=1e-3)
        if fused:
            FusedBackward(opt, max_grad_norm=0.0, stochastic_rounding=False, seed=0)
        x, y = batches(1)[0]
        loss_of(net, x, y).backward()
        return seen[0]

    net = tiny_net()
    largest = max(p.numel() * 4 for p in net.parameters())
    total = sum(p.numel() * 4 for p in net.parameters())
    assert peak(False) == total
    assert peak(True) == largest


def test_per_parameter_clipping_is_kohyas_rule():
    """max_grad_norm > 0 with fused backward clips each parameter's gradient to that norm on its own."""
    ref, fused = tiny_net(), tiny_net()
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.5)
    hooks = FusedBackward(torch.optim.SGD(fused.parameters(), lr=0.5), max_grad_norm=0.01, stochastic_rounding=False,
                          seed=0)
    x, y = batches(1)[0]
    loss_of(ref, x, y).backward()
    for p in ref.parameters():
        torch.nn.utils.clip_grad_norm_([p], 0.01)
    opt_r.step()
    loss_of(fused, x, y).backward()
    hooks.finish()
    for a, b in zip(ref.parameters(), fused.parameters()):
        assert torch.equal(a, b)


def test_non_finite_gradient_is_not_stepped():
    net = tiny_net()
    before = copy.deepcopy(net.state_dict())
    hooks = FusedBackward(torch.optim.SGD(net.parameters(), lr=0.1), max_grad_norm=0.0, stochastic_rounding=False,
                          seed=0)
    x, y = batches(1)[0]
    (loss_of(net, x, y) * float("nan")).backward()
    norm, ok = hooks.finish()
    assert not ok
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def _cfg(**train):
    t = dict(fused_backward_pass=True, gradient_accumulation_steps=1, mixed_precision="bf16", fsdp=False,
             full_bf16=False, stochastic_rounding=True)
    t.update(train)
    return types.SimpleNamespace(train=types.SimpleNamespace(**t), seed=0,
                                 optimizer=types.SimpleNamespace(optimizer_type="AdamW", max_grad_norm=0.0))


def test_settings_refused_with_a_reason():
    check_fused_settings(_cfg(), 1)
    for train, world, words in (({"gradient_accumulation_steps": 2}, 1, "gradient_accumulation_steps"),
                                ({"mixed_precision": "fp16"}, 1, "fp16"), ({}, 2, "one process")):
        with pytest.raises(ValueError, match=words):
            check_fused_settings(_cfg(**train), world)
    cfg = _cfg()
    cfg.optimizer.optimizer_type = "Prodigy"
    with pytest.raises(ValueError, match="couples"):
        check_fused_settings(cfg, 1)


def test_stochastic_rounding_unbiased_and_reproducible():
    """x between two bf16 values rounds up with probability (x - lo) / ulp: the mean is x; the same seed gives the
    same bits, another seed other bits; exact bf16 values are kept."""
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    x = torch.full((200_000,), 1.0 + 0.3 * ulp)
    r = stochastic_round_to_bf16(x, torch.Generator().manual_seed(7))
    assert set(r.float().unique().tolist()) == {1.0, 1.0 + ulp}
    frac_up = (r.float() > 1.0).float().mean().item()
    assert abs(frac_up - 0.3) < 0.005  # binomial sd 0.001
    assert torch.equal(r, stochastic_round_to_bf16(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(r, stochastic_round_to_bf16(x, torch.Generator().manual_seed(8)))
    exact = torch.tensor([1.0, -2.5, 0.0, 2.0**127, float("inf")])
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)
    neg = stochastic_round_to_bf16(-x, torch.Generator().manual_seed(7)).float()
    assert abs(neg.mean().item() + x[0].item()) < 0.005 * ulp * 2


def test_bf16_weights_keep_small_updates_with_stochastic_rounding():
    """SGD on a bf16 weight with updates of a quarter ulp: nearest rounding never moves it, stochastic rounding
    moves it by the sum of the updates on average; the same seed repeats the run exactly."""
    def run(sr: bool, seed: int = 0) -> torch.Tensor:
        w = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = torch.optim.SGD([w], lr=2.0**-9)  # update = lr * grad = ulp / 4
        stepper = ParamStepper(opt, stochastic_rounding=sr, seed=seed)
        for _ in range(40):
            w.grad = torch.full_like(w, -1.0)
            per_parameter_step(opt, stepper, [w])
        return w.detach().float()

    assert torch.equal(run(False), torch.ones(4096))
    moved = run(True)
    assert moved.mean().item() == pytest.approx(1.0 + 40 * 2.0**-9, abs=2e-3)
    assert torch.equal(moved, run(True)) and not torch.equal(moved, run(True, seed=1))


def test_train_helpers_fused_equal_ordinary_on_tiny_sdxl():
    """train.py's own accumulate_gradients + the run's stepper on the tiny SDXL UNet: fused backward == ordinary step
    (AdamW as built for the run, no clipping)."""
    import models
    import train
    from core.config import Config, LossConfig, OptimizerConfig, TrainConfig
    from diffusion.objectives import build_objective
    from training.optim import build_optimizer
    from training.trainable import Trainee, trained_param_groups

    comp = models.build("sdxl", "tiny", parts=["unet", "te1", "te2"], seed=0)
    start = {k: v.clone() for k, v in comp.unet.state_dict().items()}
    batch = {"latents": torch.randn(1, 4, 8, 8), "captions": ["a red circle"],
             "original_size": torch.tensor([[64, 64]]), "crop_top_left": torch.zeros(1, 2, dtype=torch.long),
             "target_size": torch.tensor([[64, 64]]), "loss_weight": torch.ones(1)}
    out = []
    for fused in (False, True):
        comp.unet.load_state_dict(start)
        cfg = Config(optimizer=OptimizerConfig(optimizer_type="AdamW", learning_rate=1e-3, max_grad_norm=0.0),
                     train=TrainConfig(fused_backward_pass=fused))
        trainee = Trainee(comp, train_text_encoder=False)
        opt = build_optimizer(trained_param_groups(trainee, cfg.optimizer), cfg.optimizer)
        stepper = make_stepper(cfg, opt, torch.device("cpu"))
        for _ in range(2):
            gens = [torch.Generator().manual_seed(3)]
            loss = train.accumulate_gradients(trainee, comp, build_objective("ddpm", LossConfig()), [batch],
                                              torch.device("cpu"), gens, contextlib.nullcontext, stepper)
            norm, applied = stepper.step(torch.isfinite(loss))
            opt.zero_grad(set_to_none=True)
            assert applied and norm > 0
        stepper.close()
        out.append({k: v.clone() for k, v in comp.unet.state_dict().items()})
    assert any(not torch.equal(out[0][k], start[k]) for k in start)
    assert all(torch.equal(out[0][k], out[1][k]) for k in start)


# ---------------------------------------------------------------------------------------------------------------------
# The optimizer packages wired by name (requirements-optional.txt), the real ones


@pytest.mark.parametrize("name,module", [("Lion", "lion_pytorch"), ("CAME", "came_pytorch"),
                                         ("AdamW8bit", "bitsandbytes"), ("Prodigy", "prodigyopt"),
                                         ("lion_pytorch.Lion", "lion_pytorch")])
def test_optional_optimizer_packages(name, module):
    """build_optimizer by name gives the package's class; 20 steps lower a regression loss; per-parameter
    optimizers give the same weights stepped inside backward (fused) as stepped after it."""
    pkg = pytest.importorskip(module)
    from training.optim import build_optimizer

    lr = {"Prodigy": 1.0, "AdamW8bit": 1e-2}.get(name, 1e-3)
    cfg = types.SimpleNamespace(optimizer_type=name, optimizer_kwargs={}, learning_rate=lr)
    net = tiny_net()
    opt = build_optimizer([{"params": list(net.parameters())}], cfg)
    assert type(opt).__module__.split(".")[0] == pkg.__name__
    data = batches(1) * 20
    first = loss_of(net, *data[0]).item()
    for x, y in data:
        loss_of(net, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss_of(net, *data[0]).item() < first
    if name == "Prodigy":
        with pytest.raises(ValueError, match="couples"):
            ParamStepper(opt)
        return
    ref, fused = tiny_net(), tiny_net()
    opt_r = build_optimizer([{"params": list(ref.parameters())}], cfg)
    hooks = FusedBackward(build_optimizer([{"params": list(fused.parameters())}], cfg), max_grad_norm=0.0,
                          stochastic_rounding=False, seed=0)
    for x, y in batches(2):
        loss_of(ref, x, y).backward()
        opt_r.step()
        opt_r.zero_grad(set_to_none=True)
        loss_of(fused, x, y).backward()
        hooks.finish()
    for a, b in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
