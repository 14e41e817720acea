"""What a run prints about itself (training/summary.py) and the labels of preview grids (diffusion/preview.py).

Reference: the inputs themselves - a dataset built here with known counts (two subsets, one of them regularisation
images with 2 repeats, one corrupt file), a run folder with known files, images with known pixels."""
import os

import numpy as np
import pytest
from PIL import Image


def _dataset(root):
    from data.demo import make_demo_dataset
    make_demo_dataset(str(root / "train"), n=3, size=(64, 64))
    make_demo_dataset(str(root / "reg"), n=2, size=(64, 128), seed=1)
    (root / "train" / "broken.png").write_bytes(b"not an image")
    (root / "train" / "broken.txt").write_text("broken")


def test_start_block_counts_data_model_batch_and_caches(tmp_path):
    import models
    from core.config import load_config
    from training.summary import start_block
    from training.trainable import Trainee
    from data.index import build_index
    from data.loader import usable_rows
    _dataset(tmp_path)
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.toml"), [
        "data.image_dirs=[]", f"data.subsets=[{{image_dirs=['{tmp_path / 'train'}']}}, "
        f"{{image_dirs=['{tmp_path / 'reg'}'], is_reg=true, num_repeats=2}}]", "data.batch_size=2",
        "train.gradient_accumulation_steps=3", f"cache.cache_dir={tmp_path / 'cache'}", "data.resolution=64"])
    index = build_index(cfg.data)
    rows = usable_rows(index)
    comp = models.build("sdxl", "tiny", parts=["unet"])
    trainee = Trainee(comp, False)
    import torch
    opt = torch.optim.AdamW([{"params": list(comp.unet.parameters()), "name": "network"}], lr=1e-3)
    text = start_block(cfg=cfg, world_size=4, device=torch.device("cpu"), index=index, rows=rows, comp=comp,
                       trained=trainee, optimizer=opt, steps_per_epoch=5, total_steps=12, start_step=0,
                       out_dir=str(tmp_path / "run"), amp_dtype=None, weight_dtype=torch.float32)
    n_unet = sum(p.numel() for p in comp.unet.parameters())
    lines = text.splitlines()
    data = next(line for line in lines if line.startswith("data"))
    assert "5 images trained (repeats 1-2: 7 samples per epoch; 2 regularisation), 1 skipped" in data, data
    assert data.endswith("1 bucket(s): 64x64 (5)")  # every image in the one bucket of resolution 64
    assert "= 24 images per optimizer step" in text and "2 per process x 3 accumulation x 4 process(es)" in text
    assert "5 per epoch, 12 in all (~2.4 epochs)" in text
    assert f"unet {n_unet / 1e6:.3g}M float32" in text and "trained text encoders: none" in text
    assert f"trainable {n_unet / 1e6:.3g}M" in text
    assert f"latents from {tmp_path / 'cache'}; text encoded every step" in text
    assert "autocast off, trained weights float32" in text
    assert "optimizer group network: " in text and "lr 0.001" in text


def test_end_block_names_what_exists(tmp_path):
    from core.config import make_run_dirs, run_dirs
    from training.summary import end_block
    make_run_dirs(str(tmp_path))
    paths = run_dirs(str(tmp_path))
    (tmp_path / "samples" / "000004_grid.png").write_bytes(b"")
    (tmp_path / "samples" / "000008_grid.png").write_bytes(b"")
    os.makedirs(tmp_path / "state" / "step-00000008")
    (tmp_path / "models" / "demo.safetensors").write_bytes(b"")
    text = end_block(steps=(2, 8, 8), started=(0.0, 0.0), images=48, paths=paths, model_name="demo")
    assert f"model      {tmp_path / 'models' / 'demo.safetensors'}" in text
    assert "last grid 000008_grid.png" in text and str(tmp_path / "state" / "step-00000008") in text
    assert "steps 2 -> 8 of 8, 48 images" in text and "images/s" in text
    os.remove(tmp_path / "models" / "demo.safetensors")
    assert "no final export" in end_block(steps=(0, 8, 8), started=(0.0, 0.0), images=0, paths=paths,
                                          model_name="demo")


def test_progress_without_terminal_logs_eta(monkeypatch):
    import sys
    from training.summary import Progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    lines = []
    bar = Progress(40, 0, enabled=True, log=lines.append)
    bar.show({"loss": 0.5, "loss_avg": 0.5, "loss_ema": 0.5, "lr": 1e-3, "images_per_s": 3.0})
    for _ in range(40):
        bar.update()
    assert len(lines) == 20 and lines[-1].startswith("step 40/40 (100%), ETA ") and "loss 0.5000" in lines[-1]
    quiet = []
    other_rank = Progress(40, 0, enabled=False, log=quiet.append)
    for _ in range(40):
        other_rank.update()
    assert quiet == []


@pytest.mark.parametrize("prompt, shown", [
    ("a red circle, simple background, red, circle", "a red circle"),
    ("an extraordinarily long prompt that cannot fit under a small tile", None),
])
def test_grid_tiles_carry_prompt_and_step(prompt, shown):
    from PIL import ImageDraw, ImageFont
    from diffusion.preview import labelled
    tile = Image.new("RGB", (96, 64), (30, 60, 220))
    out = labelled(tile.copy(), prompt, step=120)
    assert out.width == 96 and out.height > 64 + 8
    arr = np.asarray(out)
    strip = arr[64:]
    assert (strip.min(axis=2) < 100).any()  # dark text on the white strip
    assert (arr[:4, :4] == 0).all()  # the step's black box in the top-left corner
    assert (arr[40:64, 40:] == (30, 60, 220)).all()  # the tile itself untouched outside the corner
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(out)
    if shown is not None:  # the shortened prompt, drawn as that text would be
        ref = Image.new("RGB", out.size, "white")
        ImageDraw.Draw(ref).text((2, 64 + 2 - draw.textbbox((0, 0), "Ag", font=font)[1]), shown, fill="black",
                                 font=font)
        assert (np.asarray(ref)[64:] == strip).all()
    else:  # too long: cut to fit with '...'
        assert strip[:, -2:].min() == 255
