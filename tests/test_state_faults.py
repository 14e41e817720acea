"""Junk after kills (#28.8), through the real entry point with faults injected by tests/fault_entry.py (monkeypatched,
no hooks in the product code): a kill while a pruned state is deleted leaves nothing that survives the next start;
a rank killed while it renames its RNG file never yields a COMPLETE state that lacks a rank's files or holds a
temporary. Tiny SDXL preset, 4 images encoded on the fly, CPU / gloo."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from core.fsio import is_temp
from helpers import ENV, ROOT, main_ok
from training import resume as rstate


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("faults")
    make_demo_dataset(str(root), n=4, size=(64, 64))
    return root


def _args(images, out, *extra):
    return ["configs/demo.toml", f"data.image_dirs=['{images}']", "cache.cache_dir=", f"output_dir={out}",
            "data.resolution=64", "data.max_bucket_reso=128", "data.batch_size=1", "train.max_train_steps=4",
            "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0",
            "save.save_every_n_steps=2", "save.save_precision=fp16", *extra]


def _fault_run(fault, args, world=1, timeout=600):
    """tests/fault_entry.py FAULT args in `world` processes (torchrun's environment, gloo); their exit codes and
    output."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**ENV, "SDTRAIN_CRASH_WAIT_S": "60"}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "tests/fault_entry.py", fault, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(outs)


def _everything(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)


def test_kill_while_pruning_leaves_nothing_after_the_next_start(images, tmp_path):
    """Was: the pruned state, its progress.json gone, was moved to state/other-runs/unknown/ at the next start and
    kept there forever. Now a pruned state is renamed to a temporary first, and the next start removes it."""
    out = tmp_path / "run"
    args = _args(images, out, "save.save_last_n_states=1")
    codes, log = _fault_run("kill_during_prune=1", args)  # step 4's state written, step 2's being deleted
    assert codes == [-signal.SIGKILL], log[-3000:]
    assert (out / "state" / "step-00000004" / "COMPLETE").is_file(), _everything(out / "state")
    log = main_ok("train", [*args, "train.resume=auto"], out / "logs")
    assert "resumed from" in log and "step-00000004" in log, log[-3000:]
    left = _everything(out / "state")
    assert not any(n.startswith(("step-00000002", rstate.OTHER_RUNS)) or is_temp(n) for n in left), left


def test_half_deleted_state_of_an_earlier_version_is_removed_at_start(images, tmp_path):
    """A state deleted in place by an earlier version and interrupted (progress.json gone, the rest there) is
    finished at the next start, not set aside as another run's."""
    out = tmp_path / "run"
    args = _args(images, out, "train.max_train_steps=2", "save.save_every_n_steps=0")
    main_ok("train", args, out / "logs")
    shutil.copytree(out / "state" / "step-00000002", out / "state" / "step-00000001")  # an older state of the run
    os.remove(out / "state" / "step-00000001" / "progress.json")
    log = main_ok("train", [*args, "train.resume=auto"], out / "logs")
    assert "removed 1 half-deleted state folder(s)" in log, log[-3000:]
    left = sorted(n for n in os.listdir(out / "state") if n != "dataset_index.npz")  # (the index: no store here)
    assert left == ["step-00000002"], _everything(out / "state")


def test_rank_killed_renaming_its_rng_file_never_gives_an_incomplete_complete_state(images, tmp_path):
    """2 processes; rank 1 is killed while it renames rng-rank1.pt into the step-2 state. Was: rank 0's crash save
    reused the half-written folder: COMPLETE without rng-rank1.pt, rank 1's temporary inside. Now every COMPLETE
    state holds the RNG of each rank it names (progress.json rng_ranks: all ranks, or the one that saved alone
    after the crash) and no temporary; the state verifies and is what resume = auto picks."""
    out = tmp_path / "run"
    codes, log = _fault_run("kill_during_rng_write=1:1", _args(images, out), world=2)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, (codes, log[-4000:])
    states = [p for _, p in rstate.list_states(str(out / "state"))]
    assert states, _everything(out)
    for path in states:
        assert rstate.verify_state(path) is None, path
        names = _everything(path)
        assert not any(is_temp(n) for n in names), names
        progress = json.loads(open(os.path.join(path, "progress.json")).read())
        assert progress["world_size"] == 2
        ranks = progress.get("rng_ranks", list(range(progress["world_size"])))
        assert ranks in ([0, 1], [0]), ranks  # every rank, or rank 0 alone (the crash save)
        assert all(f"rng-rank{r}.pt" in names for r in ranks), names
    assert not any(is_temp(n) for n in os.listdir(out / "state")), os.listdir(out / "state")  # the crash save reused
    # (emptied) the step's temporary folder
    assert rstate.find_resume("auto", str(out / "state"), run_id=rstate.read_run_id(str(out))) == states[-1]
