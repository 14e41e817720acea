"""generate.py on a saved tiny checkpoint writes PNGs carrying the A1111 "parameters" chunk (its main() run in this
process: the command line without an interpreter start)."""
import os

import pytest
import torch
from PIL import Image

import models


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_generate_cli_writes_pngs_with_parameters(tmp_path, capsys, family):
    ckpt = str(tmp_path / f"{family}.safetensors")
    models.save(models.build(family, "tiny", seed=1), ckpt, precision="fp32")
    prompts = tmp_path / "p.txt"
    prompts.write_text("# two prompts\na red circle --n blurry --d 7 --s 3 --w 64 --h 96\na blue square --s 2 --ss euler_a\n")
    out = tmp_path / "out"
    import generate
    torch.set_flush_denormal(True)  # as generate.py's __main__ does (its main() runs in this process)
    try:
        assert generate.main(["--model", ckpt, "--prompt_file", str(prompts), "--n", "2", "--out", str(out),
                              "--device", "cpu", "--seed", "3"]) == 0
    finally:
        torch.set_flush_denormal(False)
    files = sorted(os.listdir(out))
    assert files == ["00000_7.png", "00001_8.png", "00002_3.png", "00003_4.png"]
    with Image.open(out / "00000_7.png") as im:
        assert im.size == (64, 96)
        params = im.text["parameters"]
    assert params.startswith("a red circle\nNegative prompt: blurry\nSteps: 3")
    assert "Seed: 7" in params and "Size: 64x96" in params and f"Model: {family}" in params
    with Image.open(out / "00002_3.png") as im:
        assert "Sampler: Euler a" in im.text["parameters"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        generate.main(["--model", ckpt, "--out", str(out)])
    assert e.value.code not in (0, None) and "--prompt" in capsys.readouterr().err
