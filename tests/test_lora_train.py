"""LoRA runs of train.py end to end: it learns the two-class data with the base frozen (bit-identical after),
resumes bit-exactly from a mid-run state holding only the adapters and the optimizer, and runs under 2-process DDP.

Reference: analytic, as tests/test_learning.py (whose data and unit-std VAE this reuses): the class mean latents
come from cache.py's store; samples are drawn with the product's sampler from the base checkpoint with the exported
LoRA merged by `networks.lora.merge_files` (the generate.py path).
"""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import models
import train
from helpers import ENV, TORCHRUN, run_ok
from test_learning import CLASSES, SIZE, _make_dataset, _unit_scale_vae

STEPS = 80
HALF = STEPS // 2


def _common(tmp_path):
    return ["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'data'}']", f"cache.cache_dir={tmp_path / 'cache'}",
            f"model.vae={tmp_path / 'vae.safetensors'}", f"data.resolution={SIZE}", "data.max_bucket_reso=128",
            "seed=0", f"model.pretrained_model_name_or_path={tmp_path / 'base.safetensors'}",
            "cache.cache_text_encoder_outputs=true"]


def _lora_run(tmp_path, out, steps, *extra):
    assert train.main([*_common(tmp_path), f"output_dir={out}", f"train.max_train_steps={steps}",
                       "model.v_parameterization=true", "data.batch_size=8", "optimizer.learning_rate=2e-2",
                       "optimizer.lr_scheduler=constant", "optimizer.lr_warmup_steps=0", "sample.sample_every_n_steps=0",
                       "save.save_precision=fp32", "network.network_module=lora", "network.network_dim=16",
                       "network.network_alpha=16", "network.network_train_unet_only=true", *extra]) == 0


@pytest.mark.slow
def test_lora_learns_two_classes_base_untouched_exact_resume_and_ddp(tmp_path):
    keys = _make_dataset(str(tmp_path / "data"))
    _unit_scale_vae(str(tmp_path / "vae.safetensors"), str(tmp_path / "data"))
    base = models.build("sdxl", "tiny", seed=0)
    base.v_parameterization = True
    models.save(base, str(tmp_path / "base.safetensors"), "fp32")
    base_before = load_file(str(tmp_path / "base.safetensors"))
    run_ok([sys.executable, "cache.py", *_common(tmp_path)], env={**ENV, "OMP_NUM_THREADS": "2"})

    out = tmp_path / "run"
    _lora_run(tmp_path, out, STEPS, f"save.save_every_n_steps={HALF}")
    with open(out / "logs" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.9 * first, (first, last)

    # the resume state holds the adapters only (and the optimizer); resuming it gives the same file bit for bit
    state = out / "state" / f"step-{HALF:08d}"
    assert state.is_dir()
    resumed = tmp_path / "resumed"
    _lora_run(tmp_path, resumed, STEPS, f"train.resume={state}")
    a, b = load_file(str(out / "models" / "demo.safetensors")), load_file(str(resumed / "models" / "demo.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("lora_unet_") for k in a)
    from core import state as rstate
    trained = rstate.read_state(str(state), 0)["trained"]
    assert trained and all(k.startswith("adapters.lora_unet_") for k in trained)

    # the base weights are bit-identical after training (never written)
    after = load_file(str(tmp_path / "base.safetensors"))
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)

    # samples with the LoRA merged land nearer their class mean than the other's
    from core.sampling import sample
    from data.store import LatentStore
    from networks.lora import merge_files
    store = LatentStore(str(tmp_path / "cache"))
    means = {c: torch.stack([store.get(k)["latent"].float() for k in ks]).mean(0) for c, ks in keys.items()}
    comp = models.load(str(tmp_path / "base.safetensors"), vae=str(tmp_path / "vae.safetensors"))
    merge_files(comp, [str(out / "models" / "demo.safetensors")])
    comp.network.eval()
    n = 4
    for caption in CLASSES:
        noise = torch.randn(n, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            text = comp.encode_text([caption] * n)
            size = torch.tensor([[SIZE, SIZE]] * n, dtype=torch.float32)
            cond = comp.conditioning(text, size, torch.zeros_like(size), size)
            uncond = comp.conditioning(comp.uncond_text(text), size, torch.zeros_like(size), size)
            x = sample(comp.sample_schedule(), comp.network, noise, steps=12, sampler="euler", cond=cond,
                       uncond=uncond, cfg_scale=4.0)
        other = next(c for c in CLASSES if c != caption)
        per = {c: (x - m).flatten(1).norm(dim=1) for c, m in means.items()}
        assert bool((per[caption] < per[other]).all()), (caption, per)

    # 2-process DDP (gloo): LoCon with text-encoder adapters and module dropout (unused adapters on some steps)
    ddp = tmp_path / "ddp"
    run_ok(TORCHRUN + ["train.py", *_common(tmp_path), f"output_dir={ddp}", "train.max_train_steps=2",
                       "data.batch_size=2", "cache.cache_text_encoder_outputs=false", "network.network_module=locon", "network.network_dim=2",
                       "network.module_dropout=0.2", "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant",
                       "sample.sample_every_n_steps=0", "save.save_every_n_steps=0"])
    f = load_file(str(ddp / "models" / "demo.safetensors"))
    assert any(k.startswith("lora_te2_") for k in f) and any("in_layers_2" in k for k in f)
    assert any(f[k].abs().sum() > 0 for k in f if k.endswith("lora_up.weight"))  # trained (init: zeros)
