"""What other tools read from our inputs and outputs: v-prediction markers (ComfyUI's rule), file modes,
modelspec + kohya training metadata, the A1111 PNG infotext (parsed by a port of A1111's parser).

One tiny in-process run (cache.py + train.py, 1 step, previews) from a NoobAI-style file (`v_pred` / `ztsnr`
empty top-level tensors) provides the outputs that several tests inspect.
"""
import hashlib
import io
import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import models


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI's rule (comfy/supported_models.py, SDXL.model_type; comfy/model_detection.py hands it the whole state dict)


def comfy_sdxl_model_type(state_dict_keys) -> tuple[str, bool]:
    """Port of ComfyUI's SDXL.model_type: (model type, sampling_settings zsnr)."""
    keys = set(state_dict_keys)
    if "edm_mean" in keys and "edm_std" in keys:
        return "EDM", False
    if "edm_vpred.sigma_max" in keys:
        return "V_PREDICTION_EDM", False
    if "v_pred" in keys:
        return "V_PREDICTION", "ztsnr" in keys
    return "EPS", False


def file_keys(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys()), dict(f.metadata() or {})


_BASE: dict = {}


def base_state_dict() -> dict:
    """The tiny SDXL export layout (built once per module)."""
    if not _BASE:
        _BASE.update(models.build("sdxl", "tiny", seed=3).export_state_dict())
    return dict(_BASE)


def noobai_style_file(path, v_pred=True, ztsnr=True):
    """A tiny SDXL single file as the v-prediction anime fine-tunes ship: the sgm layout plus empty top-level
    `v_pred` / `ztsnr` tensors, no modelspec."""
    sd = base_state_dict()
    if v_pred:
        sd["v_pred"] = torch.tensor([])
    if ztsnr:
        sd["ztsnr"] = torch.tensor([])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def vpred_run(tmp_path_factory):
    """cache.py + train.py in-process from a NoobAI-style file: 2 steps, an export and previews (2 prompts + grid)
    after each, state."""
    import cache
    import train
    from data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("outputs")
    ckpt = noobai_style_file(root / "noob_tiny.safetensors")
    make_demo_dataset(str(root / "data"), n=4, size=(64, 64))
    (root / "p.txt").write_text("a red circle --s 2 --d 7\na blue square --s 2 --d 8\n")
    common = ["configs/demo.toml", f"data.image_dirs=['{root / 'data'}']", f"cache.cache_dir={root / 'cache'}",
              "data.resolution=64", "data.max_bucket_reso=128", f"model.pretrained_model_name_or_path={ckpt}"]
    old_mask = os.umask(0o022)
    try:
        assert cache.main(common) == 0
        assert train.main([*common, f"output_dir={root / 'run'}", "train.max_train_steps=2",
                           "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "save.save_every_n_steps=1",
                           "data.batch_size=2", f"sample.sample_prompts={root / 'p.txt'}", "sample.sample_every_n_steps=1",
                           "sample.sample_params={width=64, height=64}", "save.metadata_title=Tiny NoobAI",
                           "save.metadata_author=someone", "save.metadata_description=a test model",
                           "log.tensorboard=true", "optimizer.param_groups=[{pattern='^input_blocks', lr=1e-4}]"]) == 0
    finally:
        os.umask(old_mask)
    return root


def test_comfy_rule_port_reads_real_layouts():
    """The port itself: plain SDXL keys are epsilon, v_pred alone is v without zsnr, both set zsnr."""
    base = ["model.diffusion_model.input_blocks.0.0.weight"]
    assert comfy_sdxl_model_type(base) == ("EPS", False)
    assert comfy_sdxl_model_type(base + ["ztsnr"]) == ("EPS", False)  # ztsnr is only read for v-prediction files
    assert comfy_sdxl_model_type(base + ["v_pred"]) == ("V_PREDICTION", False)
    assert comfy_sdxl_model_type(base + ["v_pred", "ztsnr"]) == ("V_PREDICTION", True)


