"""SD3 exports hold the parts the way they came (#25.15): text encoders given as their own files (model.clip_l /
clip_g / t5xxl, ComfyUI's clip_l.safetensors / clip_g.safetensors / t5xxl_fp16.safetensors layout) stay out of
each exported file unless save.save_clip / save.save_t5xxl (kohya's --save_clip / --save_t5xxl) ask for them;
trained ones are written beside the export under kohya's names (sd3_train_utils.save_models: <name>_clip_l /
_clip_g / _t5xxl.safetensors). Tiny SD3 preset, 2 images encoded on the fly, one step, in process."""
import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from core.config import load_config
from helpers import main_ok
from training.exports import export_layout, prune_exports

DEMO = "configs/demo.toml"
TE_PREFIX = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
             "t5xxl": "text_encoders.t5xxl.transformer."}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A tiny SD3 checkpoint as the official SD3.5 files come: MMDiT + VAE in one file, each text encoder in its
    own (keys without the single file's prefix); and images."""
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("export_parts")
    make_demo_dataset(str(root / "imgs"), n=2, size=(64, 64))
    sd = {k: v.to(torch.float16) if v.is_floating_point() else v
          for k, v in models.build("sd3", "tiny").export_state_dict().items()}
    save_file({k: v.clone() for k, v in sd.items() if not k.startswith("text_encoders.")},
              str(root / "sd3_base.safetensors"))
    for name, prefix in TE_PREFIX.items():
        save_file({k[len(prefix):]: v.clone() for k, v in sd.items() if k.startswith(prefix)},
                  str(root / f"{name}.safetensors"))
    return root


def _argv(d, out, *extra):
    return [DEMO, f"data.image_dirs=['{d / 'imgs'}']", "cache.cache_dir=", f"output_dir={out}",
            "data.resolution=64", "data.max_bucket_reso=128", "data.batch_size=1", "train.max_train_steps=1",
            "optimizer.lr_warmup_steps=0", "sample.sample_every_n_steps=0", "save.save_every_n_steps=0",
            "save.save_state=false", "save.save_precision=fp16", "model.model_family=auto",
            f"model.pretrained_model_name_or_path={d / 'sd3_base.safetensors'}",
            *(f"model.{n}={d / f'{n}.safetensors'}" for n in TE_PREFIX), *extra]


def test_separate_text_encoders_stay_separate_trained_ones_beside(split, tmp_path):
    """Was: every SD3 export held fp16 T5-XXL and both CLIPs (SD3.5-large: 27.9 GB, the official file ~16 GB)."""
    out = tmp_path / "run"
    main_ok("train", _argv(split, out, "train.train_text_encoder=true"))
    names = sorted(os.listdir(out / "models"))
    assert names == ["demo.safetensors", "demo_clip_g.safetensors", "demo_clip_l.safetensors"], names
    export = load_file(str(out / "models" / "demo.safetensors"))
    assert export and all(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in export)
    for name in ("clip_l", "clip_g"):  # trained: written beside, in the layout they came in, changed by the step
        given, written = load_file(str(split / f"{name}.safetensors")), load_file(str(out / "models" / f"demo_{name}.safetensors"))
        assert written.keys() == given.keys()
        assert any(not torch.equal(written[k], given[k]) for k in given), f"{name} did not train"
    # the export loads with the files beside it and the user's own T5-XXL, as the official files do
    comp = models.load(str(out / "models" / "demo.safetensors"), clip_l=str(out / "models" / "demo_clip_l.safetensors"),
                       clip_g=str(out / "models" / "demo_clip_g.safetensors"), t5xxl=str(split / "t5xxl.safetensors"))
    assert comp.clip_l is not None and comp.t5 is not None


def test_save_clip_and_save_t5xxl_put_them_inside(split, tmp_path):
    out = tmp_path / "run"
    main_ok("train", _argv(split, out, "save.save_clip=true", "save.save_t5xxl=true"))
    assert sorted(os.listdir(out / "models")) == ["demo.safetensors"]
    export = load_file(str(out / "models" / "demo.safetensors"))
    for name, prefix in TE_PREFIX.items():  # frozen: the given weights, under the single file's prefix
        given = load_file(str(split / f"{name}.safetensors"))
        assert all(torch.equal(export[prefix + k], v) for k, v in given.items()), name


def test_export_layout_rules(split, tmp_path):
    """As loaded by default; the options win; SDXL and diffusers folders always hold every part."""
    def layout(*over):
        cfg = load_config(DEMO, ["model.model_family=sd3", *over])
        return export_layout(cfg, models.family(models.family_of(cfg.model)))

    every = ["mmdit", "vae", "clip_l", "clip_g", "t5"]
    whole = tmp_path / "whole.safetensors"
    models.save(models.build("sd3", "tiny"), str(whole))
    assert layout() == (every, [])  # a preset: built whole
    assert layout(f"model.pretrained_model_name_or_path={whole}") == (every, [])  # came inside
    assert layout(f"model.pretrained_model_name_or_path={whole}", "model.t5xxl=t5.safetensors") == (
        ["mmdit", "vae", "clip_l", "clip_g"], [])
    base = f"model.pretrained_model_name_or_path={split / 'sd3_base.safetensors'}"
    assert layout(base) == (["mmdit", "vae"], [])  # never given (cached text trains without them): not exported
    assert layout("save.save_t5xxl=false") == (["mmdit", "vae", "clip_l", "clip_g"], [])
    assert layout("save.save_clip=false", "train.train_text_encoder=true") == (["mmdit", "vae", "t5"],
                                                                                ["clip_l", "clip_g"])
    assert layout("model.use_t5=false") == (["mmdit", "vae", "clip_l", "clip_g"], [])
    assert layout("save.save_clip=false", "save.save_model_as=diffusers") == (every, [])
    sdxl = load_config(DEMO, ["save.save_clip=false"])
    assert export_layout(sdxl, models.family("sdxl")) == (["unet", "vae", "te1", "te2"], [])


def test_pruning_takes_the_files_beside_an_export_along(tmp_path):
    for step in (1, 2, 3):
        for suffix in ("", "_clip_l", "_clip_g"):
            (tmp_path / f"demo-step{step:08d}{suffix}.safetensors").write_bytes(b"x")
            os.utime(tmp_path / f"demo-step{step:08d}{suffix}.safetensors", (step, step))
    prune_exports(str(tmp_path), "demo", 2)
    assert sorted(os.listdir(tmp_path)) == sorted(f"demo-step{s:08d}{x}.safetensors" for s in (2, 3)
                                                  for x in ("", "_clip_l", "_clip_g"))
