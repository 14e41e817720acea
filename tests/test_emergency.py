"""Early stops under 2-process DDP (torchrun, gloo): an exception in one rank's loop and a SIGTERM each leave a
loadable model file (-crashed / -interrupted) and a resumable state, and no rank hangs.

Run 1 raises on rank 1 only (test hook) while rank 0 is in the step's collectives; both processes must end on
their own (nothing kills the blocked rank 0). Run 2 resumes from the state run 1 left (so that state is shown to be
resumable) and is stopped by SIGTERM sent to every process, as SLURM signals every task. The two workers are
started as torchrun / srun start them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT; gloo), without
torchrun's agent process (one torch import less per run); tiny SDXL preset, 4 images encoded on the fly.
"""
import json
import os
import signal
import subprocess
import sys
import time

import socket

import pytest
from helpers import ENV, ROOT

WORLD = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("emergency")
    make_demo_dataset(str(root / "data"), n=4, size=(64, 64))
    return root


def _args(root, out, *extra):
    return ["train.py", "configs/demo.toml", f"data.image_dirs=['{root / 'data'}']", "cache.cache_dir=",
            "data.resolution=64", "data.max_bucket_reso=128", f"output_dir={out}", "train.max_train_steps=200",
            "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0",
            "save.save_every_n_steps=0", "data.batch_size=1", "save.save_precision=fp16", *extra]


def _launch(args, env, out_dir):
    """WORLD worker processes with torchrun's environment; each one's output goes to a file in out_dir."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for rank in range(WORLD):
        logs.append(open(out_dir / f"rank{rank}.log", "w+"))
        penv = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=penv, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, text=True))
    return procs, logs


def _wait(procs, logs, timeout):
    codes = [p.wait(timeout=timeout) for p in procs]
    text = ""
    for f in logs:
        f.seek(0)
        text += f.read()
        f.close()
    return codes, text


def _metric_steps(out):
    p = out / "logs" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in p.read_text().splitlines()] if p.exists() else []


def _check_outputs(out, suffix):
    import models
    from training import resume as rstate
    comp = models.load(str(out / "models" / f"demo{suffix}.safetensors"), parts=("unet",))
    assert comp.unet is not None
    found = rstate.find_resume("auto", str(out / "state"), run_id=rstate.read_run_id(str(out)))
    assert found is not None and rstate.verify_state(found) is None
    return found


def test_two_process_crash_and_sigterm_leave_model_and_state(data, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    env = {**ENV, "SDTRAIN_CRASH_WAIT_S": "60"}
    faulty = ["tests/fault_entry.py", "raise_at_step=2:1", *_args(data, out)[1:]]  # train.py raising on rank 1
    codes, log = _wait(*_launch(faulty, env, tmp_path), timeout=300)
    took = time.monotonic() - t0
    assert all(c != 0 for c in codes) and "injected test fault at step 2 on rank 1" in log, log[-4000:]
    state = _check_outputs(out, "-crashed")
    assert os.path.basename(state) == "step-00000002"
    assert took < 200, f"a rank hung after the crash ({took:.0f} s)"

    procs, logs = _launch(_args(data, out, "train.resume=auto"), ENV, tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and max(_metric_steps(out), default=0) < 3 and procs[0].poll() is None:
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGTERM)  # every task, as SLURM does
    codes, log = _wait(procs, logs, timeout=240)
    assert codes == [0] * WORLD, log[-4000:]
    assert "resumed from" in log and "step-00000002" in log, log[-4000:]
    assert "stop requested (SIGTERM)" in log, log[-4000:]
    state = _check_outputs(out, "-interrupted")
    stopped = int(os.path.basename(state).split("-")[1])
    assert 3 <= stopped < 200
