"""The trainer's compile (training/speed.compile_network) at tiny size on the CPU, through bench/compile_check.py:
no graph break, one compile per new bucket shape (the middle block included), none at a repeated shape or at a
bucket's tail batch (padded to the full batch, output cut back), and the compiled training steps equal the eager
ones. Dynamo's graph capture and AOTAutograd's forward / backward split are the same for every backend; the
"aot_eager" backend skips inductor's C++ code generation (minutes on this machine). Inductor itself on the CPU:
`python bench/compile_check.py` (its numbers in the closing notes of issue #24)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import compile_check  # noqa: E402


@pytest.mark.parametrize("family,preset", [("sdxl", "micro"), ("sd3", "tiny")])
def test_compile_no_breaks_one_compile_per_shape(family, preset):
    steps = [(2, 8, 8), (2, 8, 12), (2, 8, 8), (1, 8, 12)]  # new, new, repeat, tail
    rows = compile_check.check(family, preset, backend="aot_eager", steps=steps)
    assert compile_check.problems(rows) == []
    assert [r.graph_breaks for r in rows] == [0] * 4
    assert rows[0].new_graphs > 0 and rows[1].new_graphs > 0 and rows[2].new_graphs == rows[3].new_graphs == 0


def test_middle_block_is_a_region():
    import models
    from training import speed

    net = models.build("sdxl", "micro", parts=["unet"], device="meta").network
    regions = speed.compile_regions(net)
    assert net.middle_block in regions and len(regions) == len(net.input_blocks) + 1 + len(net.output_blocks)


def test_problems_flags_a_recompile_and_a_break():
    r = compile_check.Row
    rows = [r("sdxl", (2, 8, 8), 3, 0, 1.0, 0.5, 0.5), r("sdxl", (2, 8, 8), 1, 0, 1.0, 0.5, 0.5),
            r("sdxl", (1, 8, 8), 0, 2, 1.0, 0.5, 0.6)]
    got = compile_check.problems(rows)
    assert any("recompile" in p for p in got) and any("graph breaks" in p for p in got) and \
        any("!= eager" in p for p in got)
