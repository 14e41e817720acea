"""Test-only entry point: train.py (or cache.py) with one injected fault, for the tests that need a real process
(torchrun, kill -9, a second process).

    python tests/fault_entry.py FAULT cfg.toml [table.key=value ...]          # instead of train.py
    torchrun --nproc_per_node=2 tests/fault_entry.py FAULT cfg.toml [...]

FAULT is one of
    raise_at_step=N[:R]          a RuntimeError at the start of step N + 1 (after N optimizer steps, their saves and
                                 previews), on rank R only when given
    kill_during_state_write=N    SIGKILL inside the N-th resumable-state write, just before its COMPLETE marker
    cache_hold_lock_until=PATH   cache.py (instead of train.py) that, once it holds the store's lock, waits until the
                                 file PATH exists before it goes on (a test's second cache.py is then surely waiting)
    kill_during_prune=N          SIGKILL while the N-th pruned state is deleted, right after its progress.json is gone
    kill_during_rng_write=N:R    SIGKILL on rank R while it renames its RNG file into the N-th state (the temporary
                                 is written, the rename not done)

The product code has no hooks for this: the faults are monkeypatched in here, then train.main runs as train.py's
__main__ does.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from core import cli, dist  # noqa: E402
from core.fsio import temp_path  # noqa: E402
from training import resume as rstate  # noqa: E402
from training.checkpointer import Progress  # noqa: E402


def raise_at_step(spec: str) -> None:
    """Raise before the forward of the step after `at` steps (on rank `only` when given)."""
    at, _, only = spec.partition(":")
    runs: list[Progress] = []

    def progress(*args, **kwargs) -> Progress:  # train.main's one Progress, kept to read its step
        runs.append(Progress(*args, **kwargs))
        return runs[-1]

    accumulate = train.accumulate_gradients

    def accumulate_gradients(*args, **kwargs):
        step, rank = runs[-1].step, dist.rank()
        if step == int(at) and (not only or rank == int(only)):
            raise RuntimeError(f"injected test fault at step {step} on rank {rank}")
        return accumulate(*args, **kwargs)

    train.Progress = progress
    train.accumulate_gradients = accumulate_gradients


def kill_during_state_write(spec: str) -> None:
    """SIGKILL this process when it is about to write the N-th state's COMPLETE marker (the files are written)."""
    write_json, markers = rstate._write_json, [0]

    def _write_json(path: str, obj) -> None:
        if os.path.basename(path) == rstate.MARKER:
            markers[0] += 1
            if markers[0] == int(spec):
                os.kill(os.getpid(), signal.SIGKILL)
        write_json(path, obj)

    rstate._write_json = _write_json


def cache_hold_lock_until(path: str):
    """cache.py whose store folder, once locked, is only used after `path` exists (at most GATE_WAIT_S)."""
    import time

    import cache
    prepare = cache.prepare_store_dir

    def prepare_store_dir(cc):
        root = prepare(cc)  # returns with the lock held
        deadline = time.monotonic() + GATE_WAIT_S
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise SystemExit(f"fault_entry: {path} did not appear within {GATE_WAIT_S} s")
            time.sleep(0.05)
        return root

    cache.prepare_store_dir = prepare_store_dir
    return cache.main


def kill_during_prune(spec: str) -> None:
    """SIGKILL inside the N-th deletion of a state folder (pruning), once its progress.json is unlinked: every
    tree deletion goes through shutil.rmtree, whatever the pruning does first."""
    rmtree, seen = shutil.rmtree, [0]

    def _rmtree(path, *args, **kwargs):
        progress = os.path.join(str(path), "progress.json")
        if re.match(r"step-\d{8}", os.path.basename(str(path))) and os.path.isfile(progress):
            seen[0] += 1
            if seen[0] == int(spec):
                os.remove(progress)
                os.kill(os.getpid(), signal.SIGKILL)
        return rmtree(path, *args, **kwargs)

    shutil.rmtree = _rmtree


def kill_during_rng_write(spec: str) -> None:
    """On rank R: the N-th RNG file written as far as its temporary, then SIGKILL before the rename."""
    nth, _, rank = spec.partition(":")
    save, calls = rstate.torch_save, [0]

    def torch_save(obj, path: str) -> None:
        if re.fullmatch(r"rng-rank\d+\.pt", os.path.basename(path)) and dist.rank() == int(rank or 0):
            calls[0] += 1
            if calls[0] == int(nth):
                with open(temp_path(path), "wb") as f:  # the temporary atomic_write leaves when killed here
                    f.write(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
        save(obj, path)

    rstate.torch_save = torch_save


GATE_WAIT_S = 300
FAULTS = {"raise_at_step": raise_at_step, "kill_during_state_write": kill_during_state_write,
          "cache_hold_lock_until": cache_hold_lock_until, "kill_during_prune": kill_during_prune,
          "kill_during_rng_write": kill_during_rng_write}

if __name__ == "__main__":
    name, _, value = sys.argv[1].partition("=")
    entry = FAULTS[name](value) or train.main  # a fault that runs another entry point returns its main
    code = entry(sys.argv[2:])
    dist.shutdown()
    cli.exit_now(code)
