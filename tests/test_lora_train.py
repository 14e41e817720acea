"""LoRA runs of train.py end to end: bit-exact resume from a mid-run state that holds only the adapters and the
optimizer, the base checkpoint untouched, and 2-process DDP (gloo) with LoCon, text-encoder adapters and module
dropout (adapters unused on some steps)."""
import sys

import pytest
import torch
from safetensors.torch import load_file

import models
import train
from helpers import TORCHRUN, run_ok


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("lora")
    make_demo_dataset(str(root / "data"), n=8, size=(64, 96))
    models.save(models.build("sdxl", "tiny", seed=0), str(root / "base.safetensors"), "fp32")
    return root


def _args(root, out, steps, *extra):
    return ["configs/demo.toml", f"data.image_dirs=['{root / 'data'}']", "cache.cache_dir=", f"output_dir={out}",
            f"model.pretrained_model_name_or_path={root / 'base.safetensors'}", f"train.max_train_steps={steps}",
            "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0",
            "save.save_every_n_steps=0", "data.batch_size=2", "save.save_precision=fp32", "network.network_module=locon",
            "network.network_dim=4", *extra]


@pytest.mark.slow
def test_lora_exact_resume_adapter_only_state_base_untouched(data, tmp_path):
    before = load_file(str(data / "base.safetensors"))
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(_args(data, a, 6, "save.save_every_n_steps=3")) == 0
    state = a / "state" / "step-00000003"
    assert train.main(_args(data, b, 6, f"train.resume={state}")) == 0
    fa, fb = load_file(str(a / "models" / "demo.safetensors")), load_file(str(b / "models" / "demo.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert any(k.startswith("lora_te2_") for k in fa) and any("in_layers_2" in k for k in fa)
    assert any(fa[k].abs().sum() > 0 for k in fa if k.endswith("lora_up.weight"))  # trained (init: zeros)
    from core import state as rstate
    trained = rstate.read_state(str(state), 0)["trained"]
    assert trained and all(k.startswith("adapters.lora_") for k in trained)
    after = load_file(str(data / "base.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_lora_two_process_ddp(data, tmp_path):
    out = tmp_path / "ddp"
    run_ok(TORCHRUN + ["train.py", *_args(data, out, 2, "network.module_dropout=0.3")])
    f = load_file(str(out / "models" / "demo.safetensors"))
    assert any(k.startswith("lora_te1_") for k in f) and f["lora_unet_input_blocks_4_1_proj_in.alpha"].item() == 1.0
    assert any(f[k].abs().sum() > 0 for k in f if k.endswith("lora_up.weight"))
