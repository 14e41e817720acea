"""Validation through train.py as a user runs it (configs/demo.toml, the tiny SDXL preset on generated shapes):
1 and 2 processes score the same weights the same; a resumed run with validation on is bit-identical to a straight
one, and validation does not move training at all; a schedule-free run exports the optimizer's eval-mode weights;
the rows reach metrics.jsonl and an offline wandb run."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import ENV, main_ok, run_workers

STEPS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """16 demo images (2 buckets), cached once (in process)."""
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("vdemo")
    make_demo_dataset(str(root / "data"), n=16, size=(64, 96))
    main_ok("cache", args(root, root / "x", 1)[:3])
    return root


def args(root, out, steps, *extra):
    return ["configs/demo.toml", f"data.image_dirs=['{root / 'data'}']", f"cache.cache_dir={root / 'cache'}",
            f"output_dir={out}", f"train.max_train_steps={steps}", "optimizer.lr_warmup_steps=0",
            "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0", "save.save_every_n_steps=2",
            "data.batch_size=2", "validation.validation_split=0.25", "validation.validate_every_n_steps=2",
            "save.save_last_n_states=5", *extra]


def rows(out):
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def val_rows(out):
    return {r["step"]: r for r in rows(out) if "val/loss" in r}


def final_model(out):
    return load_file(os.path.join(out, "models", "demo.safetensors"))


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """The reference run (4 steps, validation every 2, a state every 2), on one thread as the tests' own runs
    (tests/conftest.py): module fixtures are set up before that per-test setting."""
    out = tmp_path_factory.mktemp("vstraight") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        log = main_ok("train", args(dataset, out, STEPS), log_dir=out / "logs")
    finally:
        torch.set_num_threads(threads)
    return out, log


def test_validation_logged_and_held_out(straight):
    out, log = straight
    v = val_rows(out)
    assert sorted(v) == [2, 4]  # every 2 steps; the end (step 4) had one already
    assert "validation: 4 held-out image(s)" in log and "validation at step 4" in log
    names = [k for k in v[2] if k.startswith("val/loss_t")]
    assert names == ["val/loss_t000-250", "val/loss_t250-500", "val/loss_t500-750", "val/loss_t750-999"]
    assert v[2]["val/loss"] == pytest.approx(sum(v[2][n] for n in names) / 4, rel=1e-9)  # equal-size bands
    assert v[2]["val/loss"] != v[4]["val/loss"]  # the weights moved
    # 12 training images: 6 batches of 2 per epoch (the summary counts what trains)
    assert "12 images" in log


def test_resume_is_bit_identical_and_validation_leaves_training_alone(dataset, straight, tmp_path):
    out, _ = straight
    resumed = tmp_path / "resumed"
    main_ok("train", args(dataset, resumed, STEPS, f"train.resume={out / 'state' / 'step-00000002'}"))
    a, b = final_model(out), final_model(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert val_rows(resumed)[4]["val/loss"] == val_rows(out)[4]["val/loss"]
    assert [r["loss"] for r in rows(resumed) if "loss" in r] == [r["loss"] for r in rows(out) if "loss" in r][2:]
    # the same run without validation (but the same split) trains to the same weights, bit for bit
    plain = tmp_path / "plain"
    main_ok("train", args(dataset, plain, STEPS, "validation.validate_every_n_steps=0"))
    c = final_model(plain)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert sorted(val_rows(plain)) == [4]  # only the end


@pytest.mark.slow
def test_two_processes_score_the_same_weights_the_same(dataset, straight, tmp_path):
    """The 1-process run's final state, resumed by 2 processes with nothing left to train: the end-of-training pass
    scores the same weights over a sharded set; equal to fp32-reduction tolerance."""
    out, _ = straight
    two = tmp_path / "two"
    run_workers(["train.py", *args(dataset, two, STEPS, f"train.resume={out / 'state' / 'step-00000004'}")],
                env={**ENV, "OMP_NUM_THREADS": "1"})
    v1, v2 = val_rows(out)[4], val_rows(two)[4]
    for k in v1:
        if k.startswith("val/"):
            assert v2[k] == pytest.approx(v1[k], rel=1e-6, abs=1e-9), k


def test_schedule_free_exports_the_eval_mode_weights(dataset, tmp_path):
    """3 steps of AdamWScheduleFree: the export holds x, the averaged weights the optimizer means: equal to the
    resume state's optimizer put in eval mode, and not the training point y it steps at."""
    pytest.importorskip("schedulefree")
    import schedulefree
    out = tmp_path / "sf"
    main_ok("train", args(dataset, out, 3, "optimizer.optimizer_type=AdamWScheduleFree", "optimizer.learning_rate=1e-2",
                          "save.save_precision=fp32", "save.save_every_n_steps=0"))
    exported = final_model(out)
    state = sorted(os.listdir(out / "state"))[-1]
    trained = load_file(os.path.join(out, "state", state, "trained.safetensors"))
    opt_sd = torch.load(os.path.join(out, "state", state, "optimizer.pt"), weights_only=False)
    import models
    from core.config import load_config
    net_order = models.from_config(load_config("configs/demo.toml").model, parts=["unet"]).network
    names = ["network." + k for k, _ in net_order.named_parameters()]  # the optimizer's order: the trainee's
    assert set(names) == set(trained)
    params = [torch.nn.Parameter(trained[k].float().clone()) for k in names]
    opt = schedulefree.AdamWScheduleFree(params, lr=1e-2)
    opt.load_state_dict(opt_sd)
    assert opt.param_groups[0]["train_mode"] is False  # saved in eval mode, with the weights
    prefix = "model.diffusion_model."
    net = {k[len("network."):]: p for k, p in zip(names, params) if k.startswith("network.")}
    moved = 0
    for k, p in net.items():
        assert torch.equal(exported[prefix + k].float(), p.detach()), k
    opt.train()  # the training point y differs from what was exported
    for k, p in net.items():
        moved += int(not torch.equal(exported[prefix + k].float(), p.detach()))
    assert moved > 0


