"""Shared by the end-to-end tests: run the real entry points (plain or under torchrun, gloo on CPU)."""
import contextlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def demo_data_and_tiny_base(root, n, size):
    """n demo images (data.demo.make_demo_dataset, seed 0) in root/data and the tiny SDXL preset (seed 0) saved as
    root/base.safetensors in fp32: what the LoRA / low-VRAM end-to-end tests train from. Returns root."""
    import models
    from data.demo import make_demo_dataset
    make_demo_dataset(str(root / "data"), n=n, size=size)
    models.save(models.build("sdxl", "tiny", seed=0), str(root / "base.safetensors"), "fp32")
    return root


def run_ok(cmd, env=None, timeout=600, expect=0):
    """Run `cmd` in the repository root; fail the test with the output tails unless it exits with `expect`."""
    out = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, env=env or ENV,
                         timeout=timeout)
    assert out.returncode == expect, (f"{' '.join(map(str, cmd))} exited {out.returncode}, expected {expect}:\n"
                                      f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def unmount(d):
    """Close the run log (an in-process train.main leaves its file handler open there), then unmount `d`."""
    import logging
    log = logging.getLogger("sdtrain")
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)
    if subprocess.run(["umount", str(d)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def mount_tmpfs(d, opts):
    """A tmpfs mounted at `d` (created) with mount options `opts` ("size=6m", "ro,size=1m"; we are root, so chmod
    alone would not stop a write); skips the test where mounting is not allowed. Unmount with unmount(d)."""
    import pytest
    os.makedirs(d, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs ({opts}) here: {r.stderr.strip()}")
    return d


@contextlib.contextmanager
def read_only_view(src, dst):
    """`src` bind-mounted read-only at `dst` (created) for the block; skips the test where mounting is not allowed."""
    import pytest
    os.makedirs(dst, exist_ok=True)
    if subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], check=True, capture_output=True)
        yield dst
    finally:
        unmount(dst)


def write_webdataset_shard(path, samples):
    """A tar shard as webdataset's TarWriter writes one: per sample `{key: {ext: bytes}}` its members
    `<key>.<ext>` in sorted extension order, streamed (`w|`), mode 0o444, owner bigdata."""
    import io
    import tarfile
    import time

    with tarfile.open(str(path), "w|") as tf:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext] if isinstance(members[ext], bytes) else members[ext].encode("utf-8")
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), time.time(), 0o444, "bigdata", "bigdata"
                tf.addfile(ti, io.BytesIO(data))


def main_ok(entry, argv, log_dir=None, expect=0, name="train"):
    """Run `entry.main(argv)` (train / cache) in this process: no interpreter start, no torch import, which a
    subprocess pays for in seconds. Asserts it returns `expect`; returns what the run appended to
    log_dir/<name>.log (the run folder's logs), or "" without a log_dir."""
    import importlib
    log_file = os.path.join(str(log_dir), f"{name}.log") if log_dir is not None else None
    start = os.path.getsize(log_file) if log_file and os.path.exists(log_file) else 0
    try:
        code = importlib.import_module(entry).main([str(a) for a in argv])
    finally:
        from core import dist
        dist.shutdown()
    assert code == expect, f"{entry}.main exited {code}, expected {expect}"
    if log_file is None:
        return ""
    with open(log_file) as f:
        f.seek(start)
        return f.read()


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_workers(cmd, world=2, env=None, timeout=600, expect=0):
    """`world` worker processes of `cmd` (a script and its arguments) started as torchrun / srun start them: RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR / MASTER_PORT (rank 0 hosts the store), gloo on CPU. The same process group
    as under torchrun, without torchrun's agent process: one torch import (seconds) less per launch. Use TORCHRUN
    where the launcher itself is tested. Fails the test unless every worker exits with `expect`; returns the
    workers' output, rank by rank, in .stderr / .stdout."""
    import socket
    import tempfile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    try:
        for rank in range(world):
            logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
            wenv = {**(env or ENV), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env=wenv, stdout=logs[-1][0],
                                          stderr=logs[-1][1], text=True))
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = []
    for o, e in logs:
        o.seek(0), e.seek(0)
        outs.append((o.read(), e.read()))
        o.close(), e.close()
    res = _Result(codes, "".join(o for o, _ in outs), "".join(e for _, e in outs))
    assert codes == [expect] * world, (f"{' '.join(map(str, cmd))}: workers exited {codes}, expected {expect}:\n"
                                       f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res
