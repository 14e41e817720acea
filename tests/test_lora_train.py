"""LoRA runs of train.py end to end, every dropout on (their masks come from the adapters' own stream, see
networks/lora.py `_own_dropout_rng`) and gradient checkpointing: bit-exact resume in 2-process DDP (gloo) from a
mid-run state that holds only the adapters, the optimizer and the dropout position, the base checkpoint untouched; and
FSDP2 with the frozen base and trainable adapters, which must match the DDP run up to reduction-order rounding and
write the same kohya LoRA file."""
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import models
from helpers import demo_data_and_tiny_base, run_workers
from networks import lora

# every dropout on, with gradient checkpointing (a recomputed block must draw the masks of its forward)
DROPOUTS = ["network.network_dropout=0.1", "network.rank_dropout=0.25", "network.module_dropout=0.25",
            "train.gradient_checkpointing=true"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data_and_tiny_base(tmp_path_factory.mktemp("lora"), n=8, size=(64, 96))


def _args(root, out, steps, *extra):
    return ["configs/demo.toml", f"data.image_dirs=['{root / 'data'}']", "cache.cache_dir=", f"output_dir={out}",
            f"model.pretrained_model_name_or_path={root / 'base.safetensors'}", f"train.max_train_steps={steps}",
            "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0",
            "save.save_every_n_steps=0", "data.batch_size=2", "save.save_precision=fp32", "network.network_module=locon",
            "network.network_dim=4", *DROPOUTS, *extra]


def _equal_files(a, b):
    fa, fb = load_file(str(a)), load_file(str(b))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), \
        [k for k in fa if k in fb and not torch.equal(fa[k], fb[k])][:5]
    return fa


# 2 processes: SGD, whose update is linear in the gradient, so DDP vs FSDP reduction-order rounding stays rounding
DIST = ["optimizer.optimizer_type=SGD", "optimizer.learning_rate=0.5", "optimizer.optimizer_kwargs={momentum=0.9}"]


@pytest.fixture(scope="module")
def ddp_run(data):
    out = data / "ddp"
    run_workers(["train.py", *_args(data, out, 4, "save.save_every_n_steps=2", *DIST)])
    return out


@pytest.mark.slow
def test_lora_two_process_ddp_resumes_exactly_base_untouched(data, ddp_run, tmp_path):
    before = load_file(str(data / "base.safetensors"))
    state = ddp_run / "state" / "step-00000002"
    from training import resume as rstate
    trained = rstate.read_state(str(state), 0)["trained"]
    assert int(trained.pop(lora.FORWARDS_KEY)) == 2  # one forward per step (no accumulation)
    assert trained and all(k.startswith("adapters.lora_") for k in trained)  # adapters only, no base weights
    res = tmp_path / "resumed"
    (res / "state").mkdir(parents=True)
    shutil.copytree(state, res / "state" / state.name)
    run_workers(["train.py", *_args(data, res, 4, f"train.resume={res / 'state' / state.name}", *DIST)])
    f = _equal_files(ddp_run / "models" / "demo.safetensors", res / "models" / "demo.safetensors")
    assert any(k.startswith("lora_te1_") for k in f) and any(k.startswith("lora_te2_") for k in f)
    assert any("in_layers_2" in k for k in f) and f["lora_unet_input_blocks_4_1_proj_in.alpha"].item() == 1.0
    assert any(f[k].abs().sum() > 0 for k in f if k.endswith("lora_up.weight"))  # trained (init: zeros)
    after = load_file(str(data / "base.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_lora_fsdp_matches_ddp_and_writes_the_same_file(data, ddp_run, tmp_path):
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # FSDP2 API
    out = tmp_path / "fsdp"
    # 2 steps (an FSDP step on CPU / gloo costs seconds): the second one applies SGD's momentum; the DDP run's export
    # at step 2 is the reference (a constant LR: its first 2 steps are a 2-step run's)
    run_workers(["train.py", *_args(data, out, 2, "train.fsdp=true", *DIST)])
    path = out / "models" / "demo.safetensors"
    ddp, fsdp = load_file(str(ddp_run / "models" / "demo-step00000002.safetensors")), load_file(str(path))
    assert ddp.keys() == fsdp.keys()
    for k in ddp:  # same data, noise and dropout masks: equal up to the order of floating-point reductions
        assert torch.allclose(ddp[k], fsdp[k], rtol=1e-4, atol=1e-6), (k, (ddp[k] - fsdp[k]).abs().max())
    assert any(fsdp[k].abs().sum() > 0 for k in fsdp if k.endswith("lora_up.weight"))
    with safe_open(str(path), "pt") as f:  # full (gathered) tensors with kohya's metadata, as DDP writes them
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    comp = models.load(str(data / "base.safetensors"))
    assert lora.merge_into(comp, lora.read_lora(str(path), comp)) == len({k.split(".")[0] for k in fsdp})
