"""The latent store and the run locks through the real entry points (#28.3, #28.9, #28.12): bit rot found while
training is skipped and repaired by the next cache.py run (or listed when the image is gone); a second train.py on
an output_dir in use stops in one line, a second cache.py on a store waits and encodes nothing twice; a killed run's
lock is taken over; cache.py honours model.text_encoder_dtype."""
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ENV, ROOT, main_ok, run_workers

DEMO = "configs/demo.toml"
FAST = ["optimizer.lr_warmup_steps=0", "sample.sample_every_n_steps=0", "save.save_every_n_steps=0", "data.batch_size=2"]


def _images(d, n, start=0):
    from PIL import Image
    os.makedirs(d, exist_ok=True)
    for i in range(start, start + n):
        Image.new("RGB", (64, 64), (40 * i % 256, 90, 200 - 30 * i % 200)).save(os.path.join(d, f"img{i}.png"))
        with open(os.path.join(d, f"img{i}.txt"), "w") as f:
            f.write(f"a shape number {i}")


def _rot_latent(store, key):
    """Flip a byte of `key`'s latent in its shard, keeping size and mtime (the store index still trusts it)."""
    from data.store import LatentStore, SHARD_DIR
    st = LatentStore(str(store))
    si, j = st._loc(key)
    sh = st._ensure_header(si)
    a, _ = sh.header[f"{key}/latent"]["data_offsets"]
    path = os.path.join(str(store), SHARD_DIR, sh.name)
    s0 = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(sh.start + a + 1)
        b = f.read(1)
        f.seek(sh.start + a + 1)
        f.write(bytes([b[0] ^ 0x10]))
    os.utime(path, ns=(s0.st_atime_ns, s0.st_mtime_ns))
    return sh.name


def _rot_header(store, shard):
    """Change a digit inside a shard's header (still valid JSON), keeping size and mtime."""
    path = os.path.join(str(store), "shards", shard)
    s0 = os.stat(path)
    data = bytearray(open(path, "rb").read())
    at = data.index(b'\\"o\\": [') + len(b'\\"o\\": [')  # a record's original size
    data[at] = ord("9") if data[at] != ord("9") else ord("8")
    open(path, "wb").write(data)
    os.utime(path, ns=(s0.st_atime_ns, s0.st_mtime_ns))


def _train(imgs, store, out, *extra):
    return main_ok("train", [DEMO, f"data.image_dirs=['{imgs}']", f"cache.cache_dir={store}", f"output_dir={out}",
                             "train.max_train_steps=2", *FAST, *extra], out / "logs")


def test_bit_rot_skipped_in_training_repaired_by_cache_py(tmp_path, capsys, caplog):
    """Was: cache.py said "already valid" and training used the damaged latent; a damaged header was a StoreError
    traceback in train.py that cache.py never repaired."""
    from data.store import DAMAGE_DIR, LatentStore
    imgs, store = tmp_path / "imgs", tmp_path / "store"
    _images(imgs, 3)
    cache_argv = [DEMO, f"data.image_dirs=['{imgs}']", f"cache.cache_dir={store}"]
    main_ok("cache", cache_argv)
    _images(imgs, 1, start=3)
    main_ok("cache", cache_argv)  # a second shard with one record
    shards = sorted(os.listdir(store / "shards"))
    assert len(shards) == 2
    before = {k: LatentStore(str(store)).get(k)["latent"].clone() for k in ("img0", "img1")}
    _rot_latent(store, "img1")
    _rot_header(store, shards[1])  # img3's shard
    capsys.readouterr()
    _train(imgs, store, tmp_path / "run", "data.batch_size=4")  # one batch of 4: two readable records in it
    assert "Traceback" not in capsys.readouterr().err
    said = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "skipped img1" in said and "is damaged (tensor 'latent': checksum" in said, said  # said, per record
    assert "skipped img3" in said and "header checksum" in said, said                        # and per shard
    reports = sorted(os.path.basename(p) for p in glob.glob(str(store / DAMAGE_DIR / "*.json")))
    assert len(reports) == 2 and f"{shards[1]}.shard.json" in reports, reports
    # the next cache.py re-encodes both (images present), sets the damaged shard aside, clears the reports
    main_ok("cache", cache_argv)
    out = capsys.readouterr().out
    assert "encoded 2, already valid 2" in out, out
    assert not glob.glob(str(store / DAMAGE_DIR / "*.json"))
    st = LatentStore(str(store))
    assert len(st) == 4 and not st.damaged and st.verify() == []
    assert torch.equal(st.get("img1")["latent"], before["img1"])  # re-encoded: the same latent again
    assert torch.equal(st.get("img0")["latent"], before["img0"])


