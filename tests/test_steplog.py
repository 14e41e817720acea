"""No host syncs in the training step: loss and gradient norm stay tensors until the log interval (training/steplog.py)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import pytest
import torch

from training.optim import LossRecorder
from training.steplog import StepLog, mean_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist")  # tensor -> host conversions


def test_mean_loss_and_steplog_equal_the_per_step_floats():
    """mean_loss is bit-identical to `m += float(l) / n`; StepLog feeds the recorder the same values in order."""
    g = torch.Generator().manual_seed(0)
    steps = [[torch.rand((), generator=g) * 3 for _ in range(n)] for n in (1, 3, 4, 7)]
    direct, logged = LossRecorder(stride=3, gamma=0.7), StepLog(LossRecorder(stride=3, gamma=0.7))
    for i, micro in enumerate(steps):
        want = 0.0
        for loss in micro:
            want += float(loss) / len(micro)
        got = mean_loss(micro)
        assert got.dtype == torch.float64 and float(got) == want
        direct.add(want)
        logged.add(got, torch.tensor(float(i), dtype=torch.float32))
    assert logged.flush() == (want, 3.0) and logged.recorder.state_dict() == direct.state_dict()
    assert logged.flush() == (want, 3.0) and logged.state_dict() == direct.state_dict()  # nothing pending: unchanged


def test_train_step_reads_the_host_once_per_step_and_logs_the_same_losses(tmp_path, monkeypatch):
    """In-process train.main, 3 steps x 2 micro-batches, logging every 3 steps: the project's own code converts a
    tensor to a host value only for the step's skip decision (one bool per optimizer step, however many
    micro-batches) and once per log interval (one tolist); the logged loss / average / moving average equal the
    per-step float computation they replace."""
    import train
    from data.demo import make_demo_dataset

    make_demo_dataset(str(tmp_path / "imgs"), n=4, size=(64, 64))
    sites: list[str] = []
    counting = [False]
    for name in READS:
        orig = getattr(torch.Tensor, name)

        def read(self, *a, _orig=orig, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if counting[0] and caller.startswith(ROOT) and "site-packages" not in caller:
                sites.append(f"{_name} {os.path.relpath(caller, ROOT)}:{sys._getframe(1).f_lineno}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    micro_losses: list[torch.Tensor] = []
    step_loss = train.micro_step_loss

    def micro_step_loss(*a, **k):
        counting[0] = True  # from the first step on
        loss = step_loss(*a, **k)
        micro_losses.append(loss.detach().clone())
        return loss

    monkeypatch.setattr(train, "micro_step_loss", micro_step_loss)
    steps, accum = 3, 2
    rc = train.main(["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'imgs'}']", "cache.cache_dir=",
                     f"output_dir={tmp_path / 'run'}", "data.resolution=64", "data.min_bucket_reso=64",
                     "data.max_bucket_reso=64", "data.batch_size=1", f"train.max_train_steps={steps}",
                     f"train.gradient_accumulation_steps={accum}", f"log.log_every_n_steps={steps}",
                     "log.loss_recorder_stride=2", "sample.sample_every_n_steps=0", "sample.sample_prompts=",
                     "save.save_every_n_steps=0", "save.save_state=false", "save.save_on_train_end=false",
                     "optimizer.lr_warmup_steps=0", "optimizer.max_grad_norm=1.0"])
    for h in list(logging.getLogger("sdtrain").handlers):  # train.main leaves its run log open
        h.close()
        logging.getLogger("sdtrain").removeHandler(h)
    assert rc == 0
    assert len(sites) == steps + 1, sites
    assert sum(s.startswith("__bool__ training/steppers.py") for s in sites) == steps  # Stepper.step's skip decision
    assert sum(s.startswith("tolist training/steplog.py") for s in sites) == 1  # the log interval's one read
    # the losses the run logged, from the micro-batch losses as the old per-step float code computed them
    assert len(micro_losses) == steps * accum
    rec, loss = LossRecorder(stride=2, gamma=0.9), math.nan
    for s in range(steps):
        loss = 0.0
        for v in micro_losses[s * accum:(s + 1) * accum]:
            loss += float(v) / accum
        rec.add(loss)
    with open(tmp_path / "run" / "logs" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    last = [r for r in rows if "loss" in r][-1]
    assert last["step"] == steps
    assert (last["loss"], last["loss_avg"], last["loss_ema"]) == (loss, rec.windowed_mean, rec.moving_average)
    assert last["grad_norm"] > 0 and math.isfinite(last["grad_norm"])


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_stepper_skips_a_non_finite_loss_or_norm(bad):
    """The decision taken from device tensors still skips: weights untouched, the norm returned as a tensor; the
    same gradients with a finite loss are stepped."""
    from core.config import Config, OptimizerConfig
    from training.steppers import make_stepper

    net = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    if bad == "grad":
        net.weight.grad[0, 0] = float("nan")
    cfg = Config(optimizer=OptimizerConfig(optimizer_type="SGD", max_grad_norm=0.0))
    stepper = make_stepper(cfg, opt, torch.device("cpu"))
    norm, applied = stepper.step(torch.tensor(bad == "grad"))
    assert not applied and torch.is_tensor(norm) and math.isfinite(float(norm)) == (bad == "loss")
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    if bad == "loss":
        norm, applied = stepper.step(torch.tensor(True))
        assert applied and float(norm) == pytest.approx(math.sqrt(3 + 3 + 1 + 1))  # |d/dW| = 1 per entry, bias 1
        assert not torch.equal(net.weight, before[0])
