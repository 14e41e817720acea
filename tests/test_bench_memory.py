"""The memory planner (training/planner.py) against real runs of the tiny presets on the CPU (bench/train_memory.py
--measure's code): weights, gradients and optimizer state equal the real tensors' sizes exactly; the simulated
activations are within 20 % of the measured peak of a real step (resident memory with glibc returning freed
blocks at once and its heap trimmed before the step)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import json  # noqa: E402

from core.config import config_from_dict, to_toml  # noqa: E402
from helpers import run_ok  # noqa: E402
from training import planner  # noqa: E402


def _cfg(family, size, batch, train=None, optimizer=None, network=None, model=None):
    return config_from_dict({
        "model": {"model_family": family, "model_preset": "tiny", **(model or {})},
        "data": {"resolution": size, "batch_size": batch, "bucket_reso_step": 32},
        "cache": {"cache_dir": "<cache>", "cache_text_encoder_outputs": True},
        "train": {"mixed_precision": "bf16", **(train or {})},
        "optimizer": {"optimizer_type": "AdamW", **(optimizer or {})},
        "network": network or {}})


CASES = {  # name: (config, activations compared)
    "sdxl full AdamW fp32": (_cfg("sdxl", 128, 2), False),
    "sdxl full Adafactor bf16 fused SR ckpt": (
        _cfg("sdxl", 384, 2, train={"full_bf16": True, "fused_backward_pass": True, "gradient_checkpointing": True},
             optimizer={"optimizer_type": "Adafactor"}), True),
    "sd3 full SGD bf16 per-parameter SR": (
        _cfg("sd3", 256, 2, train={"full_bf16": True}, optimizer={"optimizer_type": "SGD",
                                                                  "optimizer_kwargs": {"momentum": 0.9}}), True),
    # SDXL's tiny UNet makes many tensors below glibc's mmap threshold: the case that needs the heap trimmed before
    # the measured step (without it, 17-25 MB measured against 29 MB of live tensors, planned 29)
    "sdxl LoRA AdamW": (
        _cfg("sdxl", 256, 2, network={"network_module": "lora", "network_dim": 8, "network_train_unet_only": True}),
        True),
    "sd3 LoRA fp8 AdamW8bit": (
        _cfg("sd3", 256, 2, optimizer={"optimizer_type": "AdamW8bit"}, model={"fp8_base": True},
             network={"network_module": "lora", "network_dim": 8, "network_train_unet_only": True}), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_planner_terms_against_real_tensors(name, tmp_path):
    """One fresh process per case (bench/train_memory.py --measure --json): a heap that earlier tests left resident
    would hide part of the step's peak. The 4th step is measured (the 2nd still allocates a few caches once)."""
    cfg, check_activations = CASES[name]
    if "AdamW8bit" in name:
        pytest.importorskip("bitsandbytes")
    path = tmp_path / "cfg.toml"
    path.write_text(to_toml(cfg))
    out = run_ok([sys.executable, "bench/train_memory.py", str(path), "--measure", "--json", "--steps", "4"]).stdout
    got = json.loads(out.strip().splitlines()[-1])
    for term in ("weights", "gradients", "optimizer"):  # planned == the real tensors' bytes
        assert got[term][0] == got[term][1], (term, got[term])
    if check_activations:  # the step's own peak: activations (+ the gradients a step keeps until its end)
        planned, measured = got["step"]
        assert planned > 10 * 2**20, planned  # large enough for resident-size measurement
        assert abs(measured - planned) <= 0.2 * planned, (measured, planned)


def test_parse_size_and_suggestions():
    assert planner.parse_size("24GiB") == planner.parse_size("24G") == planner.parse_size("24GB") == 24 * 2**30
    assert planner.parse_size("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="--gpu-memory"):
        planner.parse_size("lots")


ALGOS = {"loha": {"network_module": "loha"}, "lokr": {"network_module": "lokr"},
         "dora": {"network_module": "lora", "dora_wd": True}}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_lycoris_planned_against_real_adapters(algo):
    """LoHa / LoKr / DoRA in the planner (train.py --plan, the start-up estimate): the simulated step runs on the meta
    device (LoHa / LoKr read their alpha buffer with .item() in every forward, which failed there); the adapters'
    weights (a term of their own), gradients and AdamW state equal the real network's (tiny SDXL built on the CPU, convolutions
    adapted: torch's AdamW keeps two fp32 moments and one fp32 step per tensor); the step holds more than LoRA's at
    the same dim (they build each layer's dW in fp32), and a simulation cached for LoRA is not reused for them
    (dora_wd is a [network] key of its own)."""
    import models
    from networks import lora
    net_cfg = {"network_dim": 4, "network_train_unet_only": True}
    cfg = _cfg("sdxl", 128, 1, network={**net_cfg, **ALGOS[algo]})
    cache: dict = {}
    base = planner.estimate(_cfg("sdxl", 128, 1, network={**net_cfg, "network_module": "lora"}), cache=cache)
    plan = planner.estimate(cfg, cache=cache)
    net = lora.create_network(models.build("sdxl", "tiny", seed=0), cfg.network, unet=True, text=False)
    params = [p for p in net.parameters() if p.requires_grad]
    assert {a.algo for a in net.adapters.values()} == {ALGOS[algo]["network_module"]}
    n = sum(p.numel() for p in params)
    assert plan.term("weights: adapters") == sum(t.numel() * t.element_size() for t in (*params, *net.buffers()))
    assert plan.term("gradients") == 4 * n
    assert plan.term("optimizer") == 8 * n + 4 * len(params)
    assert plan.term("activations") > base.term("activations") > 0


def test_autocast_emulation_matches_torch_autocast():
    """The planner's autocast emulation gives each op's result the dtype torch.autocast gives it on the CPU (the
    oracle): `a @ b` (a C method, not torch.matmul) and einsum (its bmm) were missed once, so LoHa's two full-size
    products per layer were planned in fp32 (tiny SDXL LoHa 53.1 MB planned against 44.8 MB of real tensors)."""
    import torch

    ops = {"@": lambda a, b: a @ b, "Tensor.matmul": lambda a, b: a.matmul(b),
           "torch.matmul": lambda a, b: torch.matmul(a, b), "einsum": lambda a, b: torch.einsum("ij,jk->ik", a, b),
           "F.linear": lambda a, b: torch.nn.functional.linear(a, b.t()), "mul": lambda a, b: a[:, :1] * b[:1],
           "kron": lambda a, b: torch.kron(a, b)}
    for name, op in ops.items():
        a, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, 5, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = op(a, b).dtype
        am, bm = (torch.empty(t.shape, device="meta", requires_grad=True) for t in (a, b))
        with planner.AutocastEmulation(torch.bfloat16, "cpu"):
            got = op(am, bm).dtype
        assert got == want, (name, got, want)
    assert (am @ bm).dtype == torch.float32 and "__matmul__" not in vars(torch.Tensor)  # restored on exit
