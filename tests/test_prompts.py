"""Prompt files, A1111 parameters text and PNG saving of diffusion/prompts.py (analytic expectations, PIL as reader)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from diffusion.prompts import SamplePrompt, a1111_parameters, load_prompts, save_png


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_txt_every_option(tmp_path):
    """Every kohya inline option; comments and blank lines skipped; defaults fill the rest; index counts prompts."""
    path = _write(tmp_path, "p.txt", "# a comment\n\n"
                  "a cat, best quality --n lowres, bad hands --w 832 --h 1216 --d 42 --l 5.5 --s 30 --ss euler_a --rescale 0.7\n"
                  "   \n"
                  "  a dog  \n")
    p1, p2 = load_prompts(path, defaults={"steps": 20, "sampler": "dpm++2m", "negative_prompt": "blurry"})
    assert p1 == SamplePrompt("a cat, best quality", "lowres, bad hands", 832, 1216, 42, 5.5, 30, "euler_ancestral", 0.7, 0)
    assert p2 == SamplePrompt("a dog", "blurry", 1024, 1024, None, 7.0, 20, "dpmpp_2m", 0.0, 1)


@pytest.mark.parametrize("line,message", [
    ("a cat --w abc", "p.txt:3: --w: 'width' must be an integer, got 'abc'"),
    ("a cat --x 3", "p.txt:3: unknown option --x"),
    ("a cat --w", "p.txt:3: option --w needs a value"),
    ("a cat --s 0", "p.txt:3: --s: 'steps' must be positive"),
    ("a cat --l 1e999", "p.txt:3: --l: 'scale' must be a finite number"),
    ("a cat --ss plms", "p.txt:3: --ss: unknown sampler 'plms'"),
    ("a cat --d 1 --d 2", "p.txt:3: option --d given twice"),
    ("a cat --d -1", "p.txt:3: --d: 'seed' must be >= 0"),
    ("a cat --w 4", "p.txt:3: width 4 is smaller than the minimum 8"),
])
def test_txt_malformed_names_line(tmp_path, line, message):
    """Malformed lines raise ValueError naming the file and line number and the problem."""
    path = _write(tmp_path, "p.txt", "# header\nfine prompt\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        load_prompts(path)
    assert message in str(e.value)


def test_rounding_to_multiple(tmp_path, caplog):
    """Width / height round down to the multiple with a logged note."""
    path = _write(tmp_path, "p.txt", "x --w 1000 --h 1030\n")
    with caplog.at_level(logging.WARNING):
        (p,) = load_prompts(path, multiple=16)
    assert (p.width, p.height) == (992, 1024)
    assert "width 1000 rounded down to 992" in caplog.text


def test_toml_list_with_defaults(tmp_path):
    """`prompts = [...]` tables with aliases (cfg_scale, sample_steps); defaults fill missing fields."""
    path = _write(tmp_path, "p.toml", """
prompts = [
  { prompt = "a cat", cfg_scale = 4.5, sample_steps = 40, seed = 7 },
  { prompt = "a dog", negative_prompt = "ugly", width = 768, height = 512, sampler = "heun", scale = 3 },
]
""")
    p1, p2 = load_prompts(path, defaults={"width": 512, "scale": 6.0})
    assert p1 == SamplePrompt("a cat", "", 512, 1024, 7, 4.5, 40, "euler", 0.0, 0)
    assert p2 == SamplePrompt("a dog", "ugly", 768, 512, None, 3.0, 28, "heun", 0.0, 1)


def test_toml_kohya_layout(tmp_path):
    """kohya's [prompt] shared values + [[prompt.subset]] entries (sample_sampler alias)."""
    path = _write(tmp_path, "p.toml", """
[prompt]
width = 640
sample_steps = 12
[[prompt.subset]]
prompt = "one"
[[prompt.subset]]
prompt = "two"
sample_sampler = "k_euler"
width = 896
""")
    p1, p2 = load_prompts(path)
    assert (p1.prompt, p1.width, p1.steps, p1.sampler) == ("one", 640, 12, "euler")
    assert (p2.prompt, p2.width, p2.steps, p2.sampler) == ("two", 896, 12, "euler")


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: {"prompts": x}])
def test_json_list(tmp_path, wrap):
    """A top-level json list or {"prompts": [...]}."""
    data = [{"prompt": "a", "steps": 5, "seed": 3}, {"prompt": "b", "height": 768}]
    path = _write(tmp_path, "p.json", json.dumps(wrap(data)))
    p1, p2 = load_prompts(path, defaults={"seed": 11})
    assert (p1.prompt, p1.steps, p1.seed) == ("a", 5, 3)
    assert (p2.prompt, p2.height, p2.seed) == ("b", 768, 11)


@pytest.mark.parametrize("name,text,message", [
    ("p.json", '[{"prompt": "a", "colour": 1}]', "prompt 1: unknown key 'colour'"),
    ("p.json", '[{"negative_prompt": "a"}]', "prompt 1: missing 'prompt'"),
    ("p.json", '[{"prompt": "a", "width": "big"}]', "'width' must be an integer"),
    ("p.json", '[{"prompt": "a", "width": true}]', "'width' must be an integer"),
    ("p.json", '{"foo": []}', "expected a list of prompt tables"),
    ("p.json", '[{"prompt": "a"', "not valid json"),
    ("p.toml", 'prompts = [{ prompt = "a", scale = 2, cfg_scale = 3 }]', "'scale' given twice"),
    ("p.yaml", "x", "unsupported prompt file type"),
])
def test_structured_errors(tmp_path, name, text, message):
    """Unknown keys, wrong types and bad layouts raise ValueError naming the file and entry."""
    path = _write(tmp_path, name, text)
    with pytest.raises(ValueError) as e:
        load_prompts(path)
    assert message in str(e.value) and name in str(e.value)


def test_bad_defaults(tmp_path):
    path = _write(tmp_path, "p.txt", "a\n")
    with pytest.raises(ValueError, match="sample defaults: unknown key 'stepz'"):
        load_prompts(path, defaults={"stepz": 3})


def test_a1111_parameters():
    """Exact A1111 layout: prompt line, negative line, comma list with quoted values where needed."""
    p = SamplePrompt("a cat", "lowres", 832, 1216, seed=1, scale=7.0, steps=28, sampler="euler_ancestral")
    assert a1111_parameters(p, "sdxl_base") == (
        "a cat\nNegative prompt: lowres\n"
        "Steps: 28, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 832x1216, Model: sdxl_base"
    )
    q = SamplePrompt("a dog", scale=4.5, rescale=0.7, sampler="dpmpp_2m")
    assert a1111_parameters(q, extra={"Lora": "a, b"}) == (
        'a dog\nSteps: 28, Sampler: DPM++ 2M, CFG scale: 4.5, Size: 1024x1024, CFG Rescale phi: 0.7, Lora: "a, b"'
    )


@pytest.mark.parametrize("text", ["a cat\nSteps: 28, Seed: 1", "ねこ, 猫\nSteps: 28"])
def test_save_png_round_trip(tmp_path, text):
    """PIL reads the "parameters" chunk back (latin-1 as tEXt, other text as iTXt); no temp file is left over."""
    from PIL import Image

    path = str(tmp_path / "out.png")
    save_png(Image.new("RGB", (16, 8), (200, 10, 10)), path, text)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (16, 8)
        assert im.text["parameters"] == text
        assert im.getpixel((3, 3)) == (200, 10, 10)
    assert os.listdir(tmp_path) == ["out.png"]
