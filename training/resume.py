"""Resumable training state: written whole and atomically, found again after any crash.

A state is a folder `state/step-00001234/` holding
  - `trained.safetensors`  the trained modules' weights (part-prefixed keys), exact dtype
  - `optimizer.pt`         optimizer state (tensors + plain numbers; loaded with weights_only=True)
  - `ema.safetensors`      EMA shadow weights (when enabled)
  - `rng-rank{r}.pt`       every rank's RNG states (weights_only)
  - `progress.json`        step, epoch, data cursor, scheduler / scaler / loss recorder, world size, config,
                           run id, write time
  - `COMPLETE`             written last: sizes + sha256 of every file above
Under FSDP the weights, optimizer and EMA are instead one torch.distributed.checkpoint (DCP) folder `dcp/`
written by every rank in parallel (`__<rank>_0.distcp`: that rank's shards; `.metadata`: the global layout,
from rank 0), so no process gathers the model. Each rank hashes the files it wrote; rank 0 puts every hash
into COMPLETE. DCP reshards on load: such a state resumes under any world size, with FSDP or without it (a
single process reads the full tensors).
Everything is first written into `step-00001234.tmp-sdtrain-<host>-<pid>/`, fsynced, then renamed; a failed
write removes it, one left by a killed process is removed at the next start (core/fsio.py). No pickle of
arbitrary objects is ever loaded.

States belong to a run. A run has an id (`output_dir/run.json`), written into each of its states; a run that
resumes a state continues that state's run. The top level of `state/` holds the current run's states only: when
a run starts, states of other runs are moved to `state/other-runs/<run id>/` (kept, never pruned, never resumed
by "auto"). `resume = "auto"` takes the newest intact state of the output_dir's run and refuses, naming the
state, when it was saved with other training settings or when only other runs' states exist (resume one of
those by its path). Pruning keeps the newest `save_last_n_states` states of the current run, by write time,
and never the one just written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from core.fsio import (atomic_write, fsync_dir as _fsync_dir, fsync_file as _fsync_file, is_temp, remove_quietly,
                       save_safetensors, temp_path, torch_save)

STATE_RE = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"
DCP_DIR = "dcp"                # a sharded (FSDP) state's torch.distributed.checkpoint folder
RUN_FILE = "run.json"          # in output_dir: the id of the run that writes there now
OTHER_RUNS = "other-runs"      # state/other-runs/<run id>/: states of earlier runs, set aside
# Settings a resumed run may change without being "other settings" (length, logging, saving, previews, workers).
RESUMABLE_CHANGES = ("output_dir", "train.resume", "train.max_train_steps", "train.max_train_epochs",
                     "train.max_bad_steps", "train.compile", "data.max_dataloader_n_workers",
                     "data.persistent_data_loader_workers", "cache.num_workers", "cache.vae_batch_size",
                     "save.", "sample.", "log.")


class StateError(RuntimeError):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tmp_dir_for(state_root: str, step: int) -> str:
    """The temporary folder of a state (rank 0 names it; the other ranks are told)."""
    return temp_path(os.path.join(state_root, f"step-{step:08d}"))


def write_rank_rng(tmp: str, rank: int) -> None:
    """Each rank writes its own RNG states into the shared temporary folder."""
    os.makedirs(tmp, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch_save(rng, os.path.join(tmp, f"rng-rank{rank}.pt"))


def hash_files(tmp: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} of files (paths relative to tmp), fsynced first: what each rank adds to COMPLETE."""
    out = {}
    for name in names:
        p = os.path.join(tmp, name)
        _fsync_file(p)
        out[name] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
    return out


def rank_files(tmp: str, rank: int) -> list[str]:
    """The files rank `rank` wrote into a state folder: its RNG file and its DCP shard files."""
    names = [f"rng-rank{rank}.pt"]
    shard_dir = os.path.join(tmp, DCP_DIR)
    if os.path.isdir(shard_dir):
        names += sorted(f"{DCP_DIR}/{n}" for n in os.listdir(shard_dir) if n.startswith(f"__{rank}_"))
    return names


