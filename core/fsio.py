"""Durable file-system helpers shared by every writer (checkpoints, states, shards, images, indexes).

Every file the project writes ends with the mode `open()` would give it under the process umask
(0644 under umask 022), also when the writer itself creates it 0600 (tempfile.mkstemp, safetensors'
save_file), so a ComfyUI or web server running as another user can read the outputs.

Every temporary file or folder this project writes is named `<final name>.tmp-sdtrain-<host>-<pid>[.ext]`
(`temp_path`), so a later start can tell ours from anything else and remove the ones whose writer is gone
(`clean_stale_temps`): on this host only when that process is dead, from another host only when untouched for
STALE_AFTER_S. Write errors carry the final path (`OSError.filename`), which `describe_os_error` turns into one
line such as "no space left on device: <path>".
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterator, Mapping

HOST = socket.gethostname() or "localhost"
TMP_TAG = ".tmp-sdtrain"
_TMP_RE = re.compile(re.escape(TMP_TAG) + r"-(?P<host>.+)-(?P<pid>\d+)(?:\.[A-Za-z0-9]+)?$")
STALE_AFTER_S = 24 * 3600  # a temporary of another host untouched this long: its writer is gone
# Errors that are the environment's, not a bug: said in one line (no traceback) by the entry points.
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


_mode_lock = threading.Lock()
_mode: int | None = None


def file_mode() -> int:
    """0o666 without the process umask bits: the mode of a file created by open() (read once, cached)."""
    global _mode
    if _mode is None:
        with _mode_lock:  # the umask can only be read by setting it: do so once, under a lock
            if _mode is None:
                mask = os.umask(0o022)
                os.umask(mask)
                _mode = 0o666 & ~mask
    return _mode


def set_file_mode(path: str) -> None:
    """Give a written file the normal mode (see file_mode)."""
    os.chmod(path, file_mode())


def fsync_file(path: str) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Make a rename inside `directory` durable; some filesystems cannot open directories, which is fine."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_file(tmp: str, path: str) -> None:
    """Finish an atomic write: normal mode, fsync, rename tmp -> path, fsync the directory."""
    set_file_mode(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------------------------------------------------------------
# Temporaries: recognisable names, cleaned when their writer is gone


def temp_path(path: str, suffix: str = "") -> str:
    """The temporary name of `path` for this process: `<path>.tmp-sdtrain-<host>-<pid><suffix>`."""
    return f"{path}{TMP_TAG}-{HOST}-{os.getpid()}{suffix}"


def is_temp(name: str) -> bool:
    """Whether a file name is one of this project's temporaries."""
    return _TMP_RE.search(name) is not None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _last_touched(path: str) -> float:
    """Newest mtime of a file, or of a folder and its direct entries (a state being written)."""
    t = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        with os.scandir(path) as it:
            for e in it:
                t = max(t, e.stat(follow_symlinks=False).st_mtime)
    return t


