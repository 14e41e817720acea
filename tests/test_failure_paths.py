"""Failure paths (issue 14): states belong to their run, temporaries never outlive their writer, a full or
read-only disk is one line, bad images and captions are reported, not fatal or silent."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core import fsio
from training import resume as rstate
from helpers import mount_tmpfs, read_only_view, unmount


def _state(root, step, run_id, config=None, saved_ns=None):
    """A complete state of `run_id` at `step` (what train.py writes, minus the model)."""
    tmp = rstate.tmp_dir_for(str(root), step)
    rstate.write_rank_rng(tmp, 0)
    progress = {"step": step, "run_id": run_id, "config": config or {"optimizer": {"learning_rate": 1e-5}}}
    path = rstate.write_state(tmp, str(root / f"step-{step:08d}"), trained={"w": torch.full((3,), float(step))},
                              optimizer={"state": {}, "param_groups": []}, progress=progress)
    if saved_ns is not None:  # pretend it was written at another time
        p = os.path.join(path, "progress.json")
        with open(p) as f:
            pr = json.load(f)
        pr["saved_ns"] = saved_ns
        with open(p, "w") as f:
            json.dump(pr, f)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# 1. States belong to their run


def test_prune_keeps_the_state_just_written_and_other_runs_states(tmp_path):
    """The defect: an old run's step-20 outranked the new run's states by step number, so each new state was deleted
    right after it was written. Now pruning ranks this run's states by write time and leaves other runs alone."""
    root = tmp_path / "state"
    old = _state(root, 20, "A")
    for step in (2, 4, 6):
        new = _state(root, step, "B")
        assert rstate.prune_states(str(root), 2, "B", just_written=new) == \
            ([str(root / "step-00000002")] if step == 6 else [])
        assert os.path.isdir(new)
    assert sorted(os.listdir(root)) == ["step-00000004", "step-00000006", "step-00000020"]
    assert os.path.isdir(old)


def test_prune_ranks_by_write_time_not_step(tmp_path):
    """A run resumed from an earlier state writes lower step numbers than states it wrote before: newest survives."""
    root = tmp_path / "state"
    _state(root, 10, "A", saved_ns=1)
    _state(root, 4, "A", saved_ns=2)
    just = _state(root, 6, "A")
    rstate.prune_states(str(root), 2, "A", just_written=just)
    assert sorted(os.listdir(root)) == ["step-00000004", "step-00000006"]


def test_auto_never_adopts_another_runs_state(tmp_path):
    """The defect: a new run killed at step ~9 'resumed' the old run's step-20 (another learning rate)."""
    root = tmp_path / "state"
    _state(root, 20, "A")
    with pytest.raises(rstate.StateError, match="another run only.*step-00000020.*train.resume"):
        rstate.find_resume("auto", str(root), run_id="B", config={"optimizer": {"learning_rate": 1e-5}})
    mine = _state(root, 8, "B")
    assert rstate.find_resume("auto", str(root), run_id="B", config={"optimizer": {"learning_rate": 1e-5}}) == mine


def test_auto_refuses_a_state_saved_with_other_settings(tmp_path):
    root = tmp_path / "state"
    _state(root, 4, "A", config={"optimizer": {"learning_rate": 1e-5}, "train": {"max_train_steps": 10}})
    now = {"optimizer": {"learning_rate": 2e-5}, "train": {"max_train_steps": 20}}  # longer run: allowed
    with pytest.raises(rstate.StateError, match=r"other settings \(optimizer.learning_rate: 1e-05 -> 2e-05\)"):
        rstate.find_resume("auto", str(root), run_id="A", config=now)
    # an explicit path is the user's decision: resumed, the changes logged
    seen = []
    assert rstate.find_resume(str(root / "step-00000004"), str(root), seen.append, run_id="A", config=now)
    assert "learning_rate" in seen[0] and "max_train_steps" not in seen[0]


