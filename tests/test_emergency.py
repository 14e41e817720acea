"""Early stops under 2-process DDP (torchrun, gloo): an exception in one rank's loop and a SIGTERM each leave a
loadable model file (-crashed / -interrupted) and a resumable state, and no rank hangs.

Run 1 raises on rank 1 only (test hook) while rank 0 is in the step's collectives; run 2 resumes from the state
run 1 left (so that state is shown to be resumable) and is stopped by SIGTERM sent to torchrun, as a scheduler
does. Both are the real launcher on the tiny SDXL preset, images encoded on the fly (no cache step).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ENV, ROOT, TORCHRUN


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("emergency")
    make_demo_dataset(str(root / "data"), n=8, size=(64, 64))
    return root


def _args(root, out, *extra):
    return ["train.py", "configs/demo.toml", f"data.image_dirs=['{root / 'data'}']", "cache.cache_dir=",
            "data.resolution=64", "data.max_bucket_reso=128", f"output_dir={out}", "train.max_train_steps=200",
            "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0",
            "save.save_every_n_steps=0", "data.batch_size=1", "save.save_precision=fp32", *extra]


def _metric_steps(out):
    p = out / "logs" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in p.read_text().splitlines()] if p.exists() else []


def _check_outputs(out, suffix):
    import models
    from core import state as rstate
    comp = models.load(str(out / "models" / f"demo{suffix}.safetensors"), parts=("unet",))
    assert comp.unet is not None
    found = rstate.find_resume("auto", str(out / "state"), run_id=rstate.read_run_id(str(out)))
    assert found is not None and rstate.verify_state(found) is None
    return found


def test_two_process_crash_and_sigterm_leave_model_and_state(data, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    env = {**ENV, "SDTRAIN_TEST_RAISE_AT_STEP": "2:1", "SDTRAIN_CRASH_WAIT_S": "60"}
    crashed = subprocess.run([*TORCHRUN, *_args(data, out)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    took = time.monotonic() - t0
    log = crashed.stdout + crashed.stderr
    assert crashed.returncode != 0 and "injected test fault at step 2 on rank 1" in log, log[-4000:]
    state = _check_outputs(out, "-crashed")
    assert os.path.basename(state) == "step-00000002"
    assert took < 200, f"a rank hung after the crash ({took:.0f} s)"

    proc = subprocess.Popen([*TORCHRUN, *_args(data, out, "train.resume=auto")], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and max(_metric_steps(out), default=0) < 4 and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both workers
    log, _ = proc.communicate(timeout=240)
    assert "resumed from" in log and "step-00000002" in log, log[-4000:]
    assert "stop requested (SIGTERM)" in log, log[-4000:]
    state = _check_outputs(out, "-interrupted")
    stopped = int(os.path.basename(state).split("-")[1])
    assert 4 <= stopped < 200