def stale_temps(directory: str, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """This project's temporaries in `directory` whose writer is gone (never one of a live process on this host)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out, now = [], time.time()
    for name in names:
        m = _TMP_RE.search(name)
        if m is None:
            continue
        p = os.path.join(directory, name)
        if m["host"] == HOST:
            pid = int(m["pid"])
            if pid == os.getpid() or pid_alive(pid):
                continue
        else:
            try:
                if now - _last_touched(p) < max_age_s:
                    continue
            except OSError:
                continue
        out.append(p)
    return sorted(out)


def clean_stale_temps(directories: list[str], log: Callable[[str], None] | None = None,
                      max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the stale temporaries (`stale_temps`) of each directory; returns what was removed."""
    removed = []
    for d in directories:
        for p in stale_temps(d, max_age_s):
            try:
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.remove(p)
            except OSError:
                continue
            removed.append(p)
    if removed and log is not None:
        log(f"removed {len(removed)} temporary file(s) left by an earlier, ended run: {', '.join(removed[:5])}"
            + (" ..." if len(removed) > 5 else ""))
    return removed


def check_dir_setting(key: str, path: str) -> None:
    """A directory setting (`cache.cache_dir`) that names a file, or a path under one: ValueError naming the key,
    before anything is created (os.makedirs would say only "[Errno 17] File exists")."""
    if not path:
        return
    p = os.path.abspath(path)
    while not os.path.exists(p):
        if os.path.dirname(p) == p:
            return
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        where = "is a file" if p == os.path.abspath(path) else f"lies under {p}, which is a file"
        raise ValueError(f"{key} = {path!r} {where}; it must be a directory")


def remove_quietly(path: str) -> None:
    """Remove a file or folder if it exists (cleanup after a failed write)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


def final_path(path: str) -> str:
    """The path a temporary stands for: every `<name>.tmp-sdtrain-<host>-<pid>[.ext]` component back to `<name>`
    (a file inside a state folder being written names that file in the final folder)."""
    parts = str(path).split(os.sep)
    return os.sep.join(_TMP_RE.sub("", p) if _TMP_RE.search(p) else p for p in parts)


def with_path(e: OSError, path: str) -> OSError:
    """`e` naming `path` when it names no file yet (write() errors do not) or names `path`'s temporary."""
    if e.filename is None or (isinstance(e.filename, str) and final_path(e.filename) != e.filename):
        e.filename = path
    return e


def describe_os_error(e: OSError) -> str | None:
    """One line for an environment error ("no space left on device: <path>", the final path of a temporary);
    None for other errors."""
    what = DISK_ERRNOS.get(e.errno) if isinstance(e, OSError) else None
    if what is None:
        return None
    return f"{what}: {final_path(e.filename)}" if e.filename else what


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writers


class _Recording:
    """File wrapper that remembers the OSError of a write: torch.save reports a failed write only as
    'enforce fail ... unexpected pos', never the reason."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str, write: Callable[[Any], None], suffix: str = "") -> None:
    """Write `path` through a temporary (`temp_path`): write(f) into it, fsync, rename, fsync the folder.
    On any failure the temporary is removed and `path` is untouched; OSErrors name `path`."""
    tmp = temp_path(path, suffix)
    try:
        with open(tmp, "wb") as f:
            rec = _Recording(f)
            try:
                write(rec)
            except RuntimeError:
                if rec.error is not None:  # torch.save hides the OSError behind a RuntimeError
                    raise rec.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        set_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        if isinstance(e, OSError):
            raise with_path(e, path)
        raise
    fsync_dir(os.path.dirname(path))


def torch_save(obj: Any, path: str) -> None:
    """torch.save written atomically; a full disk is an OSError naming `path`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
def _st_dtypes() -> dict:
    import torch

    d = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL"}
    for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, name):
            d[getattr(torch, name)] = code
    return d


def _st_layout(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None) -> tuple[bytes, list[tuple[str, Any]]]:
    """Header bytes (length prefix + JSON padded to 8) and the tensors in file order. As the safetensors
    library does, larger element sizes come first, so every tensor's offset stays aligned to its dtype."""
    dtypes = _st_dtypes()
    order = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {}
    pos = 0
    for name, t in order:
        if t.dtype not in dtypes:
            raise TypeError(f"cannot store {name!r}: dtype {t.dtype} has no safetensors code")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb, order


def _st_chunks(order: list[tuple[str, Any]]) -> Iterator[Any]:
    import torch

    for _, t in order:
        if t.numel():
            yield t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def save_safetensors(tensors: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file written by streaming each tensor (no second in-memory copy, and no temporary of the
    safetensors library: ours is named by `temp_path` and removed on failure), fsynced and renamed."""
    head, order = _st_layout(tensors, metadata)

    def write(f: Any) -> None:
        f.write(head)
        for chunk in _st_chunks(order):
            f.write(chunk)

    atomic_write(path, write)
