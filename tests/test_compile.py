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



def test_compiled_run_previews_and_validation_compile_no_graphs(tmp_path, monkeypatch):
    """train.py with train.compile (micro SDXL preset, two regions, aot_eager backend, in process): the previews and
    the validation pass of step 1 run inside training/speed.eager(), so they compile nothing, while the training
    steps did compile. The control, step 2's previews and validation with speed.eager replaced by a no-op, shows the
    count can fail: there the no-grad, eval-mode calls compile graphs of their own."""
    import contextlib

    from torch import _dynamo

    import train
    from data.demo import make_demo_dataset
    from helpers import main_ok
    from training import speed, validation

    graphs = [0]
    aot_eager = _dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):  # called once per graph dynamo compiles
        graphs[0] += 1
        return aot_eager(gm, example_inputs)

    compile_network, compile_regions = speed.compile_network, speed.compile_regions
    monkeypatch.setattr(speed, "compile_network", lambda *a, **k: compile_network(*a, **{**k, "backend": counting}))
    # two regions compiled, not all nine: set_stance covers every compiled region alike, and compiling costs seconds
    monkeypatch.setattr(speed, "compile_regions", lambda net: compile_regions(net)[:1] + [net.middle_block])
    during: dict[str, list[int]] = {"previews": [], "validation": []}
    eager = speed.eager

    def counted(what, run):
        def wrapper(self, step):
            before = graphs[0]
            speed.eager = eager if step == 1 else contextlib.nullcontext  # step 2: the control
            try:
                return run(self, step)
            finally:
                speed.eager = eager
                during[what].append(graphs[0] - before)
        return wrapper
    monkeypatch.setattr(train.Previews, "run", counted("previews", train.Previews.run))
    monkeypatch.setattr(validation.Validator, "run", counted("validation", validation.Validator.run))
    make_demo_dataset(str(tmp_path / "data"), n=8, size=(64, 64))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --d 5\n")
    common = ["configs/demo.toml", "model.model_preset=micro", f"data.image_dirs=['{tmp_path / 'data'}']",
              f"cache.cache_dir={tmp_path / 'cache'}", "data.resolution=64", "data.min_bucket_reso=64",
              "data.max_bucket_reso=64", "data.batch_size=2"]
    main_ok("cache", common)
    _dynamo.reset()
    try:
        main_ok("train", [*common, f"output_dir={tmp_path / 'run'}", "train.max_train_steps=2", "train.compile=true",
                          "optimizer.lr_warmup_steps=0", "save.save_every_n_steps=0", "save.save_state=false",
                          f"sample.sample_prompts={prompts}", "sample.sample_every_n_steps=1",
                          "sample.sample_params={width=64, height=64, steps=1}", "validation.validation_split=0.25",
                          "validation.validate_every_n_steps=1", "validation.timesteps_per_image=1"])
    finally:
        _dynamo.reset()
    assert graphs[0] > 0  # the training steps compiled
    assert os.path.isfile(tmp_path / "run" / "samples" / "000001_0_5.png")
    assert during["previews"][0] == 0 and during["validation"][0] == 0, during  # step 1: under speed.eager
    assert during["previews"][1] > 0 and during["validation"][1] > 0, during  # step 2: the control