def write_state(tmp: str, final: str, *, progress: dict[str, Any], trained: dict[str, torch.Tensor] | None = None,
                optimizer: dict[str, Any] | None = None, ema: dict[str, torch.Tensor] | None = None,
                hashed: dict[str, dict[str, Any]] | None = None, rng_ranks: list[int] | None = None) -> str:
    """Rank 0: write the shared files, the COMPLETE marker last, then rename tmp -> final. `progress` should
    carry the run id ("run_id"); the write time is added. On a failure (a full disk) the temporary folder is
    removed and the error names the file: the states already there are untouched.
    `hashed`: files the ranks wrote and hashed themselves (rank_files / hash_files); every other file in tmp (the
    rest of a DCP folder included) is hashed here. `trained` / `optimizer` are None for a sharded (DCP) state.
    `rng_ranks`: the ranks whose RNG files the state holds (recorded in progress.json); default every rank of
    progress["world_size"]. A state is marked COMPLETE only when each of them is there: a rank that died while
    writing leaves none, and its unfinished temporary is not kept in the state."""
    ranks = list(range(int(progress.get("world_size", 1)))) if rng_ranks is None else list(rng_ranks)
    try:
        os.makedirs(tmp, exist_ok=True)
        missing = [r for r in ranks if not os.path.isfile(os.path.join(tmp, f"rng-rank{r}.pt"))]
        if missing:
            raise StateError(f"{final}: rank(s) {missing} did not write their RNG state; the state is not kept")
        for d in (tmp, os.path.join(tmp, DCP_DIR)):  # writers that did not finish (a killed rank): not part of it
            for name in os.listdir(d) if os.path.isdir(d) else ():
                if is_temp(name):
                    remove_quietly(os.path.join(d, name))
        _write_state_files(tmp, trained, optimizer, {**progress, "rng_ranks": ranks}, ema, hashed or {})
        if os.path.exists(final):  # the same step of this run written again (a resume from an earlier state)
            remove_state(final)
        os.replace(tmp, final)
    except BaseException as e:
        remove_quietly(tmp)
        if isinstance(e, OSError) and isinstance(e.filename, str) and e.filename.startswith(tmp):
            e.filename = final + e.filename[len(tmp):]  # name the state, not its (removed) temporary
        raise
    _fsync_dir(os.path.dirname(final))
    return final


def _write_state_files(tmp: str, trained: dict[str, torch.Tensor] | None, optimizer: dict[str, Any] | None,
                       progress: dict[str, Any], ema: dict[str, torch.Tensor] | None,
                       hashed: dict[str, dict[str, Any]]) -> None:
    if trained is not None:
        save_safetensors(trained, os.path.join(tmp, "trained.safetensors"))
    if optimizer is not None:
        torch_save(optimizer, os.path.join(tmp, "optimizer.pt"))
    if ema is not None:
        save_safetensors(ema, os.path.join(tmp, "ema.safetensors"))
    _write_json(os.path.join(tmp, "progress.json"), {**progress, "saved_ns": time.time_ns()})
    files = {name: os.path.join(tmp, name) for name in sorted(os.listdir(tmp))
             if name not in hashed and (name in ("trained.safetensors", "optimizer.pt", "ema.safetensors",
                                                 "progress.json") or re.fullmatch(r"rng-rank\d+\.pt", name))}
    if os.path.isdir(os.path.join(tmp, DCP_DIR)):  # the shard layout (.metadata) rank 0 wrote; shards are hashed
        for name in sorted(os.listdir(os.path.join(tmp, DCP_DIR))):
            rel = f"{DCP_DIR}/{name}"
            if rel not in hashed:
                files[rel] = os.path.join(tmp, DCP_DIR, name)
        _fsync_dir(os.path.join(tmp, DCP_DIR))
    manifest = {name: {"size": os.path.getsize(path), "sha256": _sha256(path)} for name, path in files.items()}
    manifest.update(hashed)
    _write_json(os.path.join(tmp, MARKER), manifest)
    _fsync_dir(tmp)


