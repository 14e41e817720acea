"""What a run leaves behind when it stops early: a model file and a resumable state.

- Interrupted (SIGTERM / SIGUSR1 / first Ctrl-C, save.save_on_signal / save_on_keyboard_interrupt): every rank
  learns of the request at the end of a step (an all-reduce), so all of them are healthy and at the same point;
  they export `<name>-interrupted.safetensors` and a state together, as a normal export does.
- Crashed (an exception in the loop, save.save_on_exception): the other ranks may be blocked in a collective
  that will never complete, so nothing collective can be used. The first crashed rank to claim the run's
  crash marker (an exclusive file create in the state folder, shared by all ranks like the states themselves)
  writes `<name>-crashed.safetensors` and a state from its own replica (DDP keeps identical weights and
  optimizer state on every rank; only its RNG is saved, the others are re-derived on resume). Every other rank
  that crashed waits for it at most `wait_s` seconds, saying so, then exits; its exit is what lets torchrun stop
  the ranks still blocked.
- Crashed under FSDP: no rank holds the whole model, so the export (gathered tensor by tensor) and the sharded
  state (every rank writes its shards) need every rank. Each crashed rank marks itself in the state folder and
  waits at most `wait_s` seconds for all the others (`all_crashed`); when all are there (an error every rank
  met, e.g. bad data or a full disk of the same batch) they write `-crashed` and a state together, as an
  interrupt does. When a rank is missing (gone, or blocked in a collective) nothing can be gathered: one line
  says so and the last periodic state stays the resume point.
"""
from __future__ import annotations

import glob
import os
import time
from typing import Any, Callable

INTERRUPTED = "-interrupted"  # file-name suffixes, as euge-trainer marks its emergency saves
CRASHED = "-crashed"
WAIT_S = float(os.environ.get("SDTRAIN_CRASH_WAIT_S", "600"))  # bounded wait of crashed ranks for the writer
MARKER = ".crash-"


def clear_markers(state_dir: str) -> None:
    """Remove crash markers of earlier runs (rank 0, at start-up)."""
    for p in glob.glob(os.path.join(state_dir, MARKER + "*")):
        try:
            os.remove(p)
        except OSError:
            pass


def _claim(path: str, rank: int) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(rank))
    return True


def on_crash(state_dir: str, token: str, rank: int, log: Any, write: Callable[[], None] | None,
             wait_s: float = WAIT_S, poll_s: float = 0.2) -> bool:
    """Called by a rank whose loop raised. The first caller of the run runs `write` (None: nothing can be
    written, e.g. sharded FSDP; the reason is logged by the caller); later callers wait for it, bounded.
    Returns whether this rank wrote."""
    os.makedirs(state_dir, exist_ok=True)
    claim = os.path.join(state_dir, f"{MARKER}{token}")
    done = claim + ".done"
    if _claim(claim, rank):
        try:
            if write is not None:
                write()
        except Exception:  # the original exception is what the user must see; this one is logged
            log.exception(f"rank {rank}: writing the crash export failed")
        finally:
            open(done, "w").close()
        return True
    try:
        with open(claim) as f:
            writer = f.read().strip() or "?"
    except OSError:
        writer = "?"
    log.warning(f"rank {rank}: rank {writer} writes the crash export; waiting for it (at most {wait_s:g} s)")
    deadline = time.monotonic() + wait_s
    while not os.path.exists(done):
        if time.monotonic() > deadline:
            log.error(f"rank {rank}: rank {writer} did not finish the crash export within {wait_s:g} s; exiting")
            return False
        time.sleep(poll_s)
    return False


def write_state_alone(state_root: str, step: int, rank: int, *, trained: dict, optimizer: dict, progress: dict,
                      ema: dict | None) -> str | None:
    """A resumable state written by one rank without any collective (its own RNG only). An intact state of the
    same step (e.g. the export just before the crash) is kept as it is. Returns the state's path."""
    from core.fsio import remove_quietly
    from training import resume as rstate
    final = os.path.join(state_root, f"step-{step:08d}")
    if os.path.isdir(final) and rstate.verify_state(final) is None:
        return final
    tmp = rstate.tmp_dir_for(state_root, step)  # names carry host and pid: unique per rank
    remove_quietly(tmp)  # what a collective save of this step left (other ranks' files, a dead rank's temporary)
    rstate.write_rank_rng(tmp, rank)
    return rstate.write_state(tmp, final, trained=trained, optimizer=optimizer, progress=progress, ema=ema,
                              rng_ranks=[rank])


def all_crashed(state_dir: str, token: str, rank: int, world_size: int, log: Any, write: Callable[[], None],
                wait_s: float = WAIT_S, poll_s: float = 0.1) -> bool:
    """FSDP: called by every rank whose loop raised. Marks this rank, waits (at most `wait_s`) for all
    `world_size` ranks to have marked themselves, then runs the collective `write` on every rank (its failure is
    logged, not raised: the original exception is what the user must see). Returns whether `write` ran."""
    os.makedirs(state_dir, exist_ok=True)
    mark = os.path.join(state_dir, f"{MARKER}{token}.rank")
    open(f"{mark}{rank}", "w").close()
    deadline = time.monotonic() + wait_s
    while True:
        missing = [r for r in range(world_size) if not os.path.exists(f"{mark}{r}")]
        if not missing:
            break
        if time.monotonic() > deadline:
            log.error(f"rank {rank}: rank(s) {missing} did not reach the crash save within {wait_s:g} s (gone or "
                      f"blocked); FSDP needs every rank to gather the model and write the state, so nothing was "
                      f"written: resume from the last state")
            return False
        time.sleep(poll_s)
    try:
        write()
    except Exception:
        log.exception(f"rank {rank}: writing the crash export failed")
        return False
    return True
