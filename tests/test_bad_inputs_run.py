"""Bad inputs a run meets late, and generate.py's bad inputs (#28.1, #28.4, #28.5, #28.6, #28.7), through the real
entry points in process: a non-zero exit, one line naming the key / file / row, no traceback, and for a settings
error nothing created (the run folder / the output folder does not exist afterwards). Every case here stops before
a model loads (training/preflight.py checks the files a run reads later from their headers), except where said."""
import json
import os
import sqlite3
import struct

import pytest
import torch
from safetensors.torch import save_file

import models
from test_bad_inputs import _fails

DEMO = "configs/demo.toml"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Images, a latent store, model files (good, damaged, partial) and prompt files the cases point at."""
    import cache
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("run_inputs")
    make_demo_dataset(str(root / "imgs"), n=2, size=(64, 64))
    assert cache.main([DEMO, f"data.image_dirs=['{root / 'imgs'}']", f"cache.cache_dir={root / 'store'}"]) == 0
    # model files: a tiny SDXL and SD3, damaged copies, a checkpoint without its VAE
    models.save(models.build("sdxl", "tiny"), str(root / "sdxl.safetensors"), precision="fp16")
    models.save(models.build("sd3", "tiny"), str(root / "sd3.safetensors"), precision="fp16")
    data = (root / "sdxl.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "empty.safetensors").write_bytes(b"")
    (root / "bad_header.safetensors").write_bytes(data[:8] + b"{" * n + data[8 + n:])
    (root / "zip.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 500)  # another format under the name
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(root / "foreign.safetensors"))
    from models.checkpoint import SafeTensorFile
    f = SafeTensorFile(str(root / "sdxl.safetensors"))
    save_file({k: f.get(k) for k in f.keys() if not k.startswith("first_stage_model.")},
              str(root / "no_vae.safetensors"))
    # prompt files
    p = root / "prompts"
    p.mkdir()
    (p / "folder.txt").mkdir()
    (p / "latin1.txt").write_bytes("caf\xe9 --w 64\n".encode("latin-1"))
    (p / "empty.txt").write_text("# nothing but a comment\n\n")
    (p / "huge.txt").write_text("a cat --w 99999999 --h 64\n")
    (p / "steps.txt").write_text("a cat --s 100000000\n")
    (p / "bad_option.txt").write_text("a cat --zz 3\n")
    (p / "wide.txt").write_text("a cat --w 1024 --h 128\n")  # wider than the tiny MMDiT's position table (512 px)
    (p / "bad.toml").write_text("[[x\n")
    (p / "bad.json").write_text("{\n")
    (p / "unknown_key.json").write_text('[{"prompt": "x", "foo": 1}]')
    (p / "no_prompt.json").write_text('[{"negative_prompt": "x"}]')
    (p / "prompts.yaml").write_text("x\n")
    bom = "\ufeff"
    (p / "bom.toml").write_text(bom + 'prompts = [{prompt = "a red circle", width = 64, height = 64, steps = 1}]\n')
    (p / "bom.json").write_text(bom + '[{"prompt": "a red circle", "steps": 1}]')
    (p / "bom.txt").write_text(bom + "# a comment first\na red circle --s 1\n")
    (p / "utf16.txt").write_bytes("a red circle --s 1\n".encode("utf-16"))  # Notepad's "Unicode"
    # metadata: an integer image_path in a SQLite table (row 2)
    con = sqlite3.connect(root / "meta.sqlite")
    con.execute("create table t (image_path, caption)")
    con.execute("insert into t values (?, ?)", (str(root / "imgs" / "0000_red_circle.png"), "a"))
    con.execute("insert into t values (?, ?)", (12, "b"))
    con.commit()
    con.close()
    # config files whose combinations are wrong (the file must be named)
    (root / "bf16.toml").write_text(f'base = "{os.path.abspath(DEMO)}"\n[train]\nfull_bf16 = true\n')
    (root / "warmup.toml").write_text(f'base = "{os.path.abspath(DEMO)}"\n[train]\nmax_train_steps = 5\n'
                                      f'[optimizer]\nlr_warmup_steps = 9\n')
    return root


def _train(d, t, *extra):
    """train.py on the fixture's images from its store (one step, no previews), run folder under tmp_path."""
    return [DEMO, f"data.image_dirs=['{d / 'imgs'}']", f"cache.cache_dir={d / 'store'}", f"output_dir={t / 'run'}",
            "train.max_train_steps=1", "optimizer.lr_warmup_steps=0", "sample.sample_every_n_steps=0", *extra]