def _write_json(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def verify_state(path: str, checksums: bool = True) -> str | None:
    """None when the state is complete and intact; else the reason. `checksums = False`: the marker and every file
    it lists at its size, nothing hashed (check_state_files)."""
    if not os.path.isdir(path):
        return "no such state folder"
    mp = os.path.join(path, MARKER)
    if not os.path.isfile(mp):
        return "incomplete (no COMPLETE marker)"
    try:
        with open(mp) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable marker: {e}"
    for name, info in manifest.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"missing {name}"
        if os.path.getsize(p) != info["size"] or (checksums and _sha256(p) != info["sha256"]):
            return f"{name} does not match its checksum" if checksums else f"{name} has the wrong size"
    return None


def check_state_files(path: str) -> str | None:
    """A state named by its path, checked before a run writes anything (training/preflight.py): the folder, its
    marker and every file at its size; the checksums are verified when the state is chosen (find_resume)."""
    return verify_state(path, checksums=False)


def list_states(state_root: str) -> list[tuple[int, str]]:
    """(step, path) of the state folders directly under state_root, by step."""
    if not os.path.isdir(state_root):
        return []
    out = []
    for name in os.listdir(state_root):
        m = STATE_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(state_root, name)))
    return sorted(out)


def read_progress(path: str) -> dict[str, Any]:
    """progress.json of a state ({} when unreadable)."""
    try:
        with open(os.path.join(path, "progress.json")) as f:
            out = json.load(f)
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _saved_ns(path: str, progress: dict[str, Any]) -> int:
    """When a state was written: its own record, else its marker's mtime."""
    if isinstance(progress.get("saved_ns"), int):
        return progress["saved_ns"]
    try:
        return os.stat(os.path.join(path, MARKER)).st_mtime_ns
    except OSError:
        return 0


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("optimizer_kwargs", "sample_params")
                   else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """Training settings that differ between a state's config and the current one ("key: old -> new")."""
    if not saved or not current:
        return []
    a, b = _flat(saved), _flat(current)
    out = []
    for k in sorted(set(a) | set(b)):
        if any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES):
            continue
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def find_resume(spec: str, state_root: str, log: Callable[[str], None] = print, *, run_id: str | None = None,
                config: dict[str, Any] | None = None) -> str | None:
    """The state to resume from, or None for a fresh start; StateError (one line) when it must not go on.

    A path -> that state, verified. "auto" -> the newest intact state of run `run_id` (damaged ones reported
    and skipped); refused when it was saved with other training settings than `config`, or when state_root
    holds only states of other runs. States written before run ids existed (no run id, no run.json) are
    adopted when their settings match, with a warning."""
    if not spec:
        return None
    if spec != "auto":
        if not os.path.isdir(spec):
            raise StateError(f"cannot resume from {spec}: no such state folder")
        reason = verify_state(spec)
        if reason:
            raise StateError(f"cannot resume from {spec}: {reason}")
        changes = config_changes(read_progress(spec).get("config"), config)
        if changes:
            log(f"resuming {spec} with changed settings: {'; '.join(changes[:5])}")
        return spec
    others = []
    for _, path in sorted(((_saved_ns(p, read_progress(p)), p) for _, p in list_states(state_root)), reverse=True):
        reason = verify_state(path)
        if reason is not None:
            log(f"resume: skipping {path}: {reason}")
            continue
        progress = read_progress(path)
        legacy = run_id is None and "run_id" not in progress
        if progress.get("run_id") != run_id and not legacy:
            others.append((path, progress.get("run_id")))
            continue
        changes = config_changes(progress.get("config"), config)
        if changes:
            raise StateError(f"resume = auto: {path} was saved with other settings ({'; '.join(changes[:3])}"
                             f"{'; ...' if len(changes) > 3 else ''}); to continue it with these settings set "
                             f"train.resume = \"{path}\", or use another output_dir")
        if legacy:
            log(f"resume = auto: {path} has no run id (written by an earlier version); its settings match, "
                f"resuming it")
        return path
    if others:
        path, rid = others[0]
        raise StateError(f"resume = auto: {state_root} holds states of another run only (newest: {path}, run "
                         f"{rid or 'unknown'}; this output_dir's run is {run_id or 'new'}); set train.resume = "
                         f"\"{path}\" to continue that run, or train.resume = \"\" to start a new one")
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Runs: an id per run, in output_dir/run.json and in every state


