"""What other tools read from our inputs and outputs: v-prediction markers (ComfyUI's rule), file modes.

One tiny in-process run (cache.py + train.py, 1 step, previews) from a NoobAI-style file (`v_pred` / `ztsnr`
empty top-level tensors) provides the outputs that several tests inspect.
"""
import os
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


def noobai_style_file(path, v_pred=True, ztsnr=True):
    """A tiny SDXL single file as the v-prediction anime fine-tunes ship: the sgm layout plus empty top-level
    `v_pred` / `ztsnr` tensors, no modelspec."""
    sd = models.build("sdxl", "tiny", seed=3).export_state_dict()
    if v_pred:
        sd["v_pred"] = torch.tensor([])
    if ztsnr:
        sd["ztsnr"] = torch.tensor([])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def vpred_run(tmp_path_factory):
    """cache.py + train.py in-process from a NoobAI-style file: 1 step, previews (2 prompts), export, state."""
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
        assert train.main([*common, f"output_dir={root / 'run'}", "train.max_train_steps=1",
                           "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "save.save_every_n_steps=0",
                           "data.batch_size=2", f"sample.sample_prompts={root / 'p.txt'}", "sample.sample_every_n_steps=1",
                           "sample.sample_params={width=64, height=64}"]) == 0
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
    sd = models.build("sdxl", "tiny").export_state_dict()
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
    from core.prompts import save_png
    from PIL import Image
    mask = os.umask(0o022)
    os.umask(mask)
    assert fsio.file_mode() == 0o666 & ~mask
    save_png(Image.new("RGB", (8, 8)), str(tmp_path / "a.png"), "x")
    from models.checkpoint import save_safetensors_atomic
    save_safetensors_atomic({"a": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    for name in ("a.png", "a.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == fsio.file_mode()
