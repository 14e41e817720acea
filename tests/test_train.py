"""train.py end to end: 2-process demo run, exact resume after a signal, kill -9 during a state write, resume
under another world size.

These run the real launchers where the launch is what is tested (torchrun with gloo on CPU for the 2-process
training, plain `python train.py` for the runs that are signalled or killed; the 2-rank cache runs as 2 workers
with torchrun's environment) on the tiny SDXL preset
and a small generated dataset. The runs that only provide a reference or continue a state run in this process
(train.main), and the expensive ones are shared by the tests through module fixtures: the data is cached once (by
2 ranks), one straight 8-step run is the reference of both resume tests, and the 2-process run's mid-run state is
what the world-size test resumes.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from helpers import ENV, TORCHRUN, main_ok, run_ok, run_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # the reference run's length


def _run(cmd, env=None, timeout=600):
    return run_ok(cmd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """16 demo images, cached by 2 ranks (2 cache.py workers) into root/cache, which every test trains from."""
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(str(root / "data"), n=16, size=(64, 96))
    run_workers(["cache.py", *overrides(root, root / "x", 1)[:3]])
    return root


def overrides(root, out, steps, *extra):
    return ["configs/demo.toml", f"data.image_dirs=['{root / 'data'}']", f"cache.cache_dir={root / 'cache'}",
            f"output_dir={out}", f"train.max_train_steps={steps}", "optimizer.lr_warmup_steps=0",
            "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0", "save.save_every_n_steps=0",
            "data.batch_size=2", *extra]


def metrics(out):
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_process_run(dataset, tmp_path_factory):
    """torchrun train.py, 2 processes, 4 steps, a state every 2 steps, previews at step 4: (folder, stderr)."""
    tmp = tmp_path_factory.mktemp("two")
    out = tmp / "run"
    prompts = tmp / "p.txt"
    prompts.write_text("a red circle --d 5 --s 3\n# comment\na blue square --d 6 --s 3 --w 64 --h 96\n")
    res = _run(TORCHRUN + ["train.py", *overrides(dataset, out, 4, "save.save_every_n_steps=2",
                                                  f"sample.sample_prompts={prompts}", "sample.sample_every_n_steps=4",
                                                  "sample.sample_params={width=64, height=64}")])
    return out, res.stderr


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """The reference: STEPS steps in one go (in process), a state every 2 steps (kept: 2, 4, 6, 8)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    main_ok("train", overrides(dataset, out, STEPS, "save.save_every_n_steps=2", "save.save_last_n_states=5"))
    return out


@pytest.mark.slow
def test_two_process_cache_train_export_samples(two_process_run):
    out, stderr = two_process_run
    # the start and end summaries, once (rank 0)
    assert stderr.count("run summary") == 1 and "2 per process x 1 accumulation x 2 process(es)" in stderr
    assert "16 images trained" in stderr and "= 4 images per optimizer step" in stderr
    assert stderr.count("run finished") == 1 and f"model      {out / 'models' / 'demo.safetensors'}" in stderr
    assert "steps 0 -> 4 of 4, " in stderr and "last grid 000004_grid.png" in stderr
    import models
    comp = models.load(str(out / "models" / "demo.safetensors"))
    assert comp.family == "sdxl" and comp.unet is not None
    assert os.path.isfile(out / "models" / "demo-step00000002.safetensors")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "images_per_s"} <= r.keys() for r in rows)
    from PIL import Image
    pngs = sorted(p for p in os.listdir(out / "samples") if p.endswith(".png"))
    assert "000004_0_5.png" in pngs and "000004_1_6.png" in pngs and "000004_grid.png" in pngs
    with Image.open(out / "samples" / "000004_1_6.png") as im:
        assert im.size == (64, 96) and "a blue square" in im.text["parameters"]
    with Image.open(out / "samples" / "000004_grid.png") as im:
        assert im.width == 128 and im.height > 96 + 8  # two tiles side by side, a label strip under them
    assert os.path.isfile(out / "config.toml") and os.path.isfile(out / "logs" / "train.log")
    states = os.listdir(out / "state")
    assert "step-00000004" in states and "step-00000002" in states
    assert {"rng-rank0.pt", "rng-rank1.pt", "COMPLETE"} <= set(os.listdir(out / "state" / "step-00000004"))


def _weights_at(out, step=None):
    """The trained weights of the state at `step` (default: the newest)."""
    names = sorted(p for p in os.listdir(os.path.join(out, "state")) if p.startswith("step-") and ".tmp" not in p)
    state = names[-1] if step is None else f"step-{step:08d}"
    assert state in names, (state, names)
    return load_file(os.path.join(out, "state", state, "trained.safetensors"))


def _losses(out):
    return {r["step"]: r["loss"] for r in metrics(out)}