def test_every_state_damaged_starts_fresh_and_keeps_new_states(tmp_path):
    """With every state damaged, the new run must keep its own states (the old pruning kept the damaged ones)."""
    out = tmp_path / "run"
    root = out / "state"
    for step in (20, 22):
        p = _state(root, step, "A")
        with open(os.path.join(p, "trained.safetensors"), "r+b") as f:
            f.seek(-1, 2)
            f.write(b"\x01")
    (out / rstate.RUN_FILE).write_text(json.dumps({"run_id": "A"}))
    seen = []
    path, run_id = rstate.start_run(str(out), str(root), "auto", {}, seen.append)
    assert path is None and run_id != "A" and sum("checksum" in s for s in seen) == 2
    assert sorted(os.listdir(root / rstate.OTHER_RUNS / "A")) == ["step-00000020", "step-00000022"]  # kept aside
    assert json.loads((out / rstate.RUN_FILE).read_text())["run_id"] == run_id
    new = _state(root, 2, run_id)
    rstate.prune_states(str(root), 1, run_id, just_written=new)
    assert os.path.isdir(new)


def test_resumed_run_keeps_its_id_fresh_run_sets_old_states_aside(tmp_path):
    out = tmp_path / "run"
    root = out / "state"
    (out / rstate.RUN_FILE).parent.mkdir(parents=True)
    (out / rstate.RUN_FILE).write_text(json.dumps({"run_id": "A"}))
    a = _state(root, 4, "A")
    assert rstate.start_run(str(out), str(root), "auto", {"optimizer": {"learning_rate": 1e-5}}) == (a, "A")
    path, rid = rstate.start_run(str(out), str(root), "", {})  # a fresh run in the same folder
    assert path is None and rid != "A"
    assert not rstate.list_states(str(root)) and os.path.isdir(root / "other-runs" / "A" / "step-00000004")
    with pytest.raises(rstate.StateError, match="no such state folder"):
        rstate.find_resume(str(root / "step-00000004"), str(root))


def test_train_refuses_foreign_state_in_one_line(tmp_path, capsys):
    """Through train.main: refused before any model is loaded, the state named, nothing deleted."""
    import train
    out = tmp_path / "run"
    _state(out / "state", 20, "A")
    with pytest.raises(SystemExit) as e:
        train.main(["configs/demo.toml", f"output_dir={out}", "train.resume=auto", "cache.cache_dir=",
                    f"data.image_dirs=['{tmp_path}']"])  # a folder that exists: data sources are checked first
    msg = str(e.value.code)
    assert "another run only" in msg and "step-00000020" in msg and "\n" not in msg
    assert "Traceback" not in capsys.readouterr().err
    assert os.path.isdir(out / "state" / "step-00000020")


# ---------------------------------------------------------------------------------------------------------------------
# 2. Temporaries: our own names, cleaned when their writer is gone


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_removed_live_and_foreign_kept(tmp_path):
    d = tmp_path
    dead, live = _dead_pid(), os.getppid()
    names = {
        "dead": f"m.safetensors{fsio.TMP_TAG}-{fsio.HOST}-{dead}",
        "dead_dir": f"step-00000004{fsio.TMP_TAG}-{fsio.HOST}-{dead}",
        "dead_npz": f"store_index.npz{fsio.TMP_TAG}-{fsio.HOST}-{dead}.npz",
        "live": f"x.safetensors{fsio.TMP_TAG}-{fsio.HOST}-{live}",
        "other_host_new": f"y{fsio.TMP_TAG}-node-7-{dead}",
        "other_host_old": f"z{fsio.TMP_TAG}-node-7-{dead}",
        "not_ours": ".tmpAbc123",
    }
    for k, n in names.items():
        (d / n).mkdir() if k == "dead_dir" else (d / n).write_bytes(b"x")
    (d / names["dead_dir"] / "trained.safetensors").write_bytes(b"x")
    old = time.time() - fsio.STALE_AFTER_S - 60
    os.utime(d / names["other_host_old"], (old, old))
    removed = fsio.clean_stale_temps([str(d)])
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        names[k] for k in ("dead", "dead_dir", "dead_npz", "other_host_old"))
    assert sorted(os.listdir(d)) == sorted(names[k] for k in ("live", "other_host_new", "not_ours"))


