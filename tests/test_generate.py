"""generate.py on a saved tiny checkpoint writes PNGs carrying the A1111 "parameters" chunk."""
import os
import subprocess
import sys

import pytest
from PIL import Image

import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_generate_cli_writes_pngs_with_parameters(tmp_path, family):
    ckpt = str(tmp_path / f"{family}.safetensors")
    models.save(models.build(family, "tiny", seed=1), ckpt, precision="fp32")
    prompts = tmp_path / "p.txt"
    prompts.write_text("# two prompts\na red circle --n blurry --d 7 --s 3 --w 64 --h 96\na blue square --s 2 --ss euler_a\n")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "generate.py", "--model", ckpt, "--prompt_file", str(prompts), "--n", "2",
                        "--out", str(out), "--device", "cpu", "--seed", "3"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["00000_7.png", "00001_8.png", "00002_3.png", "00003_4.png"]
    with Image.open(out / "00000_7.png") as im:
        assert im.size == (64, 96)
        params = im.text["parameters"]
    assert params.startswith("a red circle\nNegative prompt: blurry\nSteps: 3")
    assert "Seed: 7" in params and "Size: 64x96" in params and f"Model: {family}" in params
    with Image.open(out / "00002_3.png") as im:
        assert "Sampler: Euler a" in im.text["parameters"]
    r = subprocess.run([sys.executable, "generate.py", "--model", ckpt, "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode != 0 and "--prompt" in r.stderr
