"""The demo follows its prompts. A fixed colour classifier (data/demo.py classify_colour: mean hue of the shape region
vs the border colour) is first checked on the demo's own images (reference: their captions, which make_demo_dataset
also writes into the file names). Then the demo's run (bench/demo_prompts.py: configs/shapes_sd3.toml on the demo's
images, in one process with the demo's batch) is sampled by `python generate.py` with its defaults, on seeds and
prompts nothing else used: the previews use the demo captions with seeds 1-4, the tuning used run seeds 100-101 and
sample seeds 1000-1003, docs/demo.md's table run seeds 0-3 with sample seeds 0-15 (the demo captions,
`a red circle, simple background, red, circle`) and 500-515 (`a red circle`); this test trains with run seed 5 and
asks, in the words a user would type (`a red circle`), for every colour x shape pair with sample seeds 200-203."""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data.demo import COLOURS, SHAPES, caption_for, classify_colour, demo_images, make_demo_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SEED, FIRST_SAMPLE_SEED, SAMPLES = 5, 200, 4
PROMPT = "a {colour} {shape}"
MIN_SHARE = 7 / 8  # of the 12 pairs x SAMPLES samples (issue 23: >= 7 of 8)


def test_classifier_reads_the_demo_images(tmp_path):
    paths = make_demo_dataset(str(tmp_path), n=24)
    for p in paths:
        with Image.open(p) as im:
            assert classify_colour(im) == os.path.basename(p).split("_")[1], p
    assert classify_colour(Image.new("RGB", (64, 64), "white")) is None
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert classify_colour(Image.fromarray(noise)) is None


def test_balanced_demo_images_hold_every_pair_equally_often():
    counts = Counter((c, s) for _im, c, s in demo_images(48, (64, 64), seed=0, balanced=True))
    assert counts == Counter({(c, s): 4 for c in COLOURS for s in SHAPES})


def test_demo_text_encoders_are_the_trained_assets_and_tell_the_colours_apart():
    """configs/shapes_sd3.toml replaces the preset's random CLIP-L / CLIP-G by the asset files (models.from_config).
    In their pooled features (what SD3's adaLN sees) the colour part (the spread of the 4 colours' mean features) is
    larger than the part every caption shares; with the preset's random encoders it is a fraction of it (measured:
    9.0 vs 0.23), so the diffusion model gets a weak text signal (docs/demo.md)."""
    import models
    from core.config import load_config
    from safetensors.torch import load_file
    cfg = load_config(os.path.join(ROOT, "configs", "shapes_sd3.toml"))
    trained = models.from_config(cfg.model, parts=["clip_l", "clip_g", "t5"])
    for part in ("clip_l", "clip_g"):
        asset = load_file(os.path.join(ROOT, getattr(cfg.model, part)))
        for k, v in getattr(trained, part).state_dict().items():
            assert torch.equal(v.float(), asset[k].float()), (part, k)
    random_te = models.from_config(load_config(os.path.join(ROOT, "configs", "demo_sd3.toml")).model,
                                   parts=["clip_l", "clip_g", "t5"])
    pairs = [(c, s) for c in COLOURS for s in SHAPES]

    def colour_to_shared(comp) -> float:
        with torch.no_grad():
            pooled = comp.encode_text([caption_for(c, s) for c, s in pairs])["pooled"].float()
        shared = pooled.mean(0)
        colours = torch.stack([pooled[[i for i, (c, _s) in enumerate(pairs) if c == colour]].mean(0) for colour in COLOURS])
        return ((colours - shared).norm(dim=1).mean() / shared.norm()).item()

    assert colour_to_shared(trained) > 1
    assert colour_to_shared(random_te) < 1


def test_generate_defaults_to_the_runs_preview_size_and_cfg(tmp_path):
    """generate.py samples a file train.py wrote as its run's previews did (sdtrain.config [sample] sample_params),
    and a file without that record with its own defaults."""
    import generate
    import models
    from models.checkpoint import save_safetensors_atomic
    comp = models.build("sd3", "tiny", parts=["mmdit", "vae", "clip_l", "clip_g", "t5"])
    plain = str(tmp_path / "plain.safetensors")
    models.save(comp, plain, "fp32")
    assert generate.recorded_defaults(plain) == {}
    from safetensors import safe_open
    with safe_open(plain, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    run = str(tmp_path / "run.safetensors")
    sample = {"sample_params": {"width": 64, "height": 80, "scale": 1.5, "steps": 3}}
    save_safetensors_atomic(tensors, run, {**meta, "sdtrain.config": json.dumps({"sample": sample})})
    assert generate.recorded_defaults(run) == {"width": 64, "height": 80, "scale": 1.5}
    assert generate.main(["--model", run, "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "o")]) == 0
    with Image.open(tmp_path / "o" / "00000_0.png") as im:
        assert im.size == (64, 80)
        assert "CFG scale: 1.5" in im.info["parameters"], im.info["parameters"]


@pytest.mark.slow
def test_demo_draws_the_prompted_colour_on_unseen_seeds_and_prompts():
    """Issue 23's done-when for the demo, as a test: the demo's run (seed RUN_SEED), then generate.py with its
    defaults; >= 7/8 of the samples have the prompt's colour."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "demo_prompts.py"), "--seed", str(RUN_SEED),
                          "--n", str(SAMPLES), "--first-seed", str(FIRST_SAMPLE_SEED), "--template", PROMPT],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    found = re.findall(r"^demo_sd3\.safetensors: (\d+)/(\d+) match$", out.stdout, re.M)
    assert len(found) == 1, out.stdout[-3000:]
    matches, total = map(int, found[0])
    assert total == len(COLOURS) * len(SHAPES) * SAMPLES
    assert matches >= MIN_SHARE * total, out.stdout[-2000:]