def _previews(d, t, prompts, *extra):
    return _train(d, t, f"sample.sample_prompts={prompts}", "sample.sample_every_n_steps=1", *extra)


# (argv builder, expected text, what the run folder must look like: False = not created); argv builders get
# (fixture root, tmp_path)
TRAIN = {
    # -- #28.1: every file the run reads later, checked before the first step
    "vae missing, read only at the first export (full fine-tune from a store)": (
        lambda d, t: _train(d, t, "model.vae=/no/such/vae.safetensors"),
        "model.vae: checkpoint file not found: /no/such/vae.safetensors"),
    "vae file of another kind": (lambda d, t: _train(d, t, f"model.vae={d / 'foreign.safetensors'}"),
                                 "the vae weights do not match a known sdxl layout"),
    "vae file truncated": (lambda d, t: _train(d, t, f"model.vae={d / 'truncated.safetensors'}"),
                           "model.vae: " + "{d}/truncated.safetensors: not a valid .safetensors file"),
    "checkpoint without the VAE its exports need": (
        lambda d, t: _train(d, t, f"model.pretrained_model_name_or_path={d / 'no_vae.safetensors'}"),
        "no weights for vae"),
    "text encoder file missing (sd3)": (
        lambda d, t: _train(d, t, "model.model_family=sd3", "model.clip_l=/no/clip_l.safetensors"),
        "model.clip_l: checkpoint file not found"),
    "caption hook file missing": (lambda d, t: _train(d, t, "data.caption_processor=/no/hook.py:caption"),
                                  "data.caption_processor: hook `/no/hook.py:caption`: file not found"),
    "LoRA network_weights missing": (
        lambda d, t: _train(d, t, "network.network_module=lora", "network.network_train_unet_only=true",
                            "network.network_weights=/no/lora.safetensors"),
        "network.network_weights: checkpoint file not found: /no/lora.safetensors"),
    "sample prompt file missing": (lambda d, t: _previews(d, t, "/no/prompts.txt"),
                                   "prompt file not found: /no/prompts.txt"),
    # -- #28.7: found after the run folder was created, before
    "resolution not a multiple of bucket_reso_step": (lambda d, t: _train(d, t, "data.resolution=1000"),
                                                      "resolution 1000 must be a multiple of bucket_reso_step 32"),
    "optimizer name typo": (lambda d, t: _train(d, t, "optimizer.optimizer_type=AdamWW"),
                            "unknown optimizer 'AdamWW'; did you mean 'AdamW'?"),
    "resume path missing": (lambda d, t: _train(d, t, "train.resume=/no/state/step-00000002"),
                            "train.resume: cannot resume from /no/state/step-00000002: no such state folder"),
    "param_groups regex invalid": (lambda d, t: _train(d, t, "optimizer.param_groups=[{pattern='(', lr=1e-4}]"),
                                   "optimizer.param_groups[0].pattern '(' is not a valid regex"),
    # -- #28.5: preview sizes and step counts
    "preview width 99999999": (lambda d, t: _previews(d, t, d / "prompts" / "huge.txt"),
                               "huge.txt:1: --w: 'width' 99999999 is larger than 16384"),
    "preview steps 100000000": (lambda d, t: _previews(d, t, d / "prompts" / "steps.txt"),
                                "steps.txt:1: --s: 'steps' 100000000 is larger than 10000"),
    "preview wider than the MMDiT's position table": (
        lambda d, t: _previews(d, t, d / "prompts" / "wide.txt", "model.model_family=sd3"),
        "1024x128 is larger than this model renders (512 px per side"),
    # -- #28.6
    "sample_prompts naming a folder": (lambda d, t: _previews(d, t, d / "prompts"),
                                       "prompts is a folder; give a prompt file"),
    "prompt file not UTF-8": (lambda d, t: _previews(d, t, d / "prompts" / "latin1.txt"),
                              "latin1.txt:1: not UTF-8 text (byte 0xe9)"),
    "prompt file without prompts": (lambda d, t: _previews(d, t, d / "prompts" / "empty.txt"), "no prompts in"),
    "learning rate 0": (lambda d, t: _train(d, t, "optimizer.learning_rate=0"),
                        "every learning rate is 0 (the unet (optimizer.learning_rate)): nothing would train"),
    "cross-field error of a file names the file": (lambda d, t: [d / "bf16.toml", f"output_dir={t / 'run'}"],
                                                  "bf16.toml: train.full_bf16 requires"),
    "run-level combination names the file": (
        lambda d, t: [d / "warmup.toml", f"output_dir={t / 'run'}", "cache.cache_dir="],
        "warmup.toml: optimizer.lr_warmup_steps = 9 exceeds train.max_train_steps = 5"),
}


