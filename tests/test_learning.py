"""Does the trainer learn? Two visually distinct classes named in the captions, cached with cache.py, trained
with train.py on the tiny SDXL preset; the loss must fall and sampling with each caption must land nearer that
class's mean latent than the other's.

Reference: analytic. The class mean latents come from the latent store written by cache.py (an independent
encode of the images), and the sampler is the product's Euler sampler run on the exported checkpoint reloaded with
`models.load`. No conversion is involved.

Why the VAE is rescaled: the tiny preset's *random* VAE gives latents whose std depends on the images (SDXL's
0.13025 is calibrated for the trained SDXL VAE; the tiny preset has its own factor, calibrated on the demo shapes).
With latents far from unit std an epsilon model's x0 estimate (x - sigma * eps) is swamped by eps errors at high
sigma, so nothing class-specific survives sampling. The model is trained with v-prediction: its x0 estimate (sqrt(a) x - sqrt(1 - a) v) stays bounded at high
noise, so a few hundred CPU steps are enough to see the classes (epsilon needs far more). The test also multiplies the mean rows of the random VAE's quant_conv so scaled latents have unit
std, as real SDXL latents do, and gives it as [model] vae (a separate VAE file).
"""
import json
import os
import random
import sys

import pytest
import torch
from helpers import run_ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
CLASSES = {"a red circle": ((220, 30, 30), "ellipse"), "a blue square": ((30, 60, 220), "rectangle")}
PER_CLASS = 12
SIZE = 64
STEPS = 300


def _make_dataset(root):
    """12 red circles and 12 blue squares (64x64, white background, random position and radius) + captions."""
    from PIL import Image, ImageDraw
    os.makedirs(root, exist_ok=True)
    rng = random.Random(0)
    keys = {c: [] for c in CLASSES}
    for i in range(PER_CLASS * len(CLASSES)):
        caption = list(CLASSES)[i % len(CLASSES)]
        colour, shape = CLASSES[caption]
        im = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
        r = rng.randint(SIZE // 4, SIZE * 11 // 32)
        cx, cy = rng.randint(r, SIZE - r), rng.randint(r, SIZE - r)
        getattr(ImageDraw.Draw(im), shape)((cx - r, cy - r, cx + r, cy + r), fill=colour)
        stem = f"{i:03d}"
        im.save(os.path.join(root, stem + ".png"))
        with open(os.path.join(root, stem + ".txt"), "w") as f:
            f.write(caption)
        keys[caption].append(stem)
    return keys


def _unit_scale_vae(path, data_dir):
    """The tiny preset's random VAE (seed 0), its latent mean rescaled to unit std on these images, saved alone."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    import models
    vae = models.build("sdxl", "tiny", parts=["vae"], seed=0).vae
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(data_dir, f))).copy()).permute(2, 0, 1)
                     for f in sorted(os.listdir(data_dir)) if f.endswith(".png")]).float() / 127.5 - 1
    with torch.no_grad():
        std = vae.to_latents(vae.encode(x)[0]).std().item()
        z = vae.cfg.z_channels  # quant_conv's first z output channels are the posterior mean
        vae.quant_conv.weight[:z] /= std
        vae.quant_conv.bias[:z] /= std
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path)


def _run(cmd):
    return run_ok(cmd, env=ENV)


@pytest.mark.slow
def test_two_classes_are_learned(tmp_path):
    keys = _make_dataset(str(tmp_path / "data"))
    _unit_scale_vae(str(tmp_path / "vae.safetensors"), str(tmp_path / "data"))
    out = tmp_path / "run"
    common = ["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'data'}']", f"cache.cache_dir={tmp_path / 'cache'}",
              f"model.vae={tmp_path / 'vae.safetensors'}", f"data.resolution={SIZE}", "data.max_bucket_reso=128",
              "seed=0"]
    _run([sys.executable, "cache.py", *common])
    _run([sys.executable, "train.py", *common, f"output_dir={out}", f"train.max_train_steps={STEPS}",
          "model.v_parameterization=true", "data.batch_size=8", "optimizer.learning_rate=2e-3",
          "optimizer.lr_scheduler=constant",
          "optimizer.lr_warmup_steps=0", "optimizer.optimizer_kwargs={foreach=true}", "sample.sample_every_n_steps=0",
          "save.save_every_n_steps=0", "save.save_state=false"])

    # the loss falls clearly
    with open(out / "logs" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == STEPS
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)

    # class means from the store (what cache.py encoded)
    from data.store import LatentStore
    store = LatentStore(str(tmp_path / "cache"))
    means = {c: torch.stack([store.get(k)["latent"].float() for k in ks]).mean(0) for c, ks in keys.items()}
    gap = (means["a red circle"] - means["a blue square"]).norm().item()
    assert gap > 1.0, f"the classes are not distinct in latent space (mean distance {gap})"

    # sample each caption from the exported checkpoint: nearer its own class mean than the other
    import models
    from core.sampling import sample
    comp = models.load(str(out / "models" / "demo.safetensors"))  # v-prediction read from the file's modelspec
    assert comp.v_parameterization
    comp.network.eval()
    n = 4
    for caption in CLASSES:
        noise = torch.randn(n, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            text = comp.encode_text([caption] * n)
            size = torch.tensor([[SIZE, SIZE]] * n, dtype=torch.float32)
            crop = torch.zeros_like(size)
            cond = comp.conditioning(text, size, crop, size)
            uncond = comp.conditioning(comp.uncond_text(text), size, crop, size)
            x = sample(comp.sample_schedule(), comp.network, noise, steps=12, sampler="euler", cond=cond,
                       uncond=uncond, cfg_scale=4.0)
        dist = {c: (x.mean(0) - m).norm().item() for c, m in means.items()}
        other = next(c for c in CLASSES if c != caption)
        assert dist[caption] < dist[other], (caption, dist)
        # each sample, not only their mean, falls on the right side
        per = {c: (x - m).flatten(1).norm(dim=1) for c, m in means.items()}
        assert bool((per[caption] < per[other]).all()), (caption, per)