def test_noobai_style_file_loads_with_both_markers(tmp_path):
    comp = models.load(str(noobai_style_file(tmp_path / "m.safetensors")), parts=("unet",))
    assert comp.v_parameterization and comp.zero_terminal_snr
    assert comp.sample_schedule().prediction == "v" and comp.sample_schedule().zero_terminal_snr
    comp = models.load(str(noobai_style_file(tmp_path / "v.safetensors", ztsnr=False)), parts=("unet",))
    assert comp.v_parameterization and not comp.zero_terminal_snr
    comp = models.load(str(tmp_path / "m.safetensors"), parts=("unet",), v_parameterization=False)  # caller wins
    assert not comp.v_parameterization and comp.zero_terminal_snr


def test_edm_files_are_refused_clearly(tmp_path):
    sd = base_state_dict()
    sd["edm_mean"], sd["edm_std"] = torch.zeros(1, 4, 1, 1), torch.ones(1, 4, 1, 1)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "pg.safetensors"))
    with pytest.raises(models.CheckpointError, match="EDM"):
        models.load(str(tmp_path / "pg.safetensors"))


def test_config_or_markers_decide_and_the_log_says_which(tmp_path):
    from core.config import load_config
    ckpt = noobai_style_file(tmp_path / "m.safetensors")
    cfg, notes = models.resolve_prediction(load_config("configs/demo.toml", [f"model.pretrained_model_name_or_path={ckpt}"]))
    assert cfg.model.v_parameterization is True and cfg.loss.zero_terminal_snr is True
    assert any("v_pred" in n and "from the checkpoint" in n for n in notes)
    cfg, notes = models.resolve_prediction(load_config("configs/demo.toml", [
        f"model.pretrained_model_name_or_path={ckpt}", "model.v_parameterization=false"]))
    assert cfg.model.v_parameterization is False and cfg.loss.zero_terminal_snr is True
    assert any("model.v_parameterization = false from the config overrides" in n for n in notes)
    cfg, notes = models.resolve_prediction(load_config("configs/demo.toml"))  # a preset: no file, both false
    assert cfg.model.v_parameterization is False and cfg.loss.zero_terminal_snr is False and not notes


def test_vpred_training_run_exports_both_markers(vpred_run):
    keys, meta = file_keys(vpred_run / "run" / "models" / "demo.safetensors")
    assert comfy_sdxl_model_type(keys) == ("V_PREDICTION", True)
    assert meta["modelspec.prediction_type"] == "v"
    log = (vpred_run / "run" / "logs" / "train.log").read_text()
    assert "from the checkpoint's `v_pred` marker" in log and "`ztsnr` marker" in log
    comp = models.load(str(vpred_run / "run" / "models" / "demo.safetensors"), parts=("unet",))
    assert comp.v_parameterization and comp.zero_terminal_snr


def test_epsilon_export_has_no_markers(tmp_path):
    models.save(models.build("sdxl", "tiny"), str(tmp_path / "eps.safetensors"), precision="fp32")
    keys, meta = file_keys(tmp_path / "eps.safetensors")
    assert "v_pred" not in keys and "ztsnr" not in keys
    assert comfy_sdxl_model_type(keys) == ("EPS", False) and meta["modelspec.prediction_type"] == "epsilon"


# ---------------------------------------------------------------------------------------------------------------------
# File modes


