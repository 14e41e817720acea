"""One process at a time per directory: the lock a run holds on its output_dir (train.py) or its store (cache.py).

    lock = DirLock(out_dir, "train.py")
    note = lock.acquire()          # LockBusy (one line naming the holder) when another live process holds it
    ...
    lock.release()

The lock is the file `<dir>/sdtrain.lock`, never deleted (deleting a locked file lets two processes lock two
different files of the same name). It holds JSON naming the holder (command, host, pid, start time), which a refused
process quotes.

Two mechanisms, chosen by what the filesystem supports:
- `flock` on the file (local disks; NFS v3 with lockd and v4, where Linux turns it into a lock the server
  arbitrates; CephFS; GPFS; Lustre mounted with `-o flock`; BeeGFS with global file locks). The kernel (or the NFS
  server) drops the lock when its process ends however it ends, so a dead holder never blocks anyone: the next run
  simply gets it (and says whose lock it took over). A crashed *node*'s lock is released by the NFS server when the
  node's lease runs out (NFS v4: 90 s by default).
- Where `flock` fails as unsupported (ENOLCK / ENOSYS / EOPNOTSUPP: Lustre without `-o flock`, NFS without lockd),
  the exclusive creation of `<dir>/sdtrain.lock.excl` (O_EXCL, atomic on local disks and NFS v3+), holding the
  holder's JSON, its mtime refreshed every HEARTBEAT_S by a thread. A lock is stale when its holder is on this host
  and its process is gone (pid absent, or reused: another start time or boot), or when it is on another host and its
  heartbeat is older than STALE_AFTER_S (so clocks must agree to within minutes, as NTP gives). A stale lock is
  broken by whoever first creates `sdtrain.lock.excl.break-<its token>` (O_EXCL: one winner), who re-reads the lock
  under that guard and removes it only if it is still the stale one; then every contender races to create it anew
  (one winner). So two processes never hold the lock at once, and a dead holder is replaced without a person.

Not guaranteed: mutual exclusion where the filesystem's locks are node-local while the files are shared (Lustre
`-o localflock`, NFS mounted `-o nolock`): there each node sees only its own processes' locks.

Readers (train.py reading a store) hold a shared flock on `<dir>/sdtrain.readers.lock` (ReaderLock); a writer about
to remove files it may still read (cache.py removing superseded shards) asks `readers_present` first.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from core.fsio import pid_alive

LOCK_NAME = "sdtrain.lock"
READERS_NAME = "sdtrain.readers.lock"  # shared by the runs reading a directory (train.py on a latent store)
EXCL_NAME = LOCK_NAME + ".excl"
HEARTBEAT_S = 30.0        # the O_EXCL fallback's holder refreshes its file's mtime this often
STALE_AFTER_S = 600.0     # ... and a lock of another host is stale when not refreshed for this long
WAIT_POLL_S = 2.0         # a waiting process retries this often
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class LockBusy(RuntimeError):
    """The directory is locked by another live process; str() is one line naming it."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (/proc/<pid>/stat field 22): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its closing one
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def holder_info(what: str) -> dict[str, Any]:
    """What a lock file says about this process."""
    return {"what": what, "host": socket.gethostname() or "localhost", "pid": os.getpid(),
            "start": _start_ticks(os.getpid()), "boot": _boot_id(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": uuid.uuid4().hex}


def same_host_dead(info: dict[str, Any]) -> bool:
    """Whether a holder on this host is certainly gone: another boot, no such pid, or the pid reused."""
    if info.get("host") != (socket.gethostname() or "localhost"):
        return False
    if info.get("boot") and _boot_id() and info["boot"] != _boot_id():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return True
    start = info.get("start")
    return start is not None and _start_ticks(pid) not in (None, start)


def describe(info: dict[str, Any] | None) -> str:
    """'train.py (pid 123 on host a, since 2025-01-01 12:00:00)' from a lock file's JSON."""
    if not info:
        return "another process (its lock file is being written)"
    return (f"{info.get('what', 'another process')} (pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"since {info.get('since', '?')})")


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
        out = json.loads(data) if data.strip() else None
        return out if isinstance(out, dict) else None
    except (OSError, ValueError):
        return None


class DirLock:
    """An exclusive lock on a directory for the life of a run (see the module docstring for what it guarantees)."""

    def __init__(self, directory: str, what: str):
        self.dir, self.what = directory, what
        self.path = os.path.join(directory, LOCK_NAME)
        self.info: dict[str, Any] = {}
        self._fd: int | None = None
        self._excl = False
        self.read_only = False  # the directory cannot be written by this process: not locked (see _try)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False, on_wait: Callable[[str], None] | None = None,
                poll_s: float = WAIT_POLL_S, timeout_s: float | None = None) -> str:
        """Take the lock. Busy: raise LockBusy, or with `wait` tell `on_wait` once who holds it and retry every
        `poll_s` (LockBusy after `timeout_s`). Returns a note when a dead holder's lock was taken over, else ''."""
        if self.held:
            raise RuntimeError(f"{self.path}: already held by this DirLock")
        os.makedirs(self.dir, exist_ok=True)
        told, deadline = False, None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            got = self._try()
            if isinstance(got, str):
                return got
            msg = f"{self.dir} is in use by {describe(got)}"
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise LockBusy(msg + ("" if not wait else f"; gave up after {timeout_s:.0f} s"))
            if not told and on_wait is not None:
                on_wait(f"{msg}; waiting for it to finish")
                told = True
            time.sleep(poll_s)

    def _try(self) -> str | dict[str, Any] | None:
        """One attempt: the takeover note ('' or a line) when taken, else the holder's JSON (None: unreadable)."""
        if not self._excl:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                # A directory this process cannot write: it writes nothing there either (a run that must fails
                # with one line naming the file), so it needs no lock.
                self.read_only = True
                return ""
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return _read_json(self.path)
            except OSError as e:
                os.close(fd)
                if e.errno not in _UNSUPPORTED:
                    raise
                self._excl = True  # this filesystem has no working flock: exclusive creation from now on
            else:
                prev = _read_fd_json(fd)
                self.info = holder_info(self.what) | {"mech": "flock"}
                _rewrite(fd, self.info)
                self._fd = fd
                _HELD.append(self)
                return self._took_over(prev)
        return self._try_excl()

    # -- the O_EXCL fallback ---------------------------------------------------------------------------------
    def _try_excl(self) -> str | dict[str, Any] | None:
        path = os.path.join(self.dir, EXCL_NAME)
        note, cur = "", None
        for _ in range(3):  # after breaking a stale lock, race for it at once
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                cur = _read_json(path)
                if cur is None:  # being written right now, or left empty by a writer killed right after creating it
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    if time.time() - st.st_mtime < STALE_AFTER_S:
                        return None
                    cur = {"token": _empty_token(st)}
                if not self._stale(path, cur):
                    return cur
                if self._break(path, cur):
                    note = self._took_over(cur)
                continue
            self.info, self._fd = holder_info(self.what) | {"mech": "excl"}, fd
            _HELD.append(self)
            _rewrite(fd, self.info)
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="dir-lock-heartbeat", daemon=True)
            self._beat.start()
            for name in os.listdir(self.dir):  # guards of breaks that are over
                if name.startswith(EXCL_NAME + ".break-"):
                    _unlink(os.path.join(self.dir, name))
            return note
        return cur

    @staticmethod
    def _stale(path: str, cur: dict[str, Any]) -> bool:
        """Whether the holder of an O_EXCL lock is gone (see the module docstring)."""
        if str(cur.get("token")).startswith("empty-") or same_host_dead(cur):
            return True
        if cur.get("host") == (socket.gethostname() or "localhost"):
            return False  # its process is alive
        try:
            return time.time() - os.stat(path).st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True

    @staticmethod
    def _break(path: str, stale: dict[str, Any]) -> bool:
        """Remove a stale lock file only if it still is the one judged stale; one breaker per stale lock (the one
        that creates its guard), so a lock taken meanwhile by someone else is never removed."""
        guard = f"{path}.break-{stale.get('token', 'none')}"
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            return False  # another process breaks it
        try:
            now = _read_json(path) or {"token": _empty_token(os.stat(path))}
        except FileNotFoundError:
            return False
        if now.get("token") != stale.get("token"):
            return False
        _unlink(path)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            fd = self._fd
            if fd is None:
                return
            try:
                os.utime(fd)  # the file's own inode, even if someone broke the lock meanwhile
            except OSError:
                pass

    # -- both ------------------------------------------------------------------------------------------------
    @staticmethod
    def _took_over(prev: dict[str, Any] | None) -> str:
        if not prev or prev.get("released") or str(prev.get("token")).startswith("empty-"):
            return ""
        return f"took over the lock of {describe(prev)}, which ended without releasing it"

    def release(self) -> None:
        """Give the lock back (the file stays; it says released)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self in _HELD:
            _HELD.remove(self)
        self._stop.set()
        try:
            if self._excl:
                _unlink(os.path.join(self.dir, EXCL_NAME))
            else:
                _rewrite(fd, self.info | {"released": time.strftime("%Y-%m-%d %H:%M:%S")})
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass  # closing the descriptor below releases a flock anyway
        finally:
            os.close(fd)

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


_HELD: list[Any] = []  # DirLocks and ReaderLocks this process holds, in the order taken


def releases_locks(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an entry point's main(): every DirLock / ReaderLock it took is released when it returns or raises
    (also when called in process, as the tests do, so a later call on the same folder is not refused)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        start = len(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in reversed(_HELD[start:]):
                lock.release()
    return run


def acquire_in_step(lock: DirLock | None, broadcast: Callable[[Any], Any], *, wait: bool,
                    on_wait: Callable[[str], None] | None = None, poll_s: float = WAIT_POLL_S) -> str:
    """Rank 0 takes `lock` (the other ranks pass None) and every rank follows: one broadcast per try, so no rank
    waits in a collective longer than `poll_s` while rank 0 waits for the lock. Returns rank 0's takeover note
    ('' elsewhere); raises LockBusy on every rank when busy and not `wait` (an OSError on rank 0 is re-raised
    there and is LockBusy with its line on the others)."""
    from core.fsio import describe_os_error

    told = False
    while True:
        res, err = None, None
        if lock is not None:
            try:
                res = ("ok", lock.acquire())
            except LockBusy as e:
                res = ("busy", str(e))
            except OSError as e:
                err, res = e, ("error", describe_os_error(e) or str(e))
        res = broadcast(res)
        if res[0] == "ok":
            return res[1] if lock is not None else ""
        if err is not None:
            raise err
        if res[0] == "error" or not wait:
            raise LockBusy(res[1])
        if not told and on_wait is not None:
            on_wait(f"{res[1]}; waiting for it to finish")
            told = True
        time.sleep(poll_s)


def _read_fd_json(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 1 << 16, 0)
        out = json.loads(data) if data.strip() else None
        return out if isinstance(out, dict) else None
    except (OSError, ValueError):
        return None


def _rewrite(fd: int, info: dict[str, Any]) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _empty_token(st: os.stat_result) -> str:
    """The identity of an empty lock file (no token inside): inode and mtime, which a new file would not repeat."""
    return f"empty-{st.st_ino}-{st.st_mtime_ns}"


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------------------------------
# Readers: processes that read a directory (train.py reading a store) hold a shared flock; a writer about to remove
# files (cache.py removing superseded shards) asks whether any reader is there and keeps the files if so.


class ReaderLock:
    """A shared flock on <directory>/sdtrain.readers.lock while open: tells writers (cache.py) that a run reads the
    directory. `held` is False where it cannot be taken (a read-only directory without the file, no flock): then
    nobody is told."""

    def __init__(self, directory: str):
        self._fd: int | None = None
        path = os.path.join(directory, READERS_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY)  # a read-only store: a shared lock needs only read access
            except OSError:
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # shared locks never wait for each other; a writer's probe is brief
        except OSError:
            os.close(fd)
            return
        self._fd = fd
        _HELD.append(self)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            if self in _HELD:
                _HELD.remove(self)
            os.close(fd)


def readers_present(directory: str) -> bool:
    """Whether some process holds the readers lock of `directory` (False where flock does not work: unknown)."""
    path = os.path.join(directory, READERS_NAME)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the probe's lock
    return False