def test_wandb_offline_rows_from_train(dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from test_validation_wandb import wandb_history
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    main_ok("train", args(dataset, out, 2, "log.wandb=true", "log.wandb_mode=offline", "save.save_every_n_steps=0",
                          "validation.validate_every_n_steps=1"))
    by_step = {h["_step"]: h for h in wandb_history(str(out / "logs"))}
    written = {r["step"]: r for r in rows(out) if "loss" in r or "val/loss" in r}
    for r in rows(out):
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                assert by_step[r["step"]][k] == pytest.approx(v), k
    assert {"loss", "lr", "val/loss", "val/loss_t000-250"} <= set(by_step[2]) and written


def test_own_validation_folder_goes_through_the_latent_store(dataset, tmp_path, capsys):
    """[validation] image_dirs with a latent store: cache.py caches them into their own store beside the training
    one (<cache_dir>/validation: validation keys are image stems too, and one here equals a training key), and
    train.py reads them from it: the VAE is not even loaded (no previews), and the run still scores every image
    after the images are deleted. The number equals the one of a run without a store, which encodes the images at
    the pass, for the same weights (the final state resumed with nothing left to train; fp32 latents)."""
    from PIL import Image

    from data.demo import make_demo_dataset
    from data.store import LatentStore
    from training.validation import validation_store_dir

    vdata = tmp_path / "vdata"
    make_demo_dataset(str(vdata), n=6, size=(64, 96), seed=7)
    twin = sorted(p for p in os.listdir(dataset / "data") if p.endswith(".png"))[0]  # a training image's stem
    Image.new("RGB", (80, 64), (250, 250, 250)).save(vdata / twin)
    (vdata / twin.replace(".png", ".txt")).write_text("an empty picture")
    cache_dir = tmp_path / "cache"
    own = [f"validation.image_dirs=['{vdata}']", f"cache.cache_dir={cache_dir}", "cache.latent_dtype=fp32",
           "validation.validate_every_n_steps=0", "validation.validation_split=0"]
    capsys.readouterr()
    main_ok("cache", args(dataset, tmp_path / "x", 1, *own)[:3] + own)
    assert "cache (validation): encoded 7, already valid 0" in capsys.readouterr().out
    vstore, store = LatentStore(validation_store_dir(str(cache_dir))), LatentStore(str(cache_dir))
    key = twin[:-4]
    assert len(vstore) == 7 and key in vstore and key in store
    assert not torch.equal(vstore.get(key, ["latent"])["latent"], store.get(key, ["latent"])["latent"])
    main_ok("cache", args(dataset, tmp_path / "x", 1, *own)[:3] + own + ["--verify"])
    assert capsys.readouterr().out.count(" damaged") == 2  # both stores checked

    out = tmp_path / "stored"
    log = main_ok("train", args(dataset, out, 2, *own), log_dir=out / "logs")
    assert "validation: 7 held-out image(s)" in log and "16 images" in log  # nothing held out of training
    from_store = val_rows(out)[2]
    # the same weights scored by encoding the images at the pass (no store): the same number
    fly = tmp_path / "fly"
    main_ok("train", args(dataset, fly, 2, *own, "cache.cache_dir=", f"train.resume={out / 'state' / 'step-00000002'}"))
    for k, v in from_store.items():
        if k.startswith("val/"):
            assert val_rows(fly)[2][k] == pytest.approx(v, rel=1e-5), k
    # the images (and captions) gone: the store alone (cache-only rows of the validation index) still gives every image
    for f in os.listdir(vdata):
        os.remove(vdata / f)
    again = tmp_path / "again"
    log = main_ok("train", args(dataset, again, 2, *own), log_dir=again / "logs")
    assert "validation: 7 held-out image(s)" in log
    assert val_rows(again)[2]["val/loss"] == from_store["val/loss"]


def test_own_validation_folder_not_cached_is_one_line(dataset, tmp_path):
    from PIL import Image

    vdata = tmp_path / "vdata"
    vdata.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(vdata / "v.png")
    (vdata / "v.txt").write_text("red")
    with pytest.raises(SystemExit, match=r"image_dirs / metadata_files are not cached: run cache.py"):
        main_ok("train", args(dataset, tmp_path / "run", 2, f"validation.image_dirs=['{vdata}']",
                              "validation.validation_split=0"))