@pytest.mark.parametrize("name", list(TRAIN))
def test_train_settings_error_is_one_line_before_anything_is_written(name, files, tmp_path, capsys):
    argv, expect = TRAIN[name]
    msg, rest = _fails("train", argv(files, tmp_path), expect.format(d=files), capsys)
    assert not rest, msg
    assert not (tmp_path / "run").exists(), f"{name}: the run folder was created"


def test_sqlite_integer_image_path_names_the_file_and_row(files, tmp_path, capsys):
    """Was: 'expected str, bytes or os.PathLike object, not int' (no file, no row). A data error (found reading the
    rows, after the run folder exists): one line naming both."""
    msg, rest = _fails("train", [DEMO, "data.image_dirs=[]", f"data.metadata_files=['{files / 'meta.sqlite'}']",
                                 "cache.cache_dir=", f"output_dir={tmp_path / 'run'}"],
                       "meta.sqlite' table t row 2: 'image_path' must be text, got int 12", capsys)
    assert not rest


def test_warnings_at_start(files, tmp_path, capsys, caplog):
    """Allowed but probably not meant, said at start: a text encoder at learning rate 0 next to a training network;
    zero terminal SNR with epsilon prediction (#25.14, as kohya's train_util.verify_training_args warns); a separate
    file the family has no part for. The settings step returns them as warnings (train.py logs them when the run
    folder opens) and the run goes on."""
    import train
    argv = _train(files, tmp_path, "train.train_text_encoder=true", "optimizer.learning_rate_te1=0",
                  "loss.zero_terminal_snr=true", "model.v_parameterization=false", "model.t5xxl=/unused/t5.safetensors")
    cfg, _ = train.cli.parse([str(a) for a in argv], "train.py", "")
    _, _, notes, _, _ = train.resolve_settings(cfg, 1, DEMO)
    warnings = [n for level, n in notes if level >= 30]
    assert any("learning rate 0: te1 (optimizer.learning_rate_te1) does not train" in w for w in warnings), warnings
    assert any("zero_terminal_snr = true with epsilon prediction" in w and "ComfyUI ignores it" in w
               for w in warnings), warnings
    assert any("model.t5xxl is set, but sdxl models have no such part: not used" in w for w in warnings), warnings
    assert not (tmp_path / "run").exists()


