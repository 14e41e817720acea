"""Resumable training state: written whole and atomically, found again after any crash.

A state is a folder `state/step-00001234/` holding
  - `trained.safetensors`  the trained modules' weights (part-prefixed keys), exact dtype
  - `optimizer.pt`         optimizer state (tensors + plain numbers; loaded with weights_only=True)
  - `ema.safetensors`      EMA shadow weights (when enabled)
  - `rng-rank{r}.pt`       every rank's RNG states (weights_only)
  - `progress.json`        step, epoch, data cursor, scheduler / scaler / loss recorder, world size, config
  - `COMPLETE`             written last: sizes + sha256 of every file above
Everything is first written into `step-00001234.tmp-<pid>/`, fsynced, then renamed. No pickle of
arbitrary objects is ever loaded. `resume = "auto"` takes the newest state whose COMPLETE marker
matches its files; a damaged or incomplete one is reported and the previous one used.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from core.fsio import fsync_dir as _fsync_dir, fsync_file as _fsync_file, set_file_mode

STATE_RE = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"


class StateError(RuntimeError):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tmp_dir_for(state_root: str, step: int, token: str) -> str:
    return os.path.join(state_root, f"step-{step:08d}.tmp-{token}")


def write_rank_rng(tmp: str, rank: int) -> None:
    """Each rank writes its own RNG states into the shared temporary folder."""
    os.makedirs(tmp, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    path = os.path.join(tmp, f"rng-rank{rank}.pt")
    torch.save(rng, path)
    set_file_mode(path)
    _fsync_file(path)


def write_state(tmp: str, final: str, *, trained: dict[str, torch.Tensor], optimizer: dict[str, Any],
                progress: dict[str, Any], ema: dict[str, torch.Tensor] | None = None,
                before_marker: Callable[[], None] | None = None) -> str:
    """Rank 0: write the shared files, the COMPLETE marker last, then rename tmp -> final."""
    os.makedirs(tmp, exist_ok=True)
    files = {}
    p = os.path.join(tmp, "trained.safetensors")
    save_file({k: v.detach().contiguous().cpu() for k, v in trained.items()}, p)
    files["trained.safetensors"] = p
    p = os.path.join(tmp, "optimizer.pt")
    torch.save(optimizer, p)
    files["optimizer.pt"] = p
    if ema is not None:
        p = os.path.join(tmp, "ema.safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, p)
        files["ema.safetensors"] = p
    p = os.path.join(tmp, "progress.json")
    with open(p, "w") as f:
        json.dump(progress, f, indent=1, sort_keys=True)
    files["progress.json"] = p
    for name in sorted(os.listdir(tmp)):
        if name.startswith("rng-rank"):
            files[name] = os.path.join(tmp, name)
    for path in files.values():
        set_file_mode(path)  # safetensors writes 0600
        _fsync_file(path)
    if before_marker is not None:  # test hook: simulate a crash during the write
        before_marker()
    manifest = {name: {"size": os.path.getsize(path), "sha256": _sha256(path)} for name, path in files.items()}
    mp = os.path.join(tmp, MARKER)
    with open(mp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    set_file_mode(mp)
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))
    return final


def verify_state(path: str) -> str | None:
    """None when the state is complete and intact; else the reason."""
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
        if os.path.getsize(p) != info["size"] or _sha256(p) != info["sha256"]:
            return f"{name} does not match its checksum"
    return None


def list_states(state_root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(state_root):
        return []
    out = []
    for name in os.listdir(state_root):
        m = STATE_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(state_root, name)))
    return sorted(out)


def find_resume(spec: str, state_root: str, log: Callable[[str], None] = print) -> str | None:
    """'auto' -> newest intact state (damaged ones reported and skipped); a path -> that state, verified."""
    if not spec:
        return None
    if spec != "auto":
        reason = verify_state(spec)
        if reason:
            raise StateError(f"cannot resume from {spec}: {reason}")
        return spec
    for _, path in reversed(list_states(state_root)):
        reason = verify_state(path)
        if reason is None:
            return path
        log(f"resume: skipping {path}: {reason}")
    return None


def read_state(path: str, rank: int) -> dict[str, Any]:
    with open(os.path.join(path, "progress.json")) as f:
        progress = json.load(f)
    out: dict[str, Any] = {
        "progress": progress,
        "trained": load_file(os.path.join(path, "trained.safetensors")),
        "optimizer": torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu"),
    }
    if os.path.isfile(os.path.join(path, "ema.safetensors")):
        out["ema"] = load_file(os.path.join(path, "ema.safetensors"))
    rng_path = os.path.join(path, f"rng-rank{rank}.pt")
    out["rng"] = torch.load(rng_path, weights_only=True) if os.path.isfile(rng_path) else None
    return out


def restore_rng(rng: dict[str, torch.Tensor] | None) -> None:
    if not rng:
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def prune_states(state_root: str, keep: int) -> None:
    """Keep the newest `keep` complete states; remove older ones and stale temporary folders."""
    states = list_states(state_root)
    for _, path in states[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(state_root) if os.path.isdir(state_root) else []:
        if ".tmp-" in name and name.startswith("step-"):
            shutil.rmtree(os.path.join(state_root, name), ignore_errors=True)