def new_run_id() -> str:
    """A new run's id: its start time and 8 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4)


def read_run_id(output_dir: str) -> str | None:
    """The id of the run that last wrote into output_dir (None: none yet, or unreadable)."""
    try:
        with open(os.path.join(output_dir, RUN_FILE)) as f:
            rid = json.load(f).get("run_id")
        return rid if isinstance(rid, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def start_run(output_dir: str, state_root: str, resume: str, config: dict[str, Any],
              log: Callable[[str], None] = print) -> tuple[str | None, str]:
    """Rank 0, before anything is loaded: choose the state to resume (find_resume), decide the run id (the
    resumed state's, else a new one), set other runs' states aside and write output_dir/run.json.
    Returns (state to resume or None, run id)."""
    current = read_run_id(output_dir)
    remove_half_deleted(state_root, log)
    path = find_resume(resume, state_root, log, run_id=current, config=config)
    if resume == "auto" and path is None:
        log("resume = auto: no complete state found; starting from scratch")
    run_id = (read_progress(path).get("run_id") or current or new_run_id()) if path else new_run_id()
    set_aside_other_runs(state_root, run_id, keep=path, log=log)
    _write_json(os.path.join(output_dir, RUN_FILE), {"run_id": run_id, "resumed_from": path,
                                                      "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    return path, run_id


def set_aside_other_runs(state_root: str, run_id: str, keep: str | None = None,
                         log: Callable[[str], None] = print) -> list[str]:
    """Move the top-level states not of `run_id` (except `keep`) to state/other-runs/<their id>/."""
    moved = []
    for _, path in list_states(state_root):
        rid = read_progress(path).get("run_id")
        if rid == run_id or (keep and os.path.abspath(path) == os.path.abspath(keep)):
            continue
        dest_dir = os.path.join(state_root, OTHER_RUNS, re.sub(r"[^A-Za-z0-9_.-]", "_", rid or "unknown"))
        os.makedirs(dest_dir, exist_ok=True)
        dest = os.path.join(dest_dir, os.path.basename(path))
        if os.path.exists(dest):
            dest += f"-{time.time_ns()}"  # never overwrite a kept state
        os.replace(path, dest)
        moved.append(dest)
    if moved:
        log(f"{len(moved)} state(s) of other runs moved to {os.path.join(state_root, OTHER_RUNS)} (kept; resume "
            f"one with train.resume = <its path>): {', '.join(moved[:3])}{' ...' if len(moved) > 3 else ''}")
    return moved


def read_state(path: str, rank: int) -> dict[str, Any]:
    """progress, RNG, and either the full tensors (trained / optimizer / ema) or `dcp`: the sharded folder, read
    by load_sharded once the model, optimizer and EMA exist."""
    with open(os.path.join(path, "progress.json")) as f:
        progress = json.load(f)
    out: dict[str, Any] = {"progress": progress}
    if os.path.isdir(os.path.join(path, DCP_DIR)):
        out["dcp"] = os.path.join(path, DCP_DIR)
    else:
        out["trained"] = load_file(os.path.join(path, "trained.safetensors"))
        out["optimizer"] = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu")
    if os.path.isfile(os.path.join(path, "ema.safetensors")):
        out["ema"] = load_file(os.path.join(path, "ema.safetensors"))
    rng_path = os.path.join(path, f"rng-rank{rank}.pt")
    out["rng"] = torch.load(rng_path, weights_only=True) if os.path.isfile(rng_path) else None
    return out


def restore_rng(rng: dict[str, torch.Tensor] | None) -> None:
    """This rank's CPU (and CUDA) RNG states back, as write_rank_rng saved them."""
    if not rng:
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def remove_state(path: str) -> None:
    """Remove a state folder: first renamed to its temporary name (one atomic step: from then on it is no state),
    then deleted. A kill half-way leaves a temporary whose writer is gone, which the next start removes
    (core.fsio.clean_stale_temps), never a half-deleted state that looks like another run's."""
    doomed = temp_path(path, ".deleting")  # (not the name of the state folder being written: tmp_dir_for)
    os.replace(path, doomed)
    _fsync_dir(os.path.dirname(path))
    shutil.rmtree(doomed, ignore_errors=True)


def remove_half_deleted(state_root: str, log: Callable[[str], None] = print) -> list[str]:
    """Rank 0 at start: remove the top-level state folders that lost files to an interrupted delete (no COMPLETE
    marker, or a file the marker lists is gone: states are renamed into place only once complete, so nothing else
    leaves one; earlier versions deleted in place). Returns the removed paths."""
    removed = []
    for _, path in list_states(state_root):
        reason = check_state_files(path)
        if reason is not None and (reason.startswith("incomplete") or reason.startswith("missing ")):
            remove_state(path)
            removed.append(path)
    if removed:
        log(f"removed {len(removed)} half-deleted state folder(s) (an interrupted clean-up): "
            f"{', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")
    return removed


def prune_states(state_root: str, keep: int, run_id: str | None, just_written: str | None = None) -> list[str]:
    """Keep the newest `keep` states of run `run_id` by write time (and always `just_written`); states of other
    runs are never touched. Returns the removed paths (each removed by remove_state)."""
    mine = []
    for _, path in list_states(state_root):
        progress = read_progress(path)
        if progress.get("run_id") == run_id:
            mine.append((_saved_ns(path, progress), path))
    mine.sort(reverse=True)
    removed = []
    for _, path in mine[max(keep, 1):]:
        if just_written and os.path.abspath(path) == os.path.abspath(just_written):
            continue
        remove_state(path)
        removed.append(path)
    return removed


# -----------------------------------------------------------------------------
# Sharded states (FSDP2): torch.distributed.checkpoint, every rank writes its own shards


# Trained parameters only: a LoRA run's frozen base model stays out of its states (the adapters are what is trained).
def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=True, **kw)