@pytest.mark.slow
def test_kill9_during_state_write_resumes_from_previous_state(dataset, request, tmp_path):
    out = tmp_path / "run"
    args = overrides(dataset, out, 6, "save.save_every_n_steps=2", "save.save_last_n_states=5")
    fault = "kill_during_state_write=2"  # SIGKILL inside the 2nd state write (step 4)
    proc = subprocess.Popen([sys.executable, "tests/fault_entry.py", fault, *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    straight = request.getfixturevalue("straight")  # (first use: trained here while the killed run starts up)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    names = os.listdir(out / "state")
    assert "step-00000002" in names and "step-00000004" not in names
    assert any(n.startswith("step-00000004.tmp") for n in names)  # the half-written one
    log = main_ok("train", [*args, "train.resume=auto"], out / "logs")
    assert "resumed from" in log and "step-00000002" in log
    # the straight run's weights after the same 6 steps (a constant LR: its first 6 steps are a 6-step run's)
    wa, wb = _weights_at(straight, 6), _weights_at(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(".tmp" in n for n in os.listdir(out / "state"))


@pytest.mark.slow
def test_exact_resume_after_sigterm(dataset, straight, tmp_path):
    """STEPS steps straight == interrupted by SIGTERM mid-run + resume=auto: same losses, bit-exact weights."""
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "train.py", *overrides(dataset, resumed, STEPS)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        p = resumed / "logs" / "metrics.jsonl"
        if p.exists() and p.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    stopped_at = max(_losses(resumed))
    assert stopped_at < STEPS, "the run finished before the signal arrived"
    assert "stop requested" in log
    log = main_ok("train", overrides(dataset, resumed, STEPS, "train.resume=auto"), resumed / "logs")
    assert f"resumed from {resumed / 'state' / f'step-{stopped_at:08d}'}" in log
    a, b = _losses(straight), _losses(resumed)
    assert a.keys() == b.keys() == set(range(1, STEPS + 1))
    assert all(a[k] == b[k] for k in a), (a, b)
    wa, wb = _weights_at(straight, STEPS), _weights_at(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_damaged_state_is_skipped(tmp_path):
    from training import resume as rstate
    root = tmp_path / "state"
    for step in (2, 4):
        tmp = rstate.tmp_dir_for(str(root), step)
        rstate.write_rank_rng(tmp, 0)
        rstate.write_state(tmp, str(root / f"step-{step:08d}"), trained={"w": torch.ones(3) * step},
                           optimizer={"state": {}, "param_groups": []}, progress={"step": step})
    assert rstate.find_resume("auto", str(root)) == str(root / "step-00000004")
    with open(root / "step-00000004" / "trained.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00")
    seen = []
    assert rstate.find_resume("auto", str(root), seen.append) == str(root / "step-00000002")
    assert "checksum" in seen[0]
    with pytest.raises(rstate.StateError, match="checksum"):
        rstate.find_resume(str(root / "step-00000004"), str(root))
    assert torch.equal(rstate.read_state(str(root / "step-00000002"), 0)["trained"]["w"], torch.ones(3) * 2)


@pytest.mark.slow
def test_resume_with_another_world_size_continues_the_epoch(dataset, two_process_run, tmp_path):
    """The 2-process run's state after 2 steps (4 global batches), resumed by 1 process: the epoch goes on at global
    batch 4 and ends after exactly the remaining batches, then epoch 1 starts."""
    import shutil
    from core.config import load_config
    from data.index import DatasetIndex
    from data.loader import global_batches, usable_rows
    from data.store import LatentStore
    state = two_process_run[0] / "state" / "step-00000002"
    assert json.load(open(state / "progress.json"))["world_size"] == 2
    out = tmp_path / "run"
    os.makedirs(out / "state")
    shutil.copytree(state, out / "state" / state.name)
    shutil.copy(two_process_run[0] / "run.json", out / "run.json")  # that run's id: resume = auto takes its state
    cfg = load_config(os.path.join(ROOT, "configs/demo.toml"), overrides(dataset, out, 2)[1:])
    index = DatasetIndex.load(str(dataset / "cache" / "dataset_index.npz"))
    n = len(global_batches(index, cfg.data.batch_size, cfg.seed, 0, usable_rows(index, LatentStore(str(dataset / "cache")))))
    steps = 2 + (n - 4) + 2  # the rest of epoch 0 on one process, then two steps of epoch 1
    log = main_ok("train", overrides(dataset, out, steps, "train.resume=auto"), out / "logs")
    assert f"resumed from {out / 'state' / state.name}" in log
    assert "resuming with 1 processes (state saved with 2)" in log
    epochs = {r["step"]: r["epoch"] for r in metrics(out)}
    assert sorted(epochs) == list(range(3, steps + 1))
    assert [epochs[s] for s in range(3, steps + 1)] == [0] * (n - 4) + [1, 1]
