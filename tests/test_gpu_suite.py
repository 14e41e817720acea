"""bench/gpu_suite.py at tiny size on the CPU (the CI run): the parity, train and VAE sections run, every row is ok,
the outputs are written, and the fp32 parity rows show ours == diffusers / transformers with the shared weights.
The memory section's parts (fused backward, Adafactor, stochastic rounding on the tiny UNet) are tests/test_steppers.py's;
here one row of it runs."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


def test_gpu_suite_tiny_cpu(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import gpu_suite

    assert gpu_suite.main(["--device", "cpu", "--preset", "tiny", "--out", str(tmp_path), "--batches", "1",
                           "--sections", "parity,train,vae"]) == 0
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    assert {r["section"] for r in rows} == {"parity", "train", "vae"}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    parity = [r for r in rows if r["section"] == "parity"]
    assert len(parity) == 4 and all(r["rel_err"] <= 1e-5 for r in parity)
    train = {r["name"] for r in rows if r["section"] == "train"}
    assert {"SDXL UNet ours b1 ckpt=on", "SDXL UNet diffusers b1 ckpt=on", "SD3 MMDiT diffusers b1 ckpt=off"} <= train
    assert all(r["img_s"] > 0 for r in rows if r["section"] in ("train", "vae"))
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| parity | rel_err | status |" in md and "SD3 MMDiT ours b1 ckpt=on" in md
    s = gpu_suite.Suite(gpu_suite.parse_args(["--device", "cpu", "--out", str(tmp_path / "m")]))
    gpu_suite.memory_rows(s, {**gpu_suite.TINY, "only": 1})
    assert [r["status"] for r in s.rows] == ["ok"] and s.rows[0]["estimate_gib"] > 0


def test_gpu_suite_row_guard(tmp_path):
    """An out-of-memory error is an OOM row, another error an error row, and rows past the budget are skipped."""
    import torch

    import gpu_suite

    s = gpu_suite.Suite(gpu_suite.parse_args(["--device", "cpu", "--out", str(tmp_path), "--budget-s", "1000"]))

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert s.run("train", "a", oom)["status"] == "OOM"
    assert s.run("train", "b", lambda: 1 / 0)["status"].startswith("error: ZeroDivisionError")
    s.args.budget_s = -1
    assert s.run("train", "c", lambda: {"img_s": 1.0})["status"] == "SKIP (budget)"
    assert [r["name"] for r in json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]] == ["a", "b", "c"]
