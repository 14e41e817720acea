"""train.py features: gradient accumulation, non-finite losses, training without a cache, text-encoder training
(1 and 2 processes), bf16 / full_bf16, EMA export, regex LR groups, start-up config errors.

Run on the tiny SDXL preset (random weights) with a small generated dataset; the end-to-end cases call
train.main / cache.main in this process (an interpreter start and torch import cost seconds each), and the real
launchers (torchrun with gloo, and plain `python train.py` for the start-up errors' output) where two processes
or the printed output are what is tested. References are analytic: one batch of 4 vs 4 accumulated
micro-batches of 1 with the same noise (gradients are sums, so the two updates must agree), weights compared with
the state saved before, and the optimizer's own learning rates.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from helpers import main_ok, run_workers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("feat")
    make_demo_dataset(str(root / "data"), n=8, size=(64, 64))
    main_ok("cache", ["configs/demo.toml", f"data.image_dirs=['{root / 'data'}']",
          f"cache.cache_dir={root / 'cache'}", "data.resolution=64", "data.max_bucket_reso=128"])
    return root


def args(root, out, steps, *extra):
    return ["configs/demo.toml", f"data.image_dirs=['{root / 'data'}']", f"cache.cache_dir={root / 'cache'}",
            f"output_dir={out}", f"train.max_train_steps={steps}", "optimizer.lr_warmup_steps=0",
            "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0", "save.save_every_n_steps=0",
            "data.batch_size=2", "data.resolution=64", "data.max_bucket_reso=128", *extra]


def _train(*a, expect=0):
    """train.main in this process; returns what it logged (the run folder's logs/train.log)."""
    return main_ok("train", a, log_dir=a[3].split("=", 1)[1] + "/logs", expect=expect)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation (function level, the loop's own helpers)


class _FixedNoise:
    """Objective wrapper: sample i of the epoch always gets noise[i] and t[i], however it is batched."""

    def __init__(self, inner, noise, t):
        self.inner, self.noise_bank, self.t_bank, self.pos = inner, noise, t, 0

    def noise(self, x0, generator=None):
        from diffusion.objectives import NoisedBatch
        n = x0.shape[0]
        eps, t = self.noise_bank[self.pos:self.pos + n], self.t_bank[self.pos:self.pos + n]
        self.pos += n
        a = self.inner.alphas_cumprod[t].view(-1, 1, 1, 1)
        return NoisedBatch(x_t=a.sqrt() * x0 + (1 - a).sqrt() * eps, t=t.float(), target=eps, timesteps=t)

    def loss(self, pred, nb, weight=None, mask=None):
        return self.inner.loss(pred, nb, weight, mask=mask)


def test_gradient_accumulation_equals_one_big_batch():
    """4 micro-batches of 1 accumulated == 1 batch of 4 (same noise per sample): same SGD update (analytic: the
    accumulated gradient is the mean of per-sample gradients, as is the big batch's)."""
    import contextlib

    import models
    import train
    from core.config import Config, OptimizerConfig, LossConfig
    from diffusion.objectives import build_objective
    from training.optim import build_optimizer
    from training.steppers import make_stepper
    from training.trainable import Trainee, trained_param_groups

    torch.manual_seed(0)
    comp = models.build("sdxl", "tiny", parts=["unet", "te1", "te2"], seed=0)
    start = {k: v.clone() for k, v in comp.unet.state_dict().items()}
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    batch = {"latents": torch.randn(4, 4, 8, 8), "captions": captions,
             "original_size": torch.tensor([[64, 64]] * 4), "crop_top_left": torch.zeros(4, 2, dtype=torch.long),
             "target_size": torch.tensor([[64, 64]] * 4), "loss_weight": torch.tensor([1.0, 0.5, 1.0, 2.0])}
    singles = [{k: (v[i:i + 1] if torch.is_tensor(v) else v[i:i + 1]) for k, v in batch.items()} for i in range(4)]
    noise, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 300, 600, 950])
    cfg = Config(optimizer=OptimizerConfig(optimizer_type="SGD", learning_rate=0.5, max_grad_norm=1.0))
    results = []
    for micro in ([batch], singles):
        comp.unet.load_state_dict(start)
        comp.unet.zero_grad(set_to_none=True)
        trainee = Trainee(comp, train_text_encoder=False)
        objective = _FixedNoise(build_objective("ddpm", LossConfig()), noise, t)
        opt = build_optimizer(trained_param_groups(trainee, cfg.optimizer), cfg.optimizer)
        stepper = make_stepper(cfg, opt, torch.device("cpu"))
        gens = [torch.Generator().manual_seed(0) for _ in micro]
        loss = train.accumulate_gradients(trainee, comp, objective, micro, torch.device("cpu"), gens,
                                          contextlib.nullcontext, stepper)
        norm, applied = stepper.step(torch.isfinite(loss))
        assert applied and norm > 0
        results.append((float(loss), float(norm), {k: v.clone() for k, v in comp.unet.state_dict().items()}))
    (loss_b, norm_b, w_b), (loss_a, norm_a, w_a) = results
    # the big batch's loss is the weighted per-sample mean, as is the mean of the four micro losses
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-4)
    moved = max((w_b[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4
    for k in start:
        torch.testing.assert_close(w_a[k] - start[k], w_b[k] - start[k], atol=1e-6 * max(moved, 1), rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite losses


@pytest.mark.slow
def test_nonfinite_loss_skips_steps_then_saves_and_stops(dataset, tmp_path):
    """learning_rate = 1e30: step 1 is applied and blows the weights up; the next losses are NaN/Inf. They must
    be skipped (weights = those exported at step 1) and after max_bad_steps the run saves a state and exits 3."""
    out = tmp_path / "run"
    log = _train(*args(dataset, out, 20, "optimizer.learning_rate=1e30", "optimizer.max_grad_norm=0",
                       "train.max_bad_steps=3", "save.save_every_n_steps=1", "save.save_precision=fp32"), expect=3)
    assert "3 consecutive steps with a non-finite loss or gradient" in log
    assert log.count("step skipped") == 3
    st = out / "state" / "step-00000001"
    with open(st / "progress.json") as f:
        progress = json.load(f)
    assert progress["step"] == 1 and progress["bad_steps"] == 3
    trained = load_file(str(st / "trained.safetensors"))
    exported = load_file(str(out / "models" / "demo-step00000001.safetensors"))
    prefix = "model.diffusion_model."
    net = {k[len("network."):]: v for k, v in trained.items() if k.startswith("network.")}
    assert net and all(torch.equal(v, exported[prefix + k]) for k, v in net.items())
    with open(out / "logs" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1]


# ---------------------------------------------------------------------------------------------------------------------
# Without a cache; bf16; EMA; regex LR groups


@pytest.mark.slow
def test_no_cache_bf16_full_bf16_ema_and_param_groups(dataset, tmp_path):
    """Images encoded on the fly (cache_dir = ""), full_bf16 under bf16 autocast (stochastic rounding) with the fused
    backward pass, EMA export, regex LR groups."""
    out = tmp_path / "run"
    log = _train(*args(dataset, out, 3, "cache.cache_dir=", "train.mixed_precision=bf16", "train.full_bf16=true",
                       "train.fused_backward_pass=true",
                       "train.use_ema=true", "train.ema_decay=0.5", "save.save_precision=fp32",
                       "optimizer.param_groups=[{pattern='^input_blocks\\.', lr=1e-5}, {pattern='^out\\.', lr=2e-4}]"))
    assert "optimizer group network:^input_blocks\\.: " in log and "lr 1e-05" in log
    assert "optimizer group network:^out\\.: " in log and "lr 0.0002" in log
    import models
    comp = models.load(str(out / "models" / "demo.safetensors"))
    ema = models.load(str(out / "models" / "demo-ema.safetensors"))
    assert comp.vae is not None and comp.te1 is not None and comp.te2 is not None  # a whole checkpoint
    w, e = comp.unet.state_dict(), ema.unet.state_dict()
    assert w.keys() == e.keys() and any(not torch.equal(w[k], e[k]) for k in w)
    with open(out / "logs" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)  # the fused pass reports the global norm
    assert os.path.isfile(out / "state" / "dataset_index.npz")  # the index of an uncached run lives with the run


@pytest.mark.slow
def test_bf16_autocast_with_fp32_weights(dataset, tmp_path):
    out = tmp_path / "run"
    _train(*args(dataset, out, 2, "train.mixed_precision=bf16"))
    import models
    assert models.load(str(out / "models" / "demo.safetensors")).unet is not None


# ---------------------------------------------------------------------------------------------------------------------
# Text-encoder training


def _te_keys(sd):
    return {k: v for k, v in sd.items() if k.startswith("conditioner.embedders.")}


@pytest.mark.slow
def test_train_text_encoder_two_processes(dataset, tmp_path):
    """2-process DDP (gloo; the workers started with torchrun's environment) with the text encoders trained at their own LRs: they change, and the export holds them."""
    import models
    out = tmp_path / "run"
    res = run_workers(["train.py", *args(dataset, out, 2, "train.train_text_encoder=true",
                                         "optimizer.learning_rate_te1=1e-3", "optimizer.learning_rate_te2=2e-3",
                                         "save.save_precision=fp32")])
    assert "optimizer group te1: " in res.stderr and "lr 0.001" in res.stderr
    assert "optimizer group te2: " in res.stderr and "lr 0.002" in res.stderr
    start = models.build("sdxl", "tiny", seed=0).export_state_dict()
    saved = load_file(str(out / "models" / "demo.safetensors"))
    changed = [k for k, v in _te_keys(saved).items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any(k.startswith("conditioner.embedders.0.") for k in changed)
    assert any(k.startswith("conditioner.embedders.1.") for k in changed)
    vae = [k for k in saved if k.startswith("first_stage_model.")]
    assert vae and all(torch.equal(saved[k], start[k]) for k in vae)  # frozen parts unchanged


# ---------------------------------------------------------------------------------------------------------------------
# Start-up errors


@pytest.mark.parametrize("extra, message", [
    (["train.full_fp16=true", "train.mixed_precision=bf16"], "full_fp16 requires"),
    (["train.max_train_steps=-5"], "max_train_steps"),
    (["train.use_ema=true", "train.ema_decay=1.0"], "ema_decay"),
    (["optimizer.lr_scheduler=constant", "optimizer.lr_warmup_steps=5"], "constant_with_warmup"),
    (["loss.timestep_sampler_type=mode"], "not available for SDXL"),
    (["model.model_preset=nope"], "preset"),
    (["train.fused_backward_pass=true", "train.gradient_accumulation_steps=2"], "gradient_accumulation_steps = 1"),
])
def test_impossible_settings_fail_before_loading(tmp_path, capsys, extra, message):
    import train
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["configs/demo.toml", f"output_dir={out}", "optimizer.lr_scheduler=constant_with_warmup", *extra])
    text = f"{e.value.code} {capsys.readouterr().err}"
    assert e.value.code not in (0, None) and "config error" in text and message in text, text
    assert not out.exists()  # nothing created, nothing loaded


@pytest.mark.slow
def test_param_group_matching_nothing_is_a_clear_error(dataset, tmp_path):
    import train
    with pytest.raises(SystemExit) as e:  # a string code: Python prints that one line, no traceback
        train.main(args(dataset, tmp_path / "run", 1, "optimizer.param_groups=[{pattern='^no_such_block', lr=1e-5}]"))
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg
    assert "config error" in msg and "no_such_block" in msg and "match no trainable parameter" in msg


def test_prune_exports_keeps_newest_by_time(tmp_path):
    """Step and epoch exports mixed: the newest files survive, whatever their names sort as."""
    import time
    from training.exports import prune_exports
    names = ["m-step00000002.safetensors", "m-epoch0001.safetensors", "m-step00000004.safetensors",
             "m-epoch0002.safetensors"]
    for i, n in enumerate(names):
        p = tmp_path / n
        p.write_bytes(b"x")
        os.utime(p, ns=(time.time_ns(), 1_000_000_000 * (i + 1)))
    (tmp_path / "m.safetensors").write_bytes(b"final")
    prune_exports(str(tmp_path), "m", 2)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.safetensors", "m-step00000004.safetensors", "m-epoch0002.safetensors"])


def test_missing_inputs_fail_with_one_clear_line_on_every_rank(tmp_path):
    """A missing image folder or checkpoint ends the run with a one-line message (no traceback), and with 2 processes
    neither rank is left waiting at a barrier."""
    import cache
    import train

    def one_line(entry, argv):  # in process: a SystemExit with a string, which Python prints alone (no traceback)
        with pytest.raises(SystemExit) as e:
            entry.main(argv)
        msg = e.value.code
        assert isinstance(msg, str) and "\n" not in msg, msg
        return msg

    base = ["configs/demo.toml", "cache.cache_dir=", f"output_dir={tmp_path / 'run'}"]
    msg = one_line(train, base + [f"data.image_dirs=['{tmp_path / 'nope'}']"])
    assert "data error:" in msg and "is not a directory" in msg
    from data.demo import make_demo_dataset
    make_demo_dataset(str(tmp_path / "data"), n=4, size=(64, 64))  # valid data, so the checkpoint is what fails
    msg = one_line(train, base + ["model.pretrained_model_name_or_path=/no/such.safetensors",
                                  f"data.image_dirs=['{tmp_path / 'data'}']"])
    assert "model error: checkpoint file not found: /no/such.safetensors" in msg
    msg = one_line(cache, ["configs/demo.toml", f"cache.cache_dir={tmp_path / 'c'}",
                           f"data.image_dirs=['{tmp_path / 'nope'}']"])
    assert "cache.py: data error:" in msg
    # a store cached without text-encoder outputs, trained with the option that says to use them
    data = [f"data.image_dirs=['{tmp_path / 'data'}']", f"cache.cache_dir={tmp_path / 'c2'}"]
    assert cache.main(["configs/demo.toml", *data]) == 0
    msg = one_line(train, ["configs/demo.toml", *data, f"output_dir={tmp_path / 'run2'}",
                           "cache.cache_text_encoder_outputs=true"])
    assert "holds no text-encoder outputs" in msg and "run cache.py with the same option" in msg
    # 2 processes: each rank prints its line and ends by itself (none waits at a barrier; no launcher agent here
    # to kill a waiting rank, so a hang is a timeout)
    r = run_workers(["train.py", *base, f"data.image_dirs=['{tmp_path / 'nope'}']"], timeout=300, expect=1)
    assert r.stderr.count("data error:") == 2 and "Traceback" not in r.stderr
