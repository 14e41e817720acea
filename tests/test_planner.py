"""The memory planner's suggestions and `train.py --plan`'s own checks (tiny SDXL preset, meta device, CPU).

A suggestion is only worth printing if the run accepts it: each settings line the planner proposes is applied as
the user would apply it (command-line overrides through the config loader) and then put through train.py's settings
step (resolve_settings, as `--plan` runs it) with the same number of processes. `--plan` plans from the config and
the checkpoints' headers, so it must work before the data, the latent store or the prompt file exist.
"""
import functools

import pytest

import models
import train
from core.config import load_config
from helpers import main_ok
from training import planner

CFG = "configs/demo.toml"  # the tests' tiny SDXL preset
BASE = ["sample.sample_every_n_steps=0", "train.mixed_precision=bf16", "data.batch_size=2", "data.resolution=64",
        "data.max_bucket_reso=128"]


def _check(world):
    return functools.partial(train.check_combination, family=models.family("sdxl"), world_size=world)


def _run_accepts(overrides, world):
    """The config with `overrides` through the loader and train.py's settings step as --plan runs it; raises
    SystemExit (the run's one line) when refused."""
    cfg = load_config(CFG, overrides)
    train.resolve_settings(cfg, world, CFG, plan=True)
    return cfg


def test_fsdp_is_never_offered_a_bitsandbytes_optimizer():
    """FSDP + AdamW just over budget: AdamW8bit would fit, but train.py refuses bitsandbytes under FSDP
    (training/optim.py check_fsdp_optimizer), so the suggestion must be the next change that fits (Adafactor) --
    and that one must pass the run's checks."""
    pytest.importorskip("bitsandbytes")
    ov = [*BASE, "train.fsdp=true", "train.gradient_checkpointing=true", "cache.cache_text_encoder_outputs=true"]
    cfg = _run_accepts(ov, 2)
    eight = load_config(CFG, [*ov, "optimizer.optimizer_type=AdamW8bit"])
    with pytest.raises(SystemExit, match="bitsandbytes"):
        train.resolve_settings(eight, 2, CFG, plan=True)
    budget = planner.estimate(eight, 2).total
    assert planner.estimate(cfg, 2).total > budget
    # without the run's checks the planner would name AdamW8bit (so this test can fail)
    unchecked = planner.fitting(cfg, budget, 2)
    assert "AdamW8bit" in repr(unchecked[0]), unchecked
    changes, total = planner.fitting(cfg, budget, 2, check=_check(2))
    assert "AdamW8bit" not in repr(changes) and total <= budget, changes
    fixed = _run_accepts([*ov, *planner.as_overrides(changes)], 2)
    assert planner.estimate(fixed, 2).total == total
    line = planner.suggest(cfg, budget, 2, check=_check(2))
    assert line.startswith("fits with optimizer.optimizer_type = \"Adafactor\""), line


def test_a_deep_suggestion_passes_the_runs_checks():
    """A full fine-tune (AdamW, bf16, no checkpointing) with a budget that only block swapping reaches: the
    suggestion -- changes and blocks to swap with what swapping needs (checkpointing, a fused backward pass) --
    loads as overrides, passes train.py's settings step, re-plans to the total it printed, and names each setting
    once (a change a later one made unnecessary, like AdamW8bit before Adafactor, is dropped)."""
    ov = [*BASE, "optimizer.optimizer_type=AdamW", "cache.cache_text_encoder_outputs=true", "train.full_bf16=true"]
    cfg = _run_accepts(ov, 1)
    target = load_config(CFG, [*ov, "train.gradient_checkpointing=true", "optimizer.optimizer_type=Adafactor",
                               "train.fused_backward_pass=true", "train.blocks_to_swap=4"])
    budget = planner.estimate(target, 1).total
    changes, total = planner.fitting(cfg, budget, 1, check=_check(1))
    over = planner.as_overrides(changes)
    assert total <= budget and any(o.startswith("train.blocks_to_swap=") for o in over), over
    keys = [o.split("=", 1)[0] for o in over]
    assert len(keys) == len(set(keys)) and "train.gradient_checkpointing" in keys, over
    fixed = _run_accepts([*ov, *over], 1)
    assert planner.estimate(fixed, 1).total == total


def test_plan_needs_no_data_only_the_model_files(tmp_path, capsys):
    """--plan plans from the config and the checkpoint's header: missing data folders, latent store and prompt file
    do not stop it (the run itself still refuses them, in one line); a missing checkpoint does."""
    missing = tmp_path / "not-copied-yet"
    ov = [*BASE, f"data.image_dirs=['{missing / 'images'}']", f"cache.cache_dir={missing / 'cache'}",
          f"sample.sample_prompts={missing / 'prompts.txt'}", "sample.sample_every_n_steps=10",
          f"output_dir={tmp_path / 'out'}"]
    assert main_ok("train", [CFG, *ov, "--plan", "--gpu-memory", "24GiB"]) == ""
    out = capsys.readouterr().out
    assert "total" in out and "budget 24.00 GiB: fits" in out, out
    assert not missing.exists() and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="prompts.txt|images"):
        main_ok("train", [CFG, *ov])
    ckpt = ["model.model_preset=", f"model.pretrained_model_name_or_path={missing / 'model.safetensors'}"]
    with pytest.raises(SystemExit, match="model error.*model.safetensors"):
        main_ok("train", [CFG, *ov, *ckpt, "--plan"])


def test_step_path_is_the_one_the_run_builds():
    """The plain optimizer step's temporaries are counted for the path the run takes: AdamW as training/optim.py
    build_optimizer builds it (foreach on the CPU: checked on the optimizer it returns; fused on CUDA, an in-place
    kernel: a parameter at a time), torch's other optimizers by torch's default (foreach on CUDA), the user's
    fused / foreach kwargs first. Was: every CUDA AdamW counted with foreach temporaries for all parameters (9.56 GiB
    of a full SDXL plan), though the run steps it fused."""
    import torch
    from torch import nn

    from training.optim import build_optimizer
    adamw = load_config(CFG, ["optimizer.optimizer_type=AdamW"]).optimizer
    built = build_optimizer([{"params": [nn.Parameter(torch.zeros(4))]}], adamw)
    assert built.defaults["foreach"] is True and planner._step_path(adamw, "cpu") == "foreach"
    assert planner._step_path(adamw, "cuda") == "loop"
    sgd = load_config(CFG, ["optimizer.optimizer_type=SGD"]).optimizer
    assert (planner._step_path(sgd, "cuda"), planner._step_path(sgd, "cpu")) == ("foreach", "loop")
    told = load_config(CFG, ["optimizer.optimizer_type=AdamW", "optimizer.optimizer_kwargs={foreach = true}"]).optimizer
    assert planner._step_path(told, "cuda") == "foreach"