# -- generate.py (#28.4, #28.5): each bad --model / --prompt_file is one line, nothing written
GENERATE = {
    "model truncated": (lambda d: ["--model", d / "truncated.safetensors"], "not a valid .safetensors file"),
    "model zero bytes": (lambda d: ["--model", d / "empty.safetensors"], "header too small"),
    "model header not JSON": (lambda d: ["--model", d / "bad_header.safetensors"], "invalid JSON in header"),
    "model of no known family": (lambda d: ["--model", d / "foreign.safetensors"],
                                 "foreign.safetensors: cannot tell the model family"),
    "model not safetensors": (lambda d: ["--model", d / "zip.safetensors"], "not a valid .safetensors file"),
    "model missing": (lambda d: ["--model", d / "nope.safetensors"], "checkpoint file not found"),
    "prompt file missing": (lambda d: ["--prompt_file", d / "prompts" / "nope.txt"], "prompt file not found"),
    "prompt file a folder": (lambda d: ["--prompt_file", d / "prompts" / "folder.txt"], "is a folder"),
    "prompt file unknown option": (lambda d: ["--prompt_file", d / "prompts" / "bad_option.txt"],
                                   "bad_option.txt:1: unknown option --zz"),
    "prompt file not UTF-8": (lambda d: ["--prompt_file", d / "prompts" / "latin1.txt"], "not UTF-8 text"),
    "prompt file empty": (lambda d: ["--prompt_file", d / "prompts" / "empty.txt"], "no prompts in"),
    "prompt file invalid TOML": (lambda d: ["--prompt_file", d / "prompts" / "bad.toml"], "bad.toml: not valid toml"),
    "prompt file invalid JSON": (lambda d: ["--prompt_file", d / "prompts" / "bad.json"], "bad.json: not valid json"),
    "prompt file unknown key": (lambda d: ["--prompt_file", d / "prompts" / "unknown_key.json"],
                                "prompt 1: unknown key 'foo'"),
    "prompt file without prompt": (lambda d: ["--prompt_file", d / "prompts" / "no_prompt.json"],
                                   "prompt 1: missing 'prompt'"),
    "prompt file type": (lambda d: ["--prompt_file", d / "prompts" / "prompts.yaml"], "unsupported prompt file type"),
    "prompt file width 99999999": (lambda d: ["--prompt_file", d / "prompts" / "huge.txt"], "larger than 16384"),
    "prompt file steps 100000000": (lambda d: ["--prompt_file", d / "prompts" / "steps.txt"], "larger than 10000"),
    "--w 99999999": (lambda d: ["--w", "99999999"], "--w 99999999 is larger than 16384"),
    "--steps 100000000": (lambda d: ["--steps", "100000000"], "--steps 100000000 is larger than 10000"),
    "wider than the MMDiT renders (model loaded)": (
        lambda d: ["--model", d / "sd3.safetensors", "--w", "1024", "--h", "128"],
        "1024x128 is larger than this model renders (512 px per side"),
}


@pytest.mark.parametrize("name", list(GENERATE))
def test_generate_bad_input_is_one_line(name, files, tmp_path, capsys):
    extra = GENERATE[name][0](files)
    argv = ["--out", tmp_path / "out", "--steps", "1"]
    argv += [] if "--model" in extra else ["--model", files / "sdxl.safetensors"]
    argv += [] if "--prompt_file" in extra else ["--prompt", "a cat"]
    msg, rest = _fails("generate", argv + extra, GENERATE[name][1], capsys)
    assert not rest, msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["bom.toml", "bom.json", "bom.txt", "utf16.txt"])
def test_prompt_files_with_a_byte_order_mark(name, files):
    """Was: a BOM failed on line 1 (TOML: 'Invalid statement', JSON: 'Unexpected UTF-8 BOM'; in a .txt it became
    part of the first line, so a first-line comment was read as a prompt). Windows editors write one."""
    from diffusion.prompts import load_prompts
    prompts = load_prompts(str(files / "prompts" / name))
    assert [p.prompt for p in prompts] == ["a red circle"]


def test_generate_reads_a_bom_prompt_file(files, tmp_path):
    """Through generate.py: the image is written and its A1111 parameters start with the prompt, no BOM."""
    import generate
    from PIL import Image
    assert generate.main(["--model", str(files / "sdxl.safetensors"), "--prompt_file",
                          str(files / "prompts" / "bom.toml"), "--out", str(tmp_path / "out")]) == 0
    (png,) = sorted((tmp_path / "out").iterdir())
    assert Image.open(png).text["parameters"].startswith("a red circle\n")