def test_killed_export_leaves_only_a_recognisable_temp_that_the_next_start_removes(tmp_path):
    """The defect: kill -9 during an export left the safetensors library's `.tmpXXXXXX` (GBs at SDXL size) that
    nothing removed. A forked writer is killed as soon as its temporary appears."""
    import signal
    from models.checkpoint import save_safetensors_atomic
    target = tmp_path / "model.safetensors"
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            save_safetensors_atomic({"w": torch.zeros(64 << 20, dtype=torch.uint8)}, str(target))
        finally:
            os._exit(0)
    deadline = time.time() + 30
    while not os.listdir(tmp_path) and time.time() < deadline:
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    left = [n for n in os.listdir(tmp_path) if n != "model.safetensors"]
    assert left and all(fsio.is_temp(n) for n in left), left
    fsio.clean_stale_temps([str(tmp_path)])  # what train.py does at its next start
    assert not [n for n in os.listdir(tmp_path) if n != "model.safetensors"]


def test_own_safetensors_writer_matches_the_library(tmp_path):
    """Our streaming writer (no library temporary) reads back with safetensors, every dtype, with metadata."""
    ts = {"bf16": torch.randn(3, 5).bfloat16(), "f16": torch.randn(7).half(), "f32": torch.randn(2, 2),
          "i64": torch.arange(5), "b": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
          "empty": torch.zeros(0, 4), "u8": torch.arange(9, dtype=torch.uint8)}
    p = str(tmp_path / "m.safetensors")
    fsio.save_safetensors(ts, p, metadata={"k": "v"})
    back = load_file(p)
    assert back.keys() == ts.keys() and all(back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k]) for k in ts)
    with safe_open(p, "pt") as f:
        assert f.metadata() == {"k": "v"}
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_torch_save_disk_error_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """torch.save says only 'enforce fail ... unexpected pos' when a write fails; ours re-raises the OSError."""
    class Full:
        def __init__(self, f):
            self.f, self.error = f, None

        def write(self, b):
            self.error = OSError(28, "No space left on device")
            raise self.error

        def flush(self):
            pass

    monkeypatch.setattr(fsio, "_Recording", Full)
    p = str(tmp_path / "optimizer.pt")
    with pytest.raises(OSError) as e:
        fsio.torch_save({"a": torch.zeros(1000)}, p)
    assert fsio.describe_os_error(e.value) == f"no space left on device: {p}"
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# 3.-4. Big images are not bombs; a dangling symlink is a bad image, not the end of the run


def _png(path, w, h, data=True):
    """A 1-bit black PNG of w x h written by hand (a 12000 x 12000 one is ~20 kB); data=False: header only."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\x00" + b"\x00" * ((w + 7) // 8)
    idat = zlib.compress(row * h, 9) if data else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + (chunk(b"IDAT", idat) if data else b"") + chunk(b"IEND", b""))


def _data_cfg(dirs, **kw):
    from core.config import config_from_dict
    return config_from_dict({"data": {"image_dirs": [str(d) for d in dirs], "resolution": 64, "bucket_reso_step": 32,
                                      "min_bucket_reso": 32, "max_bucket_reso": 128, **kw}}).data


def test_144_megapixel_image_is_not_a_bomb(tmp_path):
    """The defect: Pillow's *warning* limit (~89.5 MP) was made an error; the stated limit is 178,956,970 px."""
    from data.images import BadImage, SkipReport, read_size
    from data.index import build_index
    d = tmp_path / "img"
    d.mkdir()
    _png(d / "scan.png", 12000, 12000)
    _png(d / "bomb.png", 20000, 20000, data=False)  # 400 MP: refused from the header alone (no data to decode)
    (d / "scan.txt").write_text("a scan")
    (d / "bomb.txt").write_text("a bomb")
    assert read_size(str(d / "scan.png")) == (12000, 12000)
    skipped = SkipReport()
    ix = build_index(_data_cfg([d]), skipped)
    assert ix.keys.tolist() == ["scan"]
    assert "decompression bomb: 20000x20000" in skipped.items[str(d / "bomb.png")]
    with pytest.raises(BadImage, match="max_image_pixels"):  # the option is the limit
        read_size(str(d / "scan.png"), max_pixels=100_000_000)
    with pytest.raises(ValueError, match="no usable images"):
        build_index(_data_cfg([d], max_image_pixels=100_000_000), SkipReport())


