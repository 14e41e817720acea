"""Bad inputs and environments of the latent store and the files around it (#28.6, store / cache parts), through the
real entry points in process: a non-zero exit and one line naming the file or the key, no traceback, and for a
settings error nothing created; a damaged file we can rebuild is rebuilt."""
import os

import pytest

from helpers import mount_tmpfs, read_only_view, unmount
from test_bad_inputs import _fails

DEMO = "configs/demo.toml"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("imgs")
    make_demo_dataset(str(root), n=2, size=(64, 64))
    return root


@pytest.fixture
def small_disk(tmp_path):
    d = mount_tmpfs(tmp_path / "disk", "size=6m")  # the tiny preset's export (fp16) is ~14 MB: it cannot fit
    yield d
    unmount(d)


def test_full_disk_during_export_names_the_file(images, small_disk, capsys):
    """Was: "train.py: no space left on device" (a write() error names no file)."""
    out = small_disk / "run"
    msg, _ = _fails("train", [DEMO, f"data.image_dirs=['{images}']", "cache.cache_dir=", f"output_dir={out}",
                              "train.max_train_steps=1", "optimizer.lr_warmup_steps=0", "sample.sample_every_n_steps=0",
                              "save.save_every_n_steps=0"], "no space left on device", capsys)
    assert msg == f"train.py: no space left on device: {out / 'models' / 'demo.safetensors'}", msg
    assert not [n for _, _, fs in os.walk(small_disk) for n in fs if ".tmp-sdtrain" in n]


def test_read_only_store_names_the_target_not_its_temporary(images, tmp_path, capsys):
    """cache.py on a read-only store that needs writing: the message names the file it wanted to write (was:
    `dataset_index.npz.tmp-sdtrain-<host>-<pid>.npz`)."""
    import cache
    store, ro = tmp_path / "c", tmp_path / "ro"
    assert cache.main([DEMO, f"data.image_dirs=['{images}']", f"cache.cache_dir={store}"]) == 0
    (tmp_path / "more").mkdir()
    from PIL import Image
    Image.new("RGB", (64, 96), (200, 30, 0)).save(tmp_path / "more" / "extra.png")  # a changed dataset: the index
    (tmp_path / "more" / "extra.txt").write_text("a red square")                  # is rewritten
    with read_only_view(store, ro):
        msg, _ = _fails("cache", [DEMO, f"data.image_dirs=['{images}', '{tmp_path / 'more'}']",
                                  f"cache.cache_dir={ro}"], "read-only file system", capsys)
    assert ".tmp-sdtrain" not in msg and msg.endswith(str(ro / "dataset_index.npz")), msg


def test_truncated_dataset_index_is_rebuilt(images, tmp_path, caplog):
    """Was: 'File is not a zip file' (no file named), and no rebuild."""
    import cache
    from data.index import DatasetIndex
    store = tmp_path / "c"
    argv = [DEMO, f"data.image_dirs=['{images}']", f"cache.cache_dir={store}"]
    assert cache.main(argv) == 0
    ix = store / "dataset_index.npz"
    data = ix.read_bytes()
    ix.write_bytes(data[: len(data) // 2])
    assert cache.main(argv) == 0
    assert any(str(ix) in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert len(DatasetIndex.load(str(ix))) == 2


def test_temp_names_become_their_targets():
    """describe_os_error names the file a temporary stands for, also inside a state folder being written."""
    import errno

    from core.fsio import describe_os_error, final_path, temp_path
    f = temp_path("/r/models/a.safetensors")
    assert final_path(f) == "/r/models/a.safetensors"
    assert final_path(temp_path("/r/i.npz", ".npz")) == "/r/i.npz"
    inside = os.path.join(temp_path("/r/state/step-00000002"), "model.safetensors")
    assert final_path(inside) == "/r/state/step-00000002/model.safetensors"
    e = OSError(errno.EROFS, "Read-only file system", inside)
    assert describe_os_error(e) == "read-only file system: /r/state/step-00000002/model.safetensors"
    assert final_path("/plain/file.tmp") == "/plain/file.tmp"


def test_cache_dir_naming_a_file(images, tmp_path, capsys):
    """Was: a FileExistsError traceback in cache.py; train.py said "[Errno 17] File exists" (no key) after creating
    the run folder."""
    f = tmp_path / "afile"
    f.write_text("not a folder")
    out = tmp_path / "run"
    for entry, extra in (("cache", []), ("train", [f"output_dir={out}"])):
        msg, _ = _fails(entry, [DEMO, f"data.image_dirs=['{images}']", f"cache.cache_dir={f}", *extra],
                        "cache.cache_dir", capsys)
        assert f"cache.cache_dir = '{f}' is a file" in msg, msg
    msg, _ = _fails("cache", [DEMO, f"data.image_dirs=['{images}']", f"cache.cache_dir={f / 'store'}"],
                    "cache.cache_dir", capsys)
    assert f"lies under {f}, which is a file" in msg, msg
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # nothing created


def test_cache_disk_full_line_not_on_the_progress_bar(tmp_path, capsys):
    """A full disk while shards are written: the bar is ended before the one line (was: printed onto the bar)."""
    import cache
    from PIL import Image
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(16):
        Image.new("RGB", (128, 128), (10 * i, 90, 200)).save(imgs / f"i{i}.png")
        (imgs / f"i{i}.txt").write_text("a square")
    disk = mount_tmpfs(tmp_path / "disk", "size=1m")
    try:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as fh:  # take the disk, then give back room for the index but not the shard
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(filler, max(0, os.path.getsize(filler) - (32 << 10)))
        with pytest.raises(SystemExit) as e:  # 16 latents of 4x16x16 fp32: a 64 KiB shard
            cache.main([DEMO, f"data.image_dirs=['{imgs}']", f"cache.cache_dir={disk / 'c'}", "cache.latent_dtype=fp32"])
        msg = str(e.value.code)
        assert msg.startswith("cache.py: no space left on device: ") and "shards" in msg, msg
        err = capsys.readouterr().err
        assert "encode" in err and err.endswith("\n"), repr(err[-200:])  # the bar was drawn, and ended
    finally:
        unmount(disk)
