"""Bad configs and inputs through the real entry points (train.main / cache.main, in-process): each ends with a
non-zero exit and one line that names the problem, never a traceback. Nothing here loads a model except the
missing-checkpoint case, so the whole file runs in a few seconds."""
import importlib
import os

import pytest
import torch
from PIL import Image

from training import resume as rstate
from helpers import mount_tmpfs, unmount

DEMO = "configs/demo.toml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Folders and files the cases point at."""
    root = tmp_path_factory.mktemp("bad")
    good = root / "good"
    good.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(good / f"g{i}.png")
        (good / f"g{i}.txt").write_text("a shape")
    (root / "empty").mkdir()
    nested = root / "nested" / "sub"
    nested.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(nested / "n.png")
    nocap = root / "nocap"
    nocap.mkdir()
    Image.new("RGB", (64, 64)).save(nocap / "a.png")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (corrupt / "z.jpg").write_bytes(b"")
    dup = root / "dup"
    (dup / "a").mkdir(parents=True)
    (dup / "b").mkdir()
    for sub in ("a", "b"):
        Image.new("RGB", (64, 64)).save(dup / sub / "same.png")
    (root / "nopath.csv").write_text("file,caption\na.png,x\n")
    (root / "nocaption.csv").write_text(f"image_path\n{good / 'g0.png'}\n{good / 'g1.png'}\n")
    (root / "broken.json").write_text("{not json")
    (root / "bad.toml").write_text("[train\nmax_train_steps = 3\n")
    (root / "lr_in_train.toml").write_text(f'base = "{os.path.abspath(DEMO)}"\n[train]\nlearning_rate = 1e-4\n')
    (root / "child.toml").write_text('base = "missing_parent.toml"\n')
    (root / "loop_a.toml").write_text('base = "loop_b.toml"\n')
    (root / "loop_b.toml").write_text('base = "loop_a.toml"\n')
    # states for the resume cases
    st = root / "states"
    for step, run in ((4, "A"), (6, "A")):
        tmp = rstate.tmp_dir_for(str(st), step)
        rstate.write_rank_rng(tmp, 0)
        rstate.write_state(tmp, str(st / f"step-{step:08d}"), trained={"w": torch.zeros(2)},
                           optimizer={"state": {}, "param_groups": []}, progress={"step": step, "run_id": run})
    with open(st / "step-00000006" / "optimizer.pt", "r+b") as f:
        f.seek(3)
        f.write(b"\xff")
    return root


def _out(tmp_path):
    return [f"output_dir={tmp_path / 'run'}", "cache.cache_dir="]


def _dirs(*paths):
    return "data.image_dirs=[" + ",".join(f"'{p}'" for p in paths) + "]"


def _fails(entry, argv, expect, capsys):
    """Run entry.main(argv): exit code != 0, the last message one line containing `expect`, no traceback."""
    mod = importlib.import_module(entry)
    with pytest.raises(SystemExit) as e:
        mod.main([str(a) for a in argv])
    err = capsys.readouterr().err
    code = e.value.code
    assert code not in (0, None), err
    msg = code if isinstance(code, str) else err.strip().splitlines()[-1]
    assert "Traceback" not in err, err
    first, *rest = msg.strip().splitlines()
    assert expect in first, msg
    return msg, rest