def test_every_output_has_the_umask_mode(vpred_run):
    """Exports, PNGs (samples and grid), state files, store shards and indexes, logs: 0644 under umask 022."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(vpred_run / "run") for f in fs]
    files += [os.path.join(d, f) for d, _, fs in os.walk(vpred_run / "cache") for f in fs]
    kinds = {os.path.splitext(f)[1] for f in files}
    assert {".safetensors", ".png", ".pt", ".json", ".npz", ".toml"} <= kinds, kinds
    assert any("shards" in f for f in files) and any("state" in f for f in files)
    modes = {f: stat.S_IMODE(os.stat(f).st_mode) for f in files}
    assert all(m == 0o644 for m in modes.values()), {f: oct(m) for f, m in modes.items() if m != 0o644}
    assert not [f for f in files if ".tmp" in os.path.basename(f)]


def test_file_mode_follows_the_umask(tmp_path):
    from core import fsio
    from diffusion.prompts import save_png
    from PIL import Image
    mask = os.umask(0o022)
    os.umask(mask)
    assert fsio.file_mode() == 0o666 & ~mask
    save_png(Image.new("RGB", (8, 8)), str(tmp_path / "a.png"), "x")
    from models.checkpoint import save_safetensors_atomic
    save_safetensors_atomic({"a": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    for name in ("a.png", "a.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == fsio.file_mode()


# ---------------------------------------------------------------------------------------------------------------------
# modelspec and training metadata


def kohya_modelspec_hash(state_dict) -> str:
    """Port of kohya sd-scripts' sai_model_spec.precalculate_safetensors_hashes: each tensor alone through
    safetensors.torch.save, the bytes after the header hashed one after another."""
    from safetensors.torch import save as st_save
    h = hashlib.sha256()
    for tensor in state_dict.values():
        b = io.BytesIO(st_save({"tensor": tensor}))
        n = int.from_bytes(b.read(8), "little")
        b.seek(n + 8)
        h.update(b.read())
    return f"0x{h.hexdigest()}"


# sai_model_spec 1.0.0 fields: required ("must") and the ones a trainer should fill
MODELSPEC_MUST = ("sai_model_spec", "architecture", "implementation", "title", "resolution")
MODELSPEC_SHOULD = ("description", "author", "date", "prediction_type", "hash_sha256")


def test_modelspec_hash_is_kohyas(tmp_path):
    from models.checkpoint import modelspec_hash
    sd = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int64), "e": torch.zeros(0),
          "s": torch.tensor(1.5)}
    assert modelspec_hash(sd) == kohya_modelspec_hash(sd)
    assert modelspec_hash(dict(reversed(list(sd.items())))) != modelspec_hash(sd)  # the order counts, as in kohya's


def test_export_metadata_is_complete(vpred_run):
    path = vpred_run / "run" / "models" / "demo.safetensors"
    _, meta = file_keys(path)
    for k in MODELSPEC_MUST + MODELSPEC_SHOULD:
        assert meta.get(f"modelspec.{k}"), k
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "64x64"  # the trained resolution, not the model's native 1024
    assert (meta["modelspec.title"], meta["modelspec.author"], meta["modelspec.description"]) == \
        ("Tiny NoobAI", "someone", "a test model")
    import datetime
    datetime.datetime.fromisoformat(meta["modelspec.date"])
    # the hash covers the tensors as written, in export order (the sgm layout, then the markers)
    with safe_open(str(path), "pt") as f:
        written = {k: f.get_tensor(k) for k in [*base_state_dict(), "v_pred", "ztsnr"]}
        assert len(written) == len(list(f.keys()))
    assert meta["modelspec.hash_sha256"] == kohya_modelspec_hash(written)


def test_training_metadata_uses_kohya_names_and_no_paths(vpred_run):
    _, meta = file_keys(vpred_run / "run" / "models" / "demo.safetensors")
    assert meta["ss_steps"] == "2" and meta["ss_max_train_steps"] == "2" and meta["ss_batch_size_per_device"] == "2"
    assert meta["ss_num_train_images"] == "4" and meta["ss_num_reg_images"] == "0"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_training_type"] == "full-finetune"
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_learning_rate"] == "0.001"
    assert meta["ss_sd_model_name"] == "noob_tiny.safetensors"
    from core.hashes import sha256_file
    assert meta["ss_new_sd_model_hash"] == sha256_file(vpred_run / "noob_tiny.safetensors")
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sum(b["count"] for b in buckets.values()) == 4 and all(len(b["resolution"]) == 2 for b in buckets.values())
    assert json.loads(meta["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 4}}
    cfg = json.loads(meta["sdtrain.config"])
    assert cfg["model"]["pretrained_model_name_or_path"] == "noob_tiny.safetensors"
    root = str(vpred_run)
    leaks = [k for k, v in meta.items() if root in v or os.path.expanduser("~") + os.sep in v]
    assert not leaks, leaks


def test_metadata_paths_true_keeps_paths(tmp_path):
    from core.config import load_config
    from training.run_metadata import config_for_metadata
    cfg = load_config("configs/demo.toml", [f"data.image_dirs=['{tmp_path}/imgs']", "data.caption_processor=/x/y/h.py:f"])
    assert config_for_metadata(cfg, True)["data"]["image_dirs"] == [f"{tmp_path}/imgs"]
    stripped = config_for_metadata(cfg, False)
    assert stripped["data"]["image_dirs"] == ["imgs"] and stripped["data"]["caption_processor"] == "h.py:f"


# ---------------------------------------------------------------------------------------------------------------------
# A1111 PNG infotext


RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # modules/infotext_utils.py
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse_generation_parameters(x: str) -> dict:
    """Port of A1111's infotext_utils.parse_generation_parameters (the parsing part, without UI defaults)."""
    def unquote(text):
        if len(text) == 0 or text[0] != '"' or text[-1] != '"':
            return text
        try:
            return json.loads(text)
        except Exception:
            return text

    res, prompt, negative_prompt, done_with_prompt = {}, "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in RE_PARAM.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def png_parameters(path) -> str:
    from PIL import Image
    with Image.open(path) as im:
        return im.info["parameters"]


