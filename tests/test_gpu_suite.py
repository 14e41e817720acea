"""bench/gpu_suite.py at tiny size on the CPU (the CI run, also the device rehearsal's): every section that runs on
a CPU gives ok rows, the outputs are written, and the fp32 parity rows show ours == diffusers / transformers with the
shared weights. The memory section's parts (fused backward, Adafactor, stochastic rounding on the tiny UNet) are
tests/test_steppers.py's; here one row of it runs."""

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
                           "--sections", "pair,vae,layout,compiled"]) == 0
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    assert {r["section"] for r in rows} == {"parity", "pair", "vae", "layout"}  # compiled: not on a CPU dry run
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    parity = [r for r in rows if r["section"] == "parity"] + [r for r in rows if r["section"] == "vae"]
    assert len(parity) == 5 and all(r["rel_err"] <= 1e-5 for r in parity)
    names = [r["name"] for r in rows]
    # the pairs first, ours then diffusers, one family after the other
    assert names[:5] == ["SDXL forward 64px fp32", "SDXL ours b1 ckpt=on", "SDXL ours b1 ckpt=off",
                         "SDXL diffusers b1 ckpt=on", "SDXL diffusers b1 ckpt=off"]
    assert "SD3 diffusers b1 ckpt=off" in names and "SDXL ours b1 ckpt=on channels_last=on" in names
    pair = [r for r in rows if r["section"] == "pair"]
    assert all(r["img_s"] > 0 and r["tflops"] > 0 for r in pair) and not any("mfu" in r for r in pair)  # no CPU peak
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| pair | img_s | step_ms | tflops | mfu | peak_gib | status |" in md and "SD3 ours b1 ckpt=on" in md
    s = gpu_suite.Suite(gpu_suite.parse_args(["--device", "cpu", "--out", str(tmp_path / "m")]))
    gpu_suite.memory_rows(s, {**gpu_suite.TINY, "only": 1})
    assert [r["status"] for r in s.rows] == ["ok"] and s.rows[0]["estimate_gib"] > 0


def test_gpu_suite_row_guard(tmp_path):
    """An out-of-memory error is an OOM row, another error an error row, and rows past the budget are skipped; the
    GPU estimate of a row counts against the budget."""
    import torch

    import gpu_suite

    s = gpu_suite.Suite(gpu_suite.parse_args(["--device", "cpu", "--out", str(tmp_path), "--budget-s", "1000"]))

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert s.run("pair", "a", oom)["status"] == "OOM"
    assert s.run("pair", "b", lambda: 1 / 0)["status"].startswith("error: ZeroDivisionError")
    s.args.budget_s = -1
    assert s.run("pair", "c", lambda: {"img_s": 1.0})["status"] == "SKIP (budget)"
    s.args.budget_s, s.cuda = 100, True  # as on a GPU: a 150 s row cannot start inside a 100 s budget
    assert s.run("compiled", "d", lambda: {"img_s": 1.0}, "compiled_sdxl")["status"] == "SKIP (budget)"
    assert [r["name"] for r in json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]] == ["a", "b", "c", "d"]


def test_suite_estimates_fit_the_timeout():
    """The rows the suite plans on an H100 (estimates per row) against scripts/gpu_all.sh's default budget: the
    pairs, VAE, memory, attention and layout rows fit with room for the compiled SD3 and SDXL rows of ours."""
    import gpu_suite

    e = gpu_suite.EST_S
    eager = 2 * (e["parity"] + 4 * e["train"]) + 2 * e["vae"] + e["parity"] + 3 * e["memory"] + 9 * e["attention"] \
        + 2 * e["layout"]  # two families x (parity + ours / diffusers x ckpt on / off), VAE x 2, CLIP, ...
    assert eager + e["compiled_sd3"] + e["compiled_sdxl"] <= gpu_suite.parse_args([]).budget_s
