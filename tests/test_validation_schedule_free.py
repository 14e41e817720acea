"""Schedule-free optimizers (training/optim.py): built by kohya's names, switched between their training point y
and the point they mean x by OptimizerMode, and refused with a decaying LR schedule.

Reference: Defazio et al. 2024, "The Road Less Scheduled", eq. 1: y_t = (1 - beta1) z_t + beta1 x_t, so the
eval-mode weights are x = (y - (1 - beta1) z) / beta1 from the trained weights y and the optimizer's z."""
from __future__ import annotations

import types

import pytest
import torch

from training.optim import OptimizerMode, build_optimizer, check_schedule_free, is_schedule_free

schedulefree = pytest.importorskip("schedulefree")


def _cfg(name: str, **kw) -> types.SimpleNamespace:
    return types.SimpleNamespace(optimizer_type=name, optimizer_kwargs=kw, learning_rate=0.05, lr_scheduler="constant")


def _steps(opt: torch.optim.Optimizer, w: torch.nn.Parameter, mode: OptimizerMode, n: int) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
    for _ in range(n):
        mode.training()
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name,cls", [("AdamWScheduleFree", "AdamWScheduleFree"),
                                      ("SGDScheduleFree", "SGDScheduleFree"),
                                      ("radamschedulefree", "RAdamScheduleFree")])
def test_eval_mode_holds_the_averaged_weights(name, cls):
    w = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer([{"params": [w]}], _cfg(name))
    assert type(opt).__name__ == cls and is_schedule_free(name)
    mode = OptimizerMode(opt)
    assert mode.enabled
    _steps(opt, w, mode, 8)  # RAdam's rectification leaves the first steps at lr 0
    y, z = w.detach().clone(), opt.state[w]["z"].clone()
    beta1 = opt.param_groups[0]["betas"][0] if "betas" in opt.param_groups[0] else opt.param_groups[0]["momentum"]
    x_ref = (y - (1 - beta1) * z) / beta1
    assert not torch.allclose(x_ref, y)  # the two points differ: the test can fail
    with mode.evaluating():
        torch.testing.assert_close(w.detach(), x_ref, rtol=1e-5, atol=1e-6)
        with mode.evaluating():  # re-entrant: an export inside a validation block keeps x in place
            pass
        torch.testing.assert_close(w.detach(), x_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.detach(), y, rtol=1e-5, atol=1e-6)  # back to the training point


def test_prodigy_plus_schedule_free_has_modes():
    pytest.importorskip("prodigyplus")
    w = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer([{"params": [w]}], _cfg("ProdigyPlusScheduleFree"))
    mode = OptimizerMode(opt)
    assert mode.enabled
    _steps(opt, w, mode, 3)
    y = w.detach().clone()
    with mode.evaluating():
        assert not torch.equal(w.detach(), y)
    torch.testing.assert_close(w.detach(), y)


def test_plain_optimizer_mode_is_a_no_op():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer([{"params": [w]}], _cfg("AdamW"))
    mode = OptimizerMode(opt)
    assert not mode.enabled and not is_schedule_free("AdamW")
    _steps(opt, w, mode, 2)
    before = w.detach().clone()
    with mode.evaluating():
        assert torch.equal(w.detach(), before)


def test_decaying_schedule_is_refused():
    check_schedule_free(types.SimpleNamespace(optimizer_type="AdamWScheduleFree", lr_scheduler="constant_with_warmup"))
    check_schedule_free(types.SimpleNamespace(optimizer_type="AdamW", lr_scheduler="cosine"))
    with pytest.raises(ValueError, match="schedule-free"):
        check_schedule_free(types.SimpleNamespace(optimizer_type="schedulefree.AdamWScheduleFree",
                                                  lr_scheduler="cosine"))
