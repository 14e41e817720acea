"""The branches that only a GPU takes, exercised on the CPU where the same code path allows.

What cannot run here (NCCL itself, CUDA generators and autocast, pinned non-blocking copies, fused AdamW, compile and
FSDP on a GPU) is run by scripts/gpu_smoke.py on a GPU; its CPU mode is tests/test_gpu_smoke.py.
"""
import copy
import os
import json
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist
from torch import nn

import cache
import models
import train
from core import dist
from core.metrics import peak_memory
from training.steppers import make_stepper
from training.trainable import Trainee

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_dist():
    """No process group and no cached DistInfo before and after (the entry points' dist.init is idempotent)."""
    dist.shutdown()
    yield
    dist.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- process groups: torchrun with one process, FSDP in a plain process


def test_torchrun_with_one_process_gets_a_process_group(fresh_dist, monkeypatch):
    """`torchrun --nproc_per_node=1` must run the collectives (NCCL on a GPU) as a multi-GPU run does."""
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    dist.init(device="cpu")
    assert not dist.is_dist() and dist.backend() is None  # a plain process: no group
    dist.shutdown()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "smoke")  # set by torchrun's agent for its workers
    dist.init(device="cpu")
    assert dist.is_dist() and dist.backend() == "gloo"
    assert dist.all_reduce_mean(3.0) == 3.0 and dist.any_true(True) and dist.broadcast_object([1]) == [1]


def test_fsdp_in_a_plain_process_makes_its_own_group(fresh_dist):
    """`python train.py train.fsdp=true` (no torchrun) used to fail inside fully_shard (env:// rendezvous)."""
    pytest.importorskip("torch.distributed.fsdp").fully_shard
    dist.init(device="cpu")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ref = copy.deepcopy(m)
    dist.wrap_fsdp(m, [m[0]])
    assert dist.is_dist() and hasattr(m[0].weight, "full_tensor")
    x = torch.randn(3, 4)
    m(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert torch.allclose(dist.full_tensor(m[0].weight.grad), ref[0].weight.grad, atol=1e-6)


# ---- cache.py: the cross-rank sums NCCL needs on the device


def test_cache_sums_reduce_a_device_copy(fresh_dist, monkeypatch):
    """_sum_over_ranks through a real (gloo) process group: the reduced tensor is a copy on `device` (NCCL reduces
    device tensors only), the caller's CPU tensor is left alone, the sum comes back on the CPU in its dtype.
    A second rank is simulated inside all_reduce (it contributes the same values)."""
    info = dist.init(device="cpu")
    dist._init_group(info.device, store=tdist.HashStore())
    real, seen = tdist.all_reduce, []

    def two_ranks(t, op=tdist.ReduceOp.SUM, **kw):
        seen.append(t)
        assert t.device == info.device and op == tdist.ReduceOp.SUM
        work = real(t, op=op, **kw)
        t.mul_(2)
        return work

    monkeypatch.setattr(tdist, "all_reduce", two_ranks)
    for dt in (torch.int32, torch.int64):  # the status codes and the counts
        src = torch.tensor([1, 2, 3], dtype=dt)
        out = cache._sum_over_ranks(src, info.device)
        assert seen[-1].data_ptr() != src.data_ptr()
        assert out.device.type == "cpu" and out.dtype == dt and out.tolist() == [2, 4, 6]
        assert src.tolist() == [1, 2, 3]
    dist.shutdown()
    assert cache._sum_over_ranks(torch.tensor([5]), torch.device("cpu")).tolist() == [5]  # alone: a clone


# ---- train.py: noise generators, GradScaler, metrics


def _cfg(noise_device="same", mixed_precision="fp16", full_fp16=False, max_grad_norm=0.0):
    return SimpleNamespace(seed=5, train=SimpleNamespace(noise_device=noise_device, mixed_precision=mixed_precision,
                                                         full_fp16=full_fp16, full_bf16=False,
                                                         fused_backward_pass=False, stochastic_rounding=True),
                           optimizer=SimpleNamespace(max_grad_norm=max_grad_norm))


def test_noise_generators_choose_the_device():
    cuda = torch.device("cuda", 0)
    gens = train.noise_generators(_cfg("cpu"), cuda, epoch=2, rank=1, done=3, n=2)  # no CUDA touched
    assert [g.device.type for g in gens] == ["cpu", "cpu"]
    assert [g.initial_seed() for g in gens] == [train.mix_seed(5, 2, 1, 3), train.mix_seed(5, 2, 1, 4)]
    assert [g.device.type for g in train.noise_generators(_cfg(), torch.device("cpu"), 0, 0, 0, 1)] == ["cpu"]
    if torch.cuda.is_available():
        assert train.noise_generators(_cfg(), cuda, 0, 0, 0, 1)[0].device == cuda
    else:  # "same" asks the device for its generator
        with pytest.raises(RuntimeError):
            train.noise_generators(_cfg(), cuda, 0, 0, 0, 1)


def test_peak_memory_only_on_cuda(monkeypatch):
    calls = []

    def fake(device=None):
        calls.append(device)
        return 3 * 2**30

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake)
    assert peak_memory(torch.device("cpu")) == {} and calls == []
    assert peak_memory(torch.device("cuda", 1)) == {"gpu_mem_gb": 3.0} and calls == [torch.device("cuda", 1)]