def test_unreadable_batch_trains_on_a_bucket_mate_and_resumes_exactly(tmp_path, capsys):
    """Was: data.batch_size = 1 on a damaged record ended train.py with a traceback from collate ("every image of a
    batch failed to load"). Now another record of the bucket stands in (said in train.log), chosen from (seed, epoch,
    position): a run resumed after epoch 0 trains the straight run's weights; with no readable record left in the
    bucket, one line (also when a loader worker meets it)."""
    from safetensors.torch import load_file
    from data.store import DAMAGE_DIR
    imgs, store = tmp_path / "imgs", tmp_path / "store"
    _images(imgs, 3)  # one bucket
    main_ok("cache", [DEMO, f"data.image_dirs=['{imgs}']", f"cache.cache_dir={store}"])
    _rot_latent(store, "img1")
    args = ["data.batch_size=1", "train.max_train_steps=6", "save.save_every_n_steps=3"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    log = _train(imgs, store, straight, *args)  # two epochs: img1's batch twice
    assert "Traceback" not in capsys.readouterr().err
    assert "skipped img1 at load time" in log and log.count("could be read (img1): trained on img") == 2, log
    # the straight run wrote the damage down, so a resume would leave img1 out (another batch plan); without the
    # reports (a store it cannot write) the resumed run meets img1 as the straight run did
    shutil.rmtree(store / DAMAGE_DIR)
    state = straight / "state" / "step-00000003"  # the end of epoch 0
    log = _train(imgs, store, resumed, *args, f"train.resume={state}")
    assert "resumed from" in log and "in its place" in log, log
    a, b = (load_file(str(d / "models" / "demo.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("img0", "img2"):
        _rot_latent(store, key)
    import train
    with pytest.raises(SystemExit) as e:
        train.main([DEMO, f"data.image_dirs=['{imgs}']", f"cache.cache_dir={store}", f"output_dir={tmp_path / 'c'}",
                    *FAST, *args, "data.max_dataloader_n_workers=1"])
    msg = str(e.value.code)
    assert re.match(r"data error: no record of bucket \d+x\d+ can be read: the batch's 1 \(img\d\) and its \d+ other",
                    msg) and "\n" not in msg, msg
    assert "Traceback" not in capsys.readouterr().err


def test_damaged_record_with_image_gone_is_listed(tmp_path, capsys):
    from data.store import LatentStore
    imgs, store = tmp_path / "imgs", tmp_path / "store"
    _images(imgs, 3)
    cache_argv = [DEMO, f"data.image_dirs=['{imgs}']", f"cache.cache_dir={store}"]
    main_ok("cache", cache_argv)
    _rot_latent(store, "img2")
    assert main_ok("cache", [*cache_argv, "--verify"], expect=1) == ""  # verify finds it and writes it down
    assert "img2" in capsys.readouterr().out
    os.remove(imgs / "img2.png")
    main_ok("cache", cache_argv)
    skipped = (store / "skipped.txt").read_text()
    assert "img2" in skipped and "damaged" in skipped, skipped
    assert sorted(LatentStore(str(store)).keys()) == ["img0", "img1"]


_HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from core.lock import DirLock
lock = DirLock({d!r}, "train.py")
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_second_train_on_one_output_dir_refused_and_killed_run_taken_over(tmp_path, capsys):
    """Was: both runs exit 0 and their states overwrite each other."""
    imgs, out = tmp_path / "imgs", tmp_path / "run"
    _images(imgs, 2)
    argv = [DEMO, f"data.image_dirs=['{imgs}']", "cache.cache_dir=", f"output_dir={out}", "train.max_train_steps=2",
            *FAST]
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(root=ROOT, d=str(out))], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        import train
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        msg = str(e.value.code)
        assert msg.startswith(f"train.py: {out} is in use by train.py (pid {holder.pid} on host ") and "\n" not in msg
        assert sorted(os.listdir(out)) == ["sdtrain.lock"]  # the refused run wrote nothing
        # the same under two processes: both ranks stop with the line
        r = run_workers([os.path.join(ROOT, "train.py"), *argv], expect=1)
        assert f"pid {holder.pid}" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    log = main_ok("train", argv, out / "logs")  # the holder was killed: its lock is taken over, and said
    assert f"took over the lock of train.py (pid {holder.pid}" in log
    assert json.load(open(out / "sdtrain.lock")).get("released")


def test_second_cache_py_waits_and_encodes_nothing_twice(tmp_path, capsys, caplog, monkeypatch):
    """Was: two cache.py runs on one store both encode everything. The first cache.py (tests/fault_entry.py
    cache_hold_lock_until) holds the store's lock until the second, in this process, has said it waits: the order
    is forced, not raced (a first run done before the second reached the lock passed nothing)."""
    imgs, store, gate = tmp_path / "imgs", tmp_path / "store", tmp_path / "second_waits"
    _images(imgs, 4)
    argv = [DEMO, f"data.image_dirs=['{imgs}']", f"cache.cache_dir={store}"]
    first = subprocess.Popen([sys.executable, "tests/fault_entry.py", f"cache_hold_lock_until={gate}", *argv],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until the first holds the store's lock (it keeps it until the gate opens)
            try:
                if json.load(open(store / "sdtrain.lock")).get("pid") == first.pid:
                    break
            except (OSError, ValueError):
                pass
            if first.poll() is not None:
                pytest.fail(f"the first cache.py exited {first.returncode}:\n{first.communicate()[1][-3000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("the first cache.py never took the lock")
        import cache
        acquire = cache.acquire_in_step

        def acquire_and_open_the_gate(lock, broadcast, *, wait, on_wait, **kw):
            def told(msg):  # the second is now waiting for the first: let the first go on
                on_wait(msg)
                gate.touch()
            return acquire(lock, broadcast, wait=wait, on_wait=told, **{"poll_s": 0.2, **kw})
        monkeypatch.setattr(cache, "acquire_in_step", acquire_and_open_the_gate)
        caplog.set_level(logging.INFO, logger="cache")
        assert cache.main(argv) == 0
        out, err = capsys.readouterr()
        assert gate.exists()  # the second did wait for the first
        assert first.wait(120) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert "encoded 4, already valid 0" in first.communicate()[0]
    assert "encoded 0, already valid 4" in out, out  # it waited for the first one
    said = [r.getMessage() for r in caplog.records if f"is in use by cache.py (pid {first.pid}" in r.getMessage()]
    assert len(said) == 1 and "waiting" in said[0], said  # said once


def test_cache_py_loads_text_encoders_in_text_encoder_dtype(tmp_path, monkeypatch):
    """Was: fp32 on CPU whatever model.text_encoder_dtype said (T5-XXL alone ~19 GB)."""
    import models
    imgs, store = tmp_path / "imgs", tmp_path / "store"
    _images(imgs, 2)
    seen = []
    real = models.load_text_encoders

    def spy(*a, **k):
        runner = real(*a, **k)
        seen.extend({p.dtype for m in runner.comp.text_encoders().values() for p in m.parameters()})
        return runner
    monkeypatch.setattr(models, "load_text_encoders", spy)
    main_ok("cache", [DEMO, f"data.image_dirs=['{imgs}']", f"cache.cache_dir={store}",
                      "cache.cache_text_encoder_outputs=true", "model.text_encoder_dtype=bf16"])
    assert seen == [torch.bfloat16]
