"""core/lock.py: one process per directory, a dead holder taken over, the O_EXCL fallback where flock is missing."""
import errno
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from core import lock as lk
from core.lock import DirLock, LockBusy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A holder in its own process: takes the lock (optionally with flock "unsupported"), says so, then waits.
_HOLDER = """
import errno, fcntl, sys, time
sys.path.insert(0, {root!r})
if {no_flock}:
    def _no(fd, op): raise OSError(errno.ENOLCK, "no locks")
    fcntl.flock = _no
from core.lock import DirLock
l = DirLock({d!r}, "holder.py")
print("note:" + l.acquire(), flush=True)
time.sleep({hold})
l.release()
print("released", flush=True)
"""


def _holder(d, no_flock=False, hold=60.0):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=ROOT, d=str(d), no_flock=no_flock, hold=hold)],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("note:"), line
    return p


@pytest.fixture
def no_flock(monkeypatch):
    """This process's flock fails as on Lustre without -o flock: DirLock falls back to O_EXCL."""
    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(lk.fcntl, "flock", unsupported)


@pytest.mark.parametrize("fallback", [False, True])
def test_second_process_refused_then_dead_holder_taken_over(tmp_path, monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(lk.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    p = _holder(tmp_path, no_flock=fallback)
    try:
        with pytest.raises(LockBusy) as e:
            DirLock(str(tmp_path), "train.py").acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"pid {p.pid}" in msg and "holder.py" in msg and str(tmp_path) in msg
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    lock = DirLock(str(tmp_path), "train.py")
    note = lock.acquire()  # the holder is dead: taken over at once, and said
    assert f"pid {p.pid}" in note and "ended without releasing" in note
    assert lock.info["mech"] == ("excl" if fallback else "flock")
    lock.release()
    assert DirLock(str(tmp_path), "x").acquire() == ""  # a released lock is no takeover


def test_in_process_second_lock_refused_and_wait(tmp_path):
    a = DirLock(str(tmp_path), "a.py")
    a.acquire()
    with pytest.raises(LockBusy, match="a.py"):
        DirLock(str(tmp_path), "b.py").acquire()
    told = []
    with pytest.raises(LockBusy, match="gave up"):
        DirLock(str(tmp_path), "b.py").acquire(wait=True, on_wait=told.append, poll_s=0.05, timeout_s=0.2)
    assert len(told) == 1 and "waiting" in told[0]
    a.release()
    b = DirLock(str(tmp_path), "b.py")
    assert b.acquire() == ""
    b.release()


def test_waiter_gets_it_when_the_holder_ends(tmp_path):
    p = _holder(tmp_path, hold=1.0)
    told = []
    lock = DirLock(str(tmp_path), "cache.py")
    t0 = time.monotonic()
    assert lock.acquire(wait=True, on_wait=told.append, poll_s=0.1) == ""  # released properly: no takeover note
    assert time.monotonic() - t0 > 0.3 and len(told) == 1 and f"pid {p.pid}" in told[0]
    p.wait()
    lock.release()


def _write_excl(d, info, age_s=0.0):
    path = os.path.join(d, lk.EXCL_NAME)
    with open(path, "w") as f:
        json.dump(info, f)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_fallback_staleness(tmp_path, no_flock):
    """Same host: stale exactly when the pid is gone or reused; another host: when its heartbeat is old."""
    me = lk.holder_info("other.py")
    cases = {
        "live pid": (dict(me), 0, False),
        "dead pid": (me | {"pid": _dead_pid()}, 0, True),
        "reused pid": (me | {"start": (me["start"] or 0) + 12345}, 0, True),
        "other boot": (me | {"boot": "not-this-boot"}, 0, True),
        "other host, fresh": (me | {"host": "node-that-is-not-here"}, 60, False),
        "other host, old": (me | {"host": "node-that-is-not-here"}, lk.STALE_AFTER_S + 60, True),
    }
    for name, (info, age, stale) in cases.items():
        d = tmp_path / name.replace(" ", "_").replace(",", "")
        d.mkdir()
        _write_excl(str(d), info | {"token": name}, age)
        lock = DirLock(str(d), "train.py")
        if stale:
            assert "ended without releasing" in lock.acquire(), name
            assert lock.info["mech"] == "excl"
            assert json.load(open(d / lk.EXCL_NAME))["token"] == lock.info["token"]
            lock.release()
            assert not (d / lk.EXCL_NAME).exists()
        else:
            with pytest.raises(LockBusy, match="other.py"):
                lock.acquire()


def test_fallback_empty_file(tmp_path, no_flock):
    """A lock file being written (empty, fresh) is busy; one left empty long ago by a killed writer is stale."""
    path = os.path.join(tmp_path, lk.EXCL_NAME)
    open(path, "w").close()
    with pytest.raises(LockBusy, match="being written"):
        DirLock(str(tmp_path), "x").acquire()
    t = time.time() - lk.STALE_AFTER_S - 5
    os.utime(path, (t, t))
    lock = DirLock(str(tmp_path), "x")
    lock.acquire()
    assert lock.held
    lock.release()


def _contend(d, fallback, start, q):
    if fallback:
        lk.fcntl.flock = lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no"))
        judge = lk.DirLock._stale

        def slow_judge(path, cur):  # widen the window between judging a lock stale and breaking it
            out = judge(path, cur)
            time.sleep(0.05 * (os.getpid() % 4))
            return out
        lk.DirLock._stale = staticmethod(slow_judge)
    lock = DirLock(d, f"contender {os.getpid()}")
    start.wait()
    try:
        lock.acquire()
    except LockBusy:
        q.put(0)
        return
    q.put(1)
    time.sleep(0.3)  # hold a while: the losers must see a live holder, not break it
    lock.release()


@pytest.mark.parametrize("fallback", [False, True])
def test_racing_takeover_has_one_winner(tmp_path, fallback):
    """6 processes at once on a lock left by a killed process: exactly one gets it, every round."""
    ctx = mp.get_context("fork")
    for rnd in range(3):
        d = str(tmp_path / f"r{rnd}")
        os.makedirs(d)
        if fallback:
            _write_excl(d, lk.holder_info("killed.py") | {"pid": _dead_pid()})
        n = 6
        start, q = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(d, fallback, start, q)) for _ in range(n)]
        for p in procs:
            p.start()
        wins = sum(q.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(60)
        assert wins == 1, f"round {rnd}: {wins} winners"


def test_heartbeat_refreshes_the_fallback_lock(tmp_path, no_flock, monkeypatch):
    monkeypatch.setattr(lk, "HEARTBEAT_S", 0.05)
    lock = DirLock(str(tmp_path), "x")
    lock.acquire()
    path = os.path.join(tmp_path, lk.EXCL_NAME)
    t = time.time() - 1000
    os.utime(path, (t, t))
    deadline = time.time() + 5
    while os.stat(path).st_mtime < time.time() - 100 and time.time() < deadline:
        time.sleep(0.02)
    assert os.stat(path).st_mtime > time.time() - 100
    lock.release()
