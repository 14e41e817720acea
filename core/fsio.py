"""Durable file-system helpers shared by every writer (checkpoints, states, shards, images, indexes).

Every file the project writes ends with the mode `open()` would give it under the process umask
(0644 under umask 022), also when the writer itself creates it 0600 (tempfile.mkstemp, safetensors'
save_file), so a ComfyUI or web server running as another user can read the outputs.
"""
from __future__ import annotations

import os
import threading

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
