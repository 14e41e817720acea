"""Tests for training/optim.py (param groups, optimizers, LR schedules, LossRecorder) and training/ema.py.

References: diffusers.optimization.get_scheduler and diffusers.training_utils.EMAModel, transformers'
Adafactor, and closed-form answers computed here.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types

import pytest
import torch
from torch import nn

from training.ema import EMA
from training.optim import (
    Adafactor,
    LossRecorder,
    build_optimizer,
    build_param_groups,
    build_param_groups_for_models,
    build_scheduler,
)

from core.config import OptimizerConfig


def cfg(**kw) -> OptimizerConfig:
    return dataclasses.replace(OptimizerConfig(), **kw)


class Tiny(nn.Module):
    """Names shaped like UNet keys, for regex groups."""

    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.middle_block = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Parameter groups


def test_param_groups_first_match_wins_and_base_group():
    """Regex semantics (re.search, first pattern wins, unmatched -> base LR), checked by parameter identity."""
    m = Tiny()
    c = cfg(param_groups=[
        {"pattern": r"input_blocks\.0\.", "lr": 1e-6},
        {"pattern": r"input_blocks|middle", "lr": 2e-6, "weight_decay": 0.0},
    ])
    groups = build_param_groups(list(m.named_parameters()), c, base_lr=1e-4)
    by_name = {g["name"]: g for g in groups}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert by_name["base"]["lr"] == 1e-4 and ids(by_name["base"]["params"]) == ids(m.out.parameters())
    g0 = by_name[r"input_blocks\.0\."]
    assert g0["lr"] == 1e-6 and ids(g0["params"]) == ids(m.input_blocks[0].parameters())
    g1 = by_name[r"input_blocks|middle"]
    assert g1["lr"] == 2e-6 and g1["weight_decay"] == 0.0
    assert ids(g1["params"]) == ids(m.input_blocks[1].parameters()) | ids(m.middle_block.parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_param_groups_errors_and_frozen():
    """A pattern matching nothing, a bad regex, or an unknown key is a ValueError naming it; frozen params skipped."""
    m = Tiny()
    named = list(m.named_parameters())
    with pytest.raises(ValueError, match="output_blocks"):
        build_param_groups(named, cfg(param_groups=[{"pattern": "output_blocks", "lr": 1e-6}]), 1e-4)
    with pytest.raises(ValueError, match="not a valid regex"):
        build_param_groups(named, cfg(param_groups=[{"pattern": "(", "lr": 1e-6}]), 1e-4)
    with pytest.raises(ValueError, match="unknown keys"):
        build_param_groups(named, cfg(param_groups=[{"pattern": "out", "learning_rate": 1e-6}]), 1e-4)
    m.out.requires_grad_(False)
    groups = build_param_groups(list(m.named_parameters()), cfg(), 1e-4)
    assert len(groups) == 1 and len(groups[0]["params"]) == 6
    with pytest.raises(ValueError, match="match no trainable"):  # only frozen parameters match
        build_param_groups(list(m.named_parameters()), cfg(param_groups=[{"pattern": "^out", "lr": 1.0}]), 1e-4)


def test_param_groups_for_models():
    """Several models, each with its base LR; a pattern only has to match in one of them."""
    unet, te = Tiny(), nn.Linear(2, 2)
    groups = build_param_groups_for_models(
        {"unet": list(unet.named_parameters()), "te1": list(te.named_parameters())},
        cfg(param_groups=[{"pattern": "middle", "lr": 3e-6}]),
        {"unet": 1e-4, "te1": 1e-5},
    )
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("unet", 1e-4, 6), ("unet:middle", 3e-6, 2), ("te1", 1e-5, 2)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Optimizers


def test_build_optimizer_adamw_sgd_and_class_path():
    """torch classes with the configured LR and kwargs; fused AdamW only for CUDA (CPU here -> not fused)."""
    m = Tiny()
    groups = build_param_groups(list(m.named_parameters()), cfg(), 1e-3)
    opt = build_optimizer(groups, cfg(optimizer_type="AdamW", learning_rate=1e-3,
                                      optimizer_kwargs={"weight_decay": 0.05, "betas": (0.8, 0.9)}))
    assert type(opt) is torch.optim.AdamW and not opt.defaults.get("fused")
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    sgd = build_optimizer(groups, cfg(optimizer_type="sgd", optimizer_kwargs={"momentum": 0.9}))
    assert type(sgd) is torch.optim.SGD
    radam = build_optimizer(groups, cfg(optimizer_type="torch.optim.RAdam", learning_rate=2e-3))
    assert type(radam) is torch.optim.RAdam and radam.defaults["lr"] == 2e-3
    assert radam.param_groups[0]["lr"] == 1e-3  # the group's own LR wins over the default
    assert set(groups[0]) == {"params", "lr", "name"}  # the caller's dicts are not filled with defaults
    assert type(build_optimizer(groups, cfg(optimizer_type="Adafactor"))) is Adafactor


def test_adamw_on_cpu_uses_foreach_unless_set():
    """CPU parameters: AdamW gets foreach=True (torch's CPU default is the per-tensor loop); a user's foreach or
    fused wins. Reference: torch's own single-tensor AdamW (foreach=False) gives the same step."""
    torch.manual_seed(0)
    m, ref = Tiny(), Tiny()
    ref.load_state_dict(m.state_dict())
    opt = build_optimizer(build_param_groups(list(m.named_parameters()), cfg(), 1e-2),
                          cfg(optimizer_type="AdamW", optimizer_kwargs={"weight_decay": 0.1}))
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    x = torch.randn(4, 3)
    for _ in range(3):
        for model, o in ((m, opt), (ref, ref_opt)):
            o.zero_grad()
            model.out(model.middle_block(model.input_blocks[1](model.input_blocks[0](x)))).square().mean().backward()
            o.step()
    for (name, a), b in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    groups = build_param_groups(list(m.named_parameters()), cfg(), 1e-3)
    for kw in ({"foreach": False}, {"fused": False}):
        user = build_optimizer(groups, cfg(optimizer_type="AdamW", optimizer_kwargs=kw))
        assert not user.defaults["foreach"] and not user.defaults["fused"]


def test_build_optimizer_errors(monkeypatch):
    """Unknown names list the built-ins; a missing package names its pip package; found packages are used."""
    groups = [{"params": [nn.Parameter(torch.zeros(2))]}]
    with pytest.raises(ValueError, match="AdamW8bit.*Prodigy.*Adafactor"):
        build_optimizer(groups, cfg(optimizer_type="Adam9000"))
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install lion-pytorch"):
        build_optimizer(groups, cfg(optimizer_type="Lion"))
    with pytest.raises(ImportError, match="no_such_mod"):
        build_optimizer(groups, cfg(optimizer_type="no_such_mod.Opt"))
    fake = types.ModuleType("prodigyopt")
    fake.Prodigy = torch.optim.SGD  # stand-in class: checks only the import path and arguments
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    opt = build_optimizer(groups, cfg(optimizer_type="Prodigy", learning_rate=1.0))
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 1.0


@pytest.mark.parametrize("beta1, wd", [(None, 0.0), (0.9, 0.01)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adafactor_matches_transformers(beta1, wd, dtype):
    """transformers.optimization.Adafactor(relative_step=False, scale_parameter=False, warmup_init=False) oracle."""
    optimization = pytest.importorskip("transformers.optimization")
    shapes = [(6, 5), (5,), (2, 3, 4)]  # factored 2-D, unfactored 1-D, factored 3-D (last two dims)
    init = [torch.randn(s).to(dtype) for s in shapes]
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(5)]
    ours = [nn.Parameter(x.clone()) for x in init]
    ref = [nn.Parameter(x.clone()) for x in init]
    opt = Adafactor(ours, lr=1e-2, beta1=beta1, weight_decay=wd)
    ref_opt = optimization.Adafactor(ref, lr=1e-2, beta1=beta1, weight_decay=wd, relative_step=False,
                                     scale_parameter=False, warmup_init=False)
    for step_grads in grads:
        for p, q, g in zip(ours, ref, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q, x in zip(ours, ref, init):
        assert not torch.equal(p, x)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adafactor_rejects_relative_step():
    """Unsupported transformers modes raise instead of silently changing behaviour."""
    with pytest.raises(ValueError, match="relative_step=False"):
        Adafactor([nn.Parameter(torch.zeros(2))], lr=1e-3, relative_step=True)


# ---------------------------------------------------------------------------------------------------------------------
# LR schedules


SCHEDULE_CASES = [
    ("constant", 0, 1, 1.0),
    ("constant_with_warmup", 7, 1, 1.0),
    ("linear", 0, 1, 1.0),
    ("linear", 10, 1, 1.0),
    ("cosine", 10, 1, 1.0),
    ("cosine_with_restarts", 5, 3, 1.0),
    ("polynomial", 10, 1, 2.0),
    ("polynomial", 0, 1, 0.5),
]


@pytest.mark.parametrize("name, warmup, cycles, power", SCHEDULE_CASES)
def test_scheduler_curves_match_diffusers(name, warmup, cycles, power):
    """diffusers.optimization.get_scheduler with the same arguments, LR of two groups at every step (incl. past end)."""
    optimization = pytest.importorskip("diffusers.optimization")
    total = 60

    def make():
        ps = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
        return torch.optim.SGD([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 3e-4}], lr=1e-3)

    ours_opt, ref_opt = make(), make()
    c = cfg(lr_scheduler=name, lr_warmup_steps=warmup, lr_scheduler_num_cycles=cycles, lr_scheduler_power=power)
    ours = build_scheduler(ours_opt, c, total)
    ref = optimization.get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=total,
                                     num_cycles=cycles, power=power)
    for _ in range(total + 5):
        assert ours.get_last_lr() == pytest.approx(ref.get_last_lr(), rel=1e-12, abs=1e-15)
        ours_opt.step(), ref_opt.step()
        ours.step(), ref.step()


def test_scheduler_errors():
    """Unknown schedule names, warmup past the end and warmup on 'constant' are errors."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="cosine_with_restarts"):
        build_scheduler(opt, cfg(lr_scheduler="cosine_annealing"), 10)
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        build_scheduler(opt, cfg(lr_scheduler="linear", lr_warmup_steps=20), 10)
    with pytest.raises(ValueError, match="constant_with_warmup"):
        build_scheduler(opt, cfg(lr_scheduler="constant", lr_warmup_steps=2), 10)


# ---------------------------------------------------------------------------------------------------------------------
# LossRecorder


def test_loss_recorder_math_and_state():
    """Windowed mean = mean of the last `stride` values; EMA recurrence from the first value (computed here)."""
    values = [math.sin(i) + 2 for i in range(37)]
    rec = LossRecorder(stride=10, gamma=0.8)
    assert math.isnan(rec.windowed_mean) and math.isnan(rec.moving_average)
    ema = None
    for i, v in enumerate(values):
        rec.add(v)
        ema = v if ema is None else 0.8 * ema + 0.2 * v
        window = values[max(0, i - 9): i + 1]
        assert rec.windowed_mean == pytest.approx(sum(window) / len(window))
        assert rec.moving_average == pytest.approx(ema)
    other = LossRecorder(stride=10, gamma=0.8)
    other.load_state_dict(rec.state_dict())
    rec.add(5.0), other.add(5.0)
    assert other.windowed_mean == rec.windowed_mean and other.moving_average == rec.moving_average
    shorter = LossRecorder(stride=3, gamma=0.8)  # a changed stride on resume keeps the newest values
    shorter.load_state_dict(rec.state_dict())
    assert shorter.windowed_mean == pytest.approx((values[-2] + values[-1] + 5.0) / 3)
    with pytest.raises(ValueError, match="non-finite"):
        rec.add(float("nan"))


# ---------------------------------------------------------------------------------------------------------------------
# EMA


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_ema_warmup_matches_diffusers_emamodel():
    """diffusers EMAModel(use_ema_warmup, inv_gamma=10, power=0.75): its n-th step equals our update(step=n-1)."""
    training_utils = pytest.importorskip("diffusers.training_utils")
    m = Tiny()
    ref = training_utils.EMAModel(m.parameters(), decay=0.99, use_ema_warmup=True, inv_gamma=10, power=0.75)
    ema = EMA(m, decay=0.99, warmup=True)
    for step in range(8):
        perturb(m, step)
        ema.update(m, step)
        ref.step(m.parameters())
    for (n, _), s in zip(m.named_parameters(), ref.shadow_params):
        torch.testing.assert_close(ema.state_dict()[n], s, rtol=1e-6, atol=1e-6)


def test_ema_constant_decay_update_every_and_dtype(monkeypatch):
    """Constant decay recurrence computed here; update_every skips steps; fp32 shadow for a bf16 model."""
    monkeypatch.setattr("training.ema.UPDATE_CHUNK_NUMEL", 10)  # several chunks even for this tiny model
    m = Tiny().to(torch.bfloat16)
    ema = EMA(m, decay=0.9, update_every=2)
    expected = {n: p.float().clone() for n, p in m.named_parameters()}
    for step in range(1, 7):
        perturb(m, step)
        ema.update(m, step)
        if step % 2 == 0:
            for n, p in m.named_parameters():
                expected[n] = 0.9 * expected[n] + 0.1 * p.float()
    for n, v in ema.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, expected[n], rtol=1e-6, atol=1e-6)


def test_ema_swap_restores_and_state_roundtrip():
    """swapped_into shows EMA weights inside and restores the trained ones after, even on an exception."""
    m = Tiny()
    ema = EMA(m, decay=0.5)
    perturb(m, 1)
    ema.update(m, 1)
    perturb(m, 2)
    trained = {n: p.clone() for n, p in m.named_parameters()}
    with ema.swapped_into(m):
        for n, p in m.named_parameters():
            assert torch.equal(p, ema.state_dict()[n])
    for n, p in m.named_parameters():
        assert torch.equal(p, trained[n])
    with pytest.raises(RuntimeError), ema.swapped_into(m):
        raise RuntimeError("sampling failed")
    for n, p in m.named_parameters():
        assert torch.equal(p, trained[n])

    other = EMA(Tiny())
    other.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    for k, v in ema.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"out.weight": torch.zeros(2, 3)})
    with pytest.raises(KeyError, match="unwrapped"):
        ema.update(nn.Sequential(m), 3)  # names gain a "0." prefix


def test_bitsandbytes_optimizer_with_fsdp_is_one_line_before_anything_is_written(tmp_path):
    """Was: configs/sdxl_lora.toml (AdamW8bit) with train.fsdp = true failed at the first step with a traceback
    (bitsandbytes' kernels cannot step FSDP2's DTensor parameters)."""
    import train
    from training.optim import check_fsdp_optimizer
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["configs/sdxl_lora.toml", "train.fsdp=true", "model.pretrained_model_name_or_path=", "model.vae=",
                    "model.model_preset=tiny", f"output_dir={out}"])
    msg = str(e.value.code)
    assert msg.startswith("config error: configs/sdxl_lora.toml: optimizer.optimizer_type = 'AdamW8bit' (bitsandbytes) "
                          "does not work with "
                          "train.fsdp = true") and 'use optimizer_type = "AdamW"' in msg and "\n" not in msg, msg
    assert not out.exists()
    for name in ("Lion8bit", "bitsandbytes.optim.PagedAdamW"):
        with pytest.raises(ValueError, match="bitsandbytes"):
            check_fsdp_optimizer(cfg(optimizer_type=name), True)
    for name, fsdp in (("AdamW8bit", False), ("AdamW", True), ("torch.optim.RAdam", True)):
        check_fsdp_optimizer(cfg(optimizer_type=name), fsdp)