def _fp16_setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    x = torch.randn(16, 4) * 0.1  # small gradients: the default scale (2**16) does not overflow fp16
    return net, x


def _fp16_loss(net, x):
    with torch.autocast("cpu", dtype=torch.float16):
        return net(x).float().square().mean()


def test_fp16_grad_scaler_step_equals_the_unscaled_step():
    """make_stepper's ScaledStepper with mixed_precision = fp16 on the CPU (torch.amp.GradScaler("cpu")):
    scaled backward + unscale + step == the same fp16-autocast step without scaling (the scale is a power of two)."""
    cfg = _cfg(max_grad_norm=1.0)
    net, x = _fp16_setup()
    ref = copy.deepcopy(net)
    opt, ref_opt = torch.optim.SGD(net.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    stepper = make_stepper(cfg, opt, torch.device("cpu"))
    scaler = stepper.scaler
    assert type(scaler) is torch.amp.GradScaler and scaler.is_enabled()
    stepper.backward(_fp16_loss(net, x))
    norm, applied = stepper.step()
    _fp16_loss(ref, x).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    assert applied and norm == pytest.approx(float(ref_norm), rel=1e-5)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    assert scaler.get_scale() == 2.0**16
    # the scaler's state goes into progress.json: JSON round trip
    again = torch.amp.GradScaler("cpu")
    again.load_state_dict(json.loads(json.dumps(scaler.state_dict())))
    assert again.get_scale() == scaler.get_scale()


def test_fp16_grad_scaler_skips_an_overflow_and_backs_off():
    cfg = _cfg()
    net, x = _fp16_setup()
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    stepper = make_stepper(cfg, opt, torch.device("cpu"))
    scaler = stepper.scaler
    stepper.backward(_fp16_loss(net, x))
    net[0].weight.grad[0, 0] = float("inf")  # an fp16 overflow in the backward pass
    norm, applied = stepper.step()
    assert applied and not torch.isfinite(torch.as_tensor(norm))  # the scaler's own skip (counted as its normal work)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert scaler.get_scale() == 2.0**15


def test_full_fp16_scaler_unscales_half_gradients():
    cfg = _cfg(full_fp16=True)
    net, x = _fp16_setup()
    net.half()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    stepper = make_stepper(cfg, opt, torch.device("cpu"))
    before = [p.detach().clone() for p in net.parameters()]
    plain = torch.amp.GradScaler("cpu")
    plain.scale(_fp16_loss(net, x.half())).backward()
    with pytest.raises(ValueError, match="FP16 gradients"):  # why train.py has its own subclass
        plain.unscale_(opt)
    opt.zero_grad()
    stepper.backward(_fp16_loss(net, x.half()))
    _, applied = stepper.step()
    assert applied and any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in net.parameters())


# ---- models: random preset weights do not depend on the device


def test_build_for_cuda_draws_the_cpu_weights(monkeypatch):
    """A preset built for a GPU has the weights it has on the CPU (drawn by the CPU generator, then moved), and no
    global CUDA RNG is reseeded. Module.to is stubbed so no GPU is needed; the old code built under
    torch.device("cuda") and drew from the device's generator."""
    ref = models.build("sdxl", "tiny", parts=["vae"], seed=3).vae.state_dict()
    moved, seeded = [], []

    def fake_to(self, *args, **kwargs):
        moved.append(kwargs.get("device", args[0] if args else None))
        return self

    monkeypatch.setattr(nn.Module, "to", fake_to)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    vae = models.build("sdxl", "tiny", parts=["vae"], seed=3, device="cuda").vae
    assert "cuda" in moved and seeded == []
    got = vae.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_sd3_cached_text_under_fp16_autocast():
    """SD3 training from cached (bf16) text outputs with mixed_precision = fp16 crashed in collate_cached_text's
    torch.cat ("Unexpected floating ScalarType in at::autocast::prioritize": CPU autocast sees the CPU tensors;
    found by scripts/gpu_smoke.py --device cpu). micro_step_loss now assembles the text outside autocast."""
    from core.config import load_config
    from diffusion.objectives import build_objective
    cfg = load_config(os.path.join(ROOT, "configs", "demo_sd3.toml"))
    comp = models.from_config(cfg.model, parts=["mmdit"], seed=0)
    width, n = comp.context_dim, 2
    g = torch.Generator().manual_seed(0)
    items = [{"clip": torch.randn(77, width // 2, generator=g).bfloat16(), "t5": torch.randn(5, width, generator=g).bfloat16(),
              "pooled": torch.randn(comp.mmdit.cfg.adm_in_channels, generator=g).bfloat16()} for _ in range(n)]
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="prioritize"):
        comp.collate_cached_text(items)  # what happened inside the training autocast
    batch = {"latents": torch.randn(n, 16, 8, 8, generator=g), "captions": ["a", "b"],
             **{f"te.{k}": [it[k] for it in items] for k in items[0]},
             **{k: torch.tensor([[64, 64]] * n) for k in ("original_size", "crop_top_left", "target_size")},
             "loss_weight": torch.ones(n)}
    objective = build_objective("flow", cfg.loss, False)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = train.micro_step_loss(Trainee(comp, False), comp, objective, batch, torch.device("cpu"),
                                     torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