def test_dangling_symlink_is_skipped_and_reported(tmp_path):
    """The defect: one dangling symlink ended the run ('data error: No such file or directory')."""
    from data.images import SkipReport
    from data.index import build_index
    from PIL import Image
    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (64, 64)).save(d / "ok.png")
    (d / "ok.txt").write_text("fine")
    os.symlink(tmp_path / "gone.png", d / "link.png")
    skipped = SkipReport()
    ix = build_index(_data_cfg([d]), skipped)
    assert ix.keys.tolist() == ["ok"] and str(d / "link.png") in skipped.items
    assert "No such file" in skipped.items[str(d / "link.png")]


# ---------------------------------------------------------------------------------------------------------------------
# 6. Captions: missing ones counted, all missing is an error


def test_missing_captions_counted_and_all_empty_is_an_error(tmp_path, caplog):
    from data.index import load_or_build_index
    from PIL import Image
    d = tmp_path / "img"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64)).save(d / f"{i}.png")
    (d / "0.txt").write_text("has one")
    with caplog.at_level("WARNING"):
        ix = load_or_build_index(_data_cfg([d]), str(tmp_path / "ix"))
    assert len(ix) == 3 and "2 of 3 captions are empty" in caplog.text  # the per-subset count (data/sources.py)
    assert "data.allow_empty_captions = true" in caplog.text  # the warning names the setting that intends it
    os.remove(d / "0.txt")
    with pytest.raises(ValueError, match=r"every caption is empty \(subset 0: 3 of 3 \(no .txt caption files\)\).*"
                                         r"allow_empty_captions"):
        load_or_build_index(_data_cfg([d]), str(tmp_path / "ix"))
    caplog.clear()
    with caplog.at_level("INFO"):
        assert len(load_or_build_index(_data_cfg([d], allow_empty_captions=True), str(tmp_path / "ix"))) == 3
    said = [r for r in caplog.records if "3 of 3 captions are empty" in r.getMessage()]
    assert [r.levelname for r in said] == ["INFO"]  # intended: no longer a warning
    # a CSV without a caption column: the case (it cached and trained with '' captions, exit 0)
    csv = tmp_path / "m.csv"
    csv.write_text("image_path\n" + "".join(f"{d / f'{i}.png'}\n" for i in range(3)))
    cfg = _data_cfg([], metadata_files=[str(csv)])
    with pytest.raises(ValueError, match=r"3 of 3 \(no caption or tags field in m.csv\)"):
        load_or_build_index(cfg, str(tmp_path / "ix2"))


def test_no_usable_images_names_folders_and_recursive(tmp_path):
    from data.index import build_index
    from PIL import Image
    d = tmp_path / "img"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(d / "sub" / "a.png")
    with pytest.raises(ValueError, match=f"looked in {d} .*1 images are in subfolders: set data.recursive = true"):
        build_index(_data_cfg([d]))


