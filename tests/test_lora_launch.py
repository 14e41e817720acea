"""The shipped configs/sdxl_lora.toml as users launch it: torchrun with 1 and 2 processes (DDP) and with FSDP, text-encoder
adapters on (the config's default), at tiny size. Issue #23 item 3: every such run crashed at step 2 with DDP's
"Expected to have finished reduction in the prior iteration", because SDXL conditions on CLIP-L's penultimate layer,
so the adapters of its last layer never get a gradient.

What must hold: the runs finish; the file has the layers kohya's network creates (kohya `networks/lora.py`
`LoRANetwork.create_modules`: every Linear child of every CLIPAttention / CLIPMLP of both text encoders, CLIP-L's
last layer included); the adapters whose output never reaches the loss leave the run exactly as they were created
(lora_up zeros: no effect, as in a kohya file), the others are trained.
"""
from __future__ import annotations

import concurrent.futures
import re

import pytest
import torch
from safetensors.torch import load_file

import models
from helpers import ENV, TORCHRUN, run_ok, run_workers

pytestmark = pytest.mark.slow


def _overrides(root, out):
    """Tiny size only: the tiny base model and data, 2 steps, small buckets and previews. Warm-up 1 step (the config's
    100 exceed 2 steps), no VAE file (the tiny base holds its VAE), latents encoded on the fly (no cache folder)."""
    return ["configs/sdxl_lora.toml", f"output_dir={out}", f"model.pretrained_model_name_or_path={root / 'base.safetensors'}",
            "model.vae=", f"data.subsets=[{{image_dirs=['{root / 'sks'}'], class_tokens='sks dog', num_repeats=1}}, "
            f"{{image_dirs=['{root / 'reg'}'], class_tokens='dog', is_reg=true, loss_weight=1.0}}]",
            "data.resolution=64", "data.bucket_reso_step=32", "data.min_bucket_reso=32", "data.max_bucket_reso=128",
            "cache.cache_dir=", "train.max_train_steps=2", "optimizer.lr_warmup_steps=1",
            "sample.sample_params={width=64, height=64, steps=2, scale=7.0}"]


def _kohya_text_names(comp) -> set[str]:
    """kohya's rule on the transformers CLIP models equal in shape to ours (kohya trains SDXL's bigG as an HF
    CLIPTextModelWithProjection): `lora_te{1,2}_` + the path of each Linear inside a CLIPAttention / CLIPSdpaAttention
    / CLIPMLP module, "." -> "_" (transformers 4 paths, under `text_model.`, as kohya's pinned version names them)."""
    transformers = pytest.importorskip("transformers")
    from test_text_encoders import _hf_config
    names = set()
    for i, te in ((1, comp.te1), (2, comp.te2)):
        hf = transformers.CLIPTextModel(_hf_config(te.cfg))
        top = "" if hasattr(hf, "text_model") else "text_model."  # transformers 5 dropped the level
        for path, m in hf.named_modules():
            if type(m).__name__ in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
                for child, c in m.named_modules():
                    if isinstance(c, torch.nn.Linear):
                        names.add(f"lora_te{i}_" + f"{top}{path}.{child}".replace(".", "_"))
    return names


def test_sdxl_lora_config_with_text_encoders_under_torchrun_ddp_and_fsdp(tmp_path):
    from data.demo import make_demo_dataset
    make_demo_dataset(str(tmp_path / "sks"), n=4, size=(64, 96), seed=0)
    make_demo_dataset(str(tmp_path / "reg"), n=4, size=(64, 96), seed=1)
    models.save(models.build("sdxl", "tiny", seed=0), str(tmp_path / "base.safetensors"), "fp32")
    one = [TORCHRUN[0], *TORCHRUN[1:-1], "--nproc_per_node=1"]
    runs = {"ddp1": lambda: run_ok([*one, "train.py", *_overrides(tmp_path, tmp_path / "ddp1")], ENV),
            "ddp2": lambda: run_ok([*TORCHRUN, "train.py", *_overrides(tmp_path, tmp_path / "ddp2")], ENV),
            # FSDP: AdamW, as bitsandbytes' 8-bit step has no rule for FSDP2's sharded (DTensor) parameters; the two
            # workers started as torchrun starts them (the launcher itself is tested above)
            "fsdp2": lambda: run_workers(["train.py", *_overrides(tmp_path, tmp_path / "fsdp2"), "train.fsdp=true",
                                          "optimizer.optimizer_type=AdamW"])}
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:  # at once: each is mostly start-up
        for f in [pool.submit(run) for run in runs.values()]:
            f.result()

    # the network as the runs created it (same seed, same config): the initial values of every adapter
    from training import trainable
    from core.config import load_config
    cfg = load_config("configs/sdxl_lora.toml", _overrides(tmp_path, tmp_path / "x")[1:])
    comp = models.load(str(tmp_path / "base.safetensors"))
    init = trainable.make_trainable(cfg, comp, torch.device("cpu"), print).network.kohya_state_dict()
    n_layers = comp.te1.cfg.num_layers
    dead = {n for n in _kohya_text_names(comp) if n.startswith(f"lora_te1_text_model_encoder_layers_{n_layers - 1}_")}
    assert len(dead) == 6  # q, k, v, out_proj, fc1, fc2

    for name in runs:
        f = load_file(str(tmp_path / name / "models" / "my-lora.safetensors"))
        layers = {k.split(".")[0] for k in f}
        assert {n for n in layers if n.startswith("lora_te")} == _kohya_text_names(comp), name
        assert layers == {k.split(".")[0] for k in init}, name
        for n in dead:  # as created: no effect on the model, nothing "trained"
            assert not f[f"{n}.lora_up.weight"].any(), (name, n)
            assert torch.equal(f[f"{n}.lora_down.weight"], init[f"{n}.lora_down.weight"].half()), (name, n)
        for n in layers - dead:  # every other adapter moved from its zero-initialised lora_up
            assert f[f"{n}.lora_up.weight"].any(), (name, n)
        log = (tmp_path / name / "logs" / "train.log").read_text()
        assert re.search(r"6 text-encoder adapters kept at their initial values", log), name
