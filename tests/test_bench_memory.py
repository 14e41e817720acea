"""The memory planner (training/planner.py) against real runs of the tiny presets on the CPU (bench/train_memory.py
--measure's code): weights, gradients and optimizer state equal the real tensors' sizes exactly; the simulated
activations are within 20 % of the measured peak of a real step (resident memory with glibc returning freed
blocks at once)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import train_memory as tm  # noqa: E402
from core.config import config_from_dict  # noqa: E402
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
    "sd3 LoRA fp8 AdamW8bit": (
        _cfg("sd3", 256, 2, optimizer={"optimizer_type": "AdamW8bit"}, model={"fp8_base": True},
             network={"network_module": "lora", "network_dim": 8, "network_train_unet_only": True}), True),
}


@pytest.fixture(scope="module", autouse=True)
def _malloc():
    tm.tame_malloc()  # freed blocks go back at once: the resident size follows the live tensors


@pytest.mark.parametrize("name", list(CASES))
def test_planner_terms_against_real_tensors(name):
    cfg, check_activations = CASES[name]
    if "AdamW8bit" in name:
        pytest.importorskip("bitsandbytes")
    plan = planner.estimate(cfg, device_type="cpu")
    got = tm.measure(cfg, steps=2, log=lambda _m: None)
    weights = sum(t.bytes for t in plan.terms if t.name.startswith("weights"))
    assert (weights, plan.term("gradients"), plan.term("optimizer")) == \
        (got["weights"], got["gradients"], got["optimizer"])
    if check_activations:  # the step's own peak: activations (+ the adapters' gradients, kept until the step)
        planned = plan.term("activations") + (0 if plan.setup.fused else plan.term("gradients"))
        assert planned > 10 * 2**20, planned  # large enough for resident-size measurement
        assert abs(got["step"] - planned) <= 0.2 * planned, (got["step"], planned)


def test_parse_size_and_suggestions():
    assert planner.parse_size("24GiB") == planner.parse_size("24G") == planner.parse_size("24GB") == 24 * 2**30
    assert planner.parse_size("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="--gpu-memory"):
        planner.parse_size("lots")