# (entry, argv builder, expected text); argv builders get (data root, tmp_path)
CASES = {
    # -- the config file and the command line
    "config file missing": ("train", lambda d, t: [d / "nope.toml"], "config file not found"),
    "invalid TOML": ("train", lambda d, t: [d / "bad.toml"], "invalid TOML"),
    "misspelt key": ("train", lambda d, t: [DEMO, "train.max_train_step=3"], "did you mean `max_train_steps`"),
    "key of another table (file)": ("train", lambda d, t: [d / "lr_in_train.toml"],
                                    "learning_rate belongs in [optimizer]"),
    "key of another table (override)": ("train", lambda d, t: [DEMO, "train.learning_rate=1e-4"],
                                        "learning_rate belongs in [optimizer]"),
    "wrong type": ("train", lambda d, t: [DEMO, "train.max_train_steps=many"], "expected an integer"),
    "out of range": ("train", lambda d, t: [DEMO, "data.batch_size=0"], "out of range"),
    "not an allowed value": ("train", lambda d, t: [DEMO, "train.mixed_precision=fp8"], "is not allowed"),
    "missing base file": ("train", lambda d, t: [d / "child.toml"], "child.toml: base file not found"),
    "circular base": ("train", lambda d, t: [d / "loop_a.toml"], "circular base chain"),
    "unknown output_dir placeholder": ("train", lambda d, t: [DEMO, "output_dir=runs/{foo}"],
                                       "only {date} and {time}"),
    "resolution not a multiple of 8": ("train", lambda d, t: [DEMO, "data.resolution=100"], "multiple of 8"),
    "bucket bounds crossed": ("train", lambda d, t: [DEMO, "data.min_bucket_reso=512"], "larger than"),
    "full_bf16 without bf16": ("train", lambda d, t: [DEMO, "train.full_bf16=true"], "requires"),
    "override without =": ("train", lambda d, t: [DEMO, "train.max_train_steps"], "must look like"),
    "hook without function": ("train", lambda d, t: [DEMO, "data.caption_processor=mymodule"], "must look like"),
    # -- settings that only make sense together
    "no model": ("train", lambda d, t: [DEMO, *_out(t), "model.model_preset="], "model.model_preset"),
    "warm-up longer than the run": ("train", lambda d, t: [DEMO, *_out(t), "train.max_train_steps=5",
                                                          "optimizer.lr_warmup_steps=9"], "exceeds"),
    "previews without prompts": ("train", lambda d, t: [DEMO, *_out(t), "sample.sample_prompts="],
                                 "sample_prompts is empty"),
    "prompt file missing": ("train", lambda d, t: [DEMO, *_out(t), f"sample.sample_prompts={d / 'p.txt'}"],
                            "p.txt"),
    # -- data
    "image folder missing": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "nope")], "is not a directory"),
    "empty image folder": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "empty")], "no usable images"),
    "images only in subfolders": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "nested")],
                                  "set data.recursive = true"),
    "every image unreadable": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "corrupt")], "2 skipped"),
    "every caption empty": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "nocap")], "every caption is empty"),
    "CSV without a caption column": ("train", lambda d, t: [DEMO, *_out(t), "data.image_dirs=[]",
                                                           f"data.metadata_files=['{d / 'nocaption.csv'}']"],
                                     "no caption or tags field in nocaption.csv"),
    "CSV without image_path": ("train", lambda d, t: [DEMO, *_out(t), "data.image_dirs=[]",
                                                     f"data.metadata_files=['{d / 'nopath.csv'}']"], "image_path"),
    "metadata file missing": ("train", lambda d, t: [DEMO, *_out(t), "data.image_dirs=[]",
                                                    f"data.metadata_files=['{d / 'gone.json'}']"], "does not exist"),
    "metadata not JSON": ("train", lambda d, t: [DEMO, *_out(t), "data.image_dirs=[]",
                                                f"data.metadata_files=['{d / 'broken.json'}']"], "not valid JSON"),
    "duplicate keys": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "dup"), "data.recursive=true"],
                       "duplicate dataset key"),
    # -- resume
    "resume path missing": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "good"),
                                                  f"train.resume={d / 'states' / 'step-00000099'}"],
                            "no such state folder"),
    "resume path damaged": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "good"),
                                                  f"train.resume={d / 'states' / 'step-00000006'}"],
                            "optimizer.pt does not match its checksum"),
    "resume path not a state": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "good"), f"train.resume={d}"],
                                "incomplete (no COMPLETE marker)"),
    # -- model
    "checkpoint missing": ("train", lambda d, t: [DEMO, *_out(t), _dirs(d / "good"),
                                                 "model.pretrained_model_name_or_path=/no/such.safetensors"],
                           "checkpoint file not found: /no/such.safetensors"),
    # -- cache.py
    "cache: no cache_dir": ("cache", lambda d, t: [DEMO, "cache.cache_dir="], "cache_dir is empty"),
    "cache: misspelt key": ("cache", lambda d, t: [DEMO, f"cache.cache_dir={t / 'c'}", "cache.vae_batchsize=2"],
                            "did you mean `vae_batch_size`"),
    "cache: image folder missing": ("cache", lambda d, t: [DEMO, f"cache.cache_dir={t / 'c'}", _dirs(d / "nope")],
                                    "is not a directory"),
    "cache: every caption empty": ("cache", lambda d, t: [DEMO, f"cache.cache_dir={t / 'c'}", _dirs(d / "nocap")],
                                   "every caption is empty"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, data, tmp_path, capsys):
    entry, argv, expect = CASES[name]
    _, rest = _fails(entry, argv(data, tmp_path), expect, capsys)
    assert not rest or name == "duplicate keys", rest  # one line (duplicates list the keys below it)


@pytest.fixture
def ro_dir(tmp_path):
    """A read-only tmpfs (we are root: chmod alone would not stop us)."""
    d = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    yield d
    unmount(d)


def test_read_only_output_dir_and_cache_dir(data, ro_dir, capsys):
    msg, _ = _fails("train", [DEMO, f"output_dir={ro_dir / 'run'}", "cache.cache_dir=", _dirs(data / "good")],
                    "read-only file system", capsys)
    assert str(ro_dir / "run") in msg
    msg, _ = _fails("cache", [DEMO, f"cache.cache_dir={ro_dir / 'c'}", _dirs(data / "good")], "read-only file system",
                    capsys)
    assert str(ro_dir / "c") in msg
