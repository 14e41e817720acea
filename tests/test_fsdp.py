"""FSDP2 (fully_shard) on CPU with gloo, 2 processes: trains like DDP, exports the full single file,
and resumes from its own (gathered) state to the same weights."""
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from helpers import TORCHRUN, run_ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd):
    return run_ok(cmd)


@pytest.mark.slow
def test_fsdp_matches_ddp_exports_and_resumes(tmp_path):
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # FSDP2 API
    from data.demo import make_demo_dataset
    make_demo_dataset(str(tmp_path / "data"), n=12, size=(64, 96))
    common = ["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'data'}']", f"cache.cache_dir={tmp_path / 'cache'}",
              "train.max_train_steps=4", "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant",
              "sample.sample_every_n_steps=0", "data.batch_size=2", "save.save_every_n_steps=2",
              # SGD: the update is linear in the gradient, so reduction-order rounding stays rounding (Adam's
              # normalisation turns it into sign flips on parameters whose gradient is ~0)
              "optimizer.optimizer_type=SGD", "optimizer.learning_rate=0.05", "optimizer.optimizer_kwargs={momentum=0.9}"]
    _run([sys.executable, "cache.py", *common])
    _run(TORCHRUN + ["train.py", *common, f"output_dir={tmp_path / 'ddp'}"])
    _run(TORCHRUN + ["train.py", *common, f"output_dir={tmp_path / 'fsdp'}", "train.fsdp=true",
                     "sample.sample_every_n_steps=4", "sample.sample_params={width=64, height=64, steps=2}"])
    # previews under FSDP: every rank runs every prompt (sharded forwards are collective), rank 0 writes
    assert os.path.isfile(tmp_path / "fsdp" / "samples" / "000004_grid.png")
    ddp = load_file(str(tmp_path / "ddp" / "models" / "demo.safetensors"))
    fsdp = load_file(str(tmp_path / "fsdp" / "models" / "demo.safetensors"))
    assert ddp.keys() == fsdp.keys()
    for k in ddp:  # same data and noise: equal up to the order of floating-point reductions
        assert torch.allclose(ddp[k].float(), fsdp[k].float(), rtol=1e-4, atol=1e-6), (k, (ddp[k].float() - fsdp[k].float()).abs().max())
    import models
    assert models.load(str(tmp_path / "fsdp" / "models" / "demo.safetensors")).unet is not None

    # resume from the step-2 state under FSDP: same final weights as the straight FSDP run
    res = tmp_path / "fsdp_resumed"
    os.makedirs(res / "state")
    shutil.copytree(tmp_path / "fsdp" / "state" / "step-00000002", res / "state" / "step-00000002")
    out = _run(TORCHRUN + ["train.py", *common, f"output_dir={res}", "train.fsdp=true",
                          f"train.resume={res / 'state' / 'step-00000002'}"])  # another run's state: named, not auto
    assert "resumed from" in out.stderr
    a = load_file(str(tmp_path / "fsdp" / "state" / "step-00000004" / "trained.safetensors"))
    b = load_file(str(res / "state" / "step-00000004" / "trained.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