# ---------------------------------------------------------------------------------------------------------------------
# 5. A full or read-only disk: one line naming the path, nothing damaged, a rerun after freeing space finishes


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of `size` (we are root); skipped where mounting is not allowed."""
    d = tmp_path / "disk"

    def mount(size, opts=""):
        return mount_tmpfs(d, f"size={size}{opts}")
    yield mount
    unmount(d)


def _fill(disk):
    """Take every free byte of the disk; returns the filler to delete."""
    p = disk / "filler"
    with open(p, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return p


def _temps(root):
    return [os.path.join(a, n) for a, ds, fs in os.walk(root) for n in ds + fs if fsio.is_temp(n)]


def test_cache_disk_full_is_one_line_store_stays_valid(tmp_path, small_disk, capsys):
    import cache
    from data.demo import make_demo_dataset
    from data.store import LatentStore
    disk = small_disk("4m")
    make_demo_dataset(str(tmp_path / "data"), n=2, size=(64, 64))
    argv = ["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'data'}']", f"cache.cache_dir={disk / 'c'}"]
    assert cache.main(argv) == 0
    from PIL import Image
    (tmp_path / "data2").mkdir()
    for i in range(2):  # two more images: the index and a shard to write
        Image.new("RGB", (64, 96), (200, 30 * i, 0)).save(tmp_path / "data2" / f"more{i}.png")
        (tmp_path / "data2" / f"more{i}.txt").write_text("a red square")
    argv[1] = f"data.image_dirs=['{tmp_path / 'data'}', '{tmp_path / 'data2'}']"
    filler = _fill(disk)
    with pytest.raises(SystemExit) as e:
        cache.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("cache.py: no space left on device: ") and str(disk / "c") in msg, msg
    assert "Traceback" not in capsys.readouterr().err
    assert not _temps(disk)
    store = LatentStore(str(disk / "c"))
    assert len(store) == 2 and not store.damaged  # what was there is intact
    os.remove(filler)
    assert cache.main(argv) == 0
    store = LatentStore(str(disk / "c"))
    assert len(store) == 4 and not store.damaged and not _temps(disk)


def test_cache_read_only_store_with_nothing_to_encode_is_fine(tmp_path, capsys):
    """The defect: a read-only cache dir failed writing the index even when every record was valid."""
    import cache
    from data.demo import make_demo_dataset
    make_demo_dataset(str(tmp_path / "data"), n=2, size=(64, 64))
    store, ro = tmp_path / "c", tmp_path / "ro"
    argv = ["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'data'}']", f"cache.cache_dir={store}"]
    assert cache.main(argv) == 0
    with read_only_view(store, ro):
        argv[2] = f"cache.cache_dir={ro}"
        assert cache.main(argv) == 0
        assert "already valid 2" in capsys.readouterr().out


@pytest.mark.slow
def test_train_disk_full_during_state_write(tmp_path, small_disk, capsys):
    """A full disk in the middle of a state write: one line naming it (not torch's 'enforce fail ... unexpected
    pos'), the earlier state intact, no temporary left; after freeing space, resume = auto finishes the run."""
    import train
    from data.demo import make_demo_dataset
    make_demo_dataset(str(tmp_path / "data"), n=2, size=(64, 64))
    # sizes of the tiny preset: export (fp16, every part) ~14 MB, state (fp32 network + AdamW) ~33 MB.
    # Step 1 writes export + state (47 MB), step 2 the final export (61 MB), then its state does not fit in 75 MB.
    disk = small_disk("75m")
    argv = ["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'data'}']", "cache.cache_dir=", f"output_dir={disk / 'run'}",
            "train.max_train_steps=2", "optimizer.lr_warmup_steps=0", "sample.sample_every_n_steps=0",
            "save.save_every_n_steps=1", "save.save_precision=fp16", "save.save_last_n_states=1", "data.batch_size=2"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("train.py: no space left on device: ") and str(disk / "run" / "state") in msg, msg
    assert "Traceback" not in capsys.readouterr().err
    assert not _temps(disk)
    assert [s for s, _ in rstate.list_states(str(disk / "run" / "state"))] == [1]
    assert rstate.verify_state(str(disk / "run" / "state" / "step-00000001")) is None
    subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
    assert train.main(argv + ["train.resume=auto"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert [s for s, _ in rstate.list_states(str(disk / "run" / "state"))] == [2] and not _temps(disk)