def test_previews_and_grids_parse_in_a1111(vpred_run):
    from core.hashes import short_hash
    samples = vpred_run / "run" / "samples"
    step1 = sorted(p for p in samples.iterdir() if p.name.startswith("000001_"))
    assert [p.name for p in step1] == ["000001_0_7.png", "000001_1_8.png", "000001_grid.png"]
    expected_hash = short_hash(vpred_run / "run" / "models" / "demo-step00000001.safetensors")
    assert len(expected_hash) == 10 and int(expected_hash, 16) >= 0
    for p, prompt, seed in zip(step1, ("a red circle", "a blue square", "a red circle"), ("7", "8", "7")):
        r = a1111_parse_generation_parameters(png_parameters(p))
        assert r["Prompt"] == prompt and r["Seed"] == seed and r["Steps"] == "2", r
        assert (r["Size-1"], r["Size-2"]) == ("64", "64") and r["Model"] == "demo"
        assert r["Model hash"] == expected_hash, r  # the export holding exactly these weights
    step2 = [p for p in samples.iterdir() if p.name.startswith("000002_")]
    assert step2 and all("Model hash" not in a1111_parse_generation_parameters(png_parameters(p)) or
                         a1111_parse_generation_parameters(png_parameters(p))["Model hash"] ==
                         short_hash(vpred_run / "run" / "models" / "demo.safetensors") for p in step2)


def test_generate_png_carries_the_model_hash(vpred_run, tmp_path):
    import generate
    from core.hashes import short_hash
    model = vpred_run / "run" / "models" / "demo.safetensors"
    assert generate.main(["--model", str(model), "--prompt", 'a "quoted", tricky: prompt', "--negative", "blurry",
                          "--steps", "2", "--w", "64", "--h", "64", "--seed", "5", "--out", str(tmp_path), "--sigmas", "karras",
                          "--device", "cpu", "--precision", "fp32"]) == 0
    (png,) = list(tmp_path.glob("*.png"))
    r = a1111_parse_generation_parameters(png_parameters(png))
    assert r["Prompt"] == 'a "quoted", tricky: prompt' and r["Negative prompt"] == "blurry"
    assert r["Model hash"] == short_hash(model) == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert r["Seed"] == "5" and r["Model"] == "demo" and r["Steps"] == "2" and r["Schedule type"] == "Karras"


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_has_every_groups_lr_and_the_previews(vpred_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(vpred_run / "run" / "logs" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    lrs = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith("lr/")}
    assert len(lrs) == 2 and sorted(round(v[0], 8) for v in lrs.values()) == [1e-4, 1e-3], lrs
    images = acc.Tags()["images"]
    assert {"samples/0", "samples/1", "samples/grid"} <= set(images), images
    assert [e.step for e in acc.Images("samples/0")] == [1, 2]
    first = acc.Images("samples/0")[0]
    assert (first.width, first.height) == (64, 64)


def test_tensorboard_missing_is_a_start_up_error(tmp_path, monkeypatch, capsys):
    import sys
    import train
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(SystemExit) as e:
        train.main(["configs/demo.toml", f"output_dir={tmp_path / 'run'}", "log.tensorboard=true"])
    text = str(e.value.code)
    assert "config error" in text and "pip install tensorboard" in text
    assert not (tmp_path / "run").exists()