def sharded_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: Any = None) -> dict[str, Any]:
    """The trained weights (parameters with requires_grad, and buffers) and the optimizer state keyed by
    parameter name (DTensor shards under FSDP2, no gathering), plus the EMA's shards: what write_sharded saves
    and load_sharded fills."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_options())
    sd: dict[str, Any] = {"model": weights, "optimizer": optim}
    if ema is not None:
        sd["ema"] = ema.state_dict()
    return sd


def write_sharded(tmp: str, sd: dict[str, Any]) -> None:
    """Every rank (collective): write this rank's shards of `sd` into tmp/dcp/, fsynced, in parallel."""
    import torch.distributed.checkpoint as dcp

    os.makedirs(os.path.join(tmp, DCP_DIR), exist_ok=True)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(os.path.join(tmp, DCP_DIR), sync_files=True))


def load_sharded(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: Any = None) -> bool:
    """Every rank: read what it needs of a DCP folder into the (sharded or plain) model, optimizer and EMA;
    DCP reshards for the current world size (or reads the full tensors without a process group). Returns whether
    the EMA was restored (False: none given, or the state was saved without one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = sharded_state_dict(model, optimizer, ema)
    meta = dcp.FileSystemReader(folder).read_metadata()
    if ema is not None and not any(k.startswith("ema.") for k in meta.state_dict_metadata):
        ema = None  # a state saved without EMA: the caller starts it from the resumed weights
    if ema is None:
        sd.pop("ema", None)
    # Optimizer state of parameters that had none when saved (no gradient yet, e.g. adapters of a text encoder
    # whose outputs were cached): torch creates it for every parameter here, the folder lacks it; left out, so
    # those parameters start without state again, as in the run that saved it.
    saved = {k[len("optimizer.state."):].rsplit(".", 1)[0] for k in meta.state_dict_metadata
             if k.startswith("optimizer.state.")}
    sd["optimizer"]["state"] = {k: v for k, v in sd["optimizer"]["state"].items() if k in saved}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(folder))  # any other key the folder lacks is an error here
    # not strict: the frozen parameters are left out of `sd` on purpose (and stay as loaded)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                   options=_options(strict=False))
    if ema is not None:
        ema.load_state_dict(sd["ema"])
    return ema is not None


def load_full_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any],
                        fsdp: bool) -> None:
    """Resume the optimizer from a full (unsharded) state; FSDP2: resharded onto this rank's parameters."""
    if not fsdp:
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=sd, options=StateDictOptions(full_state_dict=True))
