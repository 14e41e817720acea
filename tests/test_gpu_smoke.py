"""scripts/gpu_smoke.py in its CI form: --device cpu --quick (in process), so the GPU smoke run cannot rot.

The quick subset runs cache.py, train.py in fp16 with the GradScaler (SIGTERM mid-run, then resume = "auto" to the
end, previews at the last step), reloads the export and runs generate.py; the CUDA-only steps must say SKIP.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_smoke  # noqa: E402


def test_quick_cpu_smoke_passes_and_skips_the_cuda_steps(tmp_path, capsys):
    code = gpu_smoke.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for step in ("cache-sdxl", "sigterm-resume", "exports", "generate"):
        assert f"\nPASS {step} " in out, out
    for step in ("init-parity", "cpu-vs-cuda"):
        assert f"\nSKIP {step} " in out and "CUDA only" in out, out
    assert "stopped at step" in out and "scaler scale" in out


def test_a_failing_step_fails_the_run(tmp_path, capsys):
    code = gpu_smoke.main(["--device", "cpu", "--only", "exports", "--out", str(tmp_path)])  # nothing trained
    out = capsys.readouterr().out
    assert code == 1 and "FAIL exports" in out and "no exports found" in out and "1 failed" in out
    assert gpu_smoke.main(["--device", "cpu", "--only", "no-such-step", "--out", str(tmp_path)]) == 2


def test_exports_reads_a_sharded_state(tmp_path):
    """The exports step's weights of an FSDP run: a sharded state has no trained.safetensors, only dcp/ (as
    training/resume.write_sharded saves it: {"model", "optimizer", ...}); they are gathered as tests/test_fsdp.py
    gathers them, and a full state's trained.safetensors is read as it is."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    model = {"network.a.weight": torch.randn(3, 4), "network.b": torch.arange(5.0)}
    sharded = tmp_path / "sharded"
    dcp.save({"model": model, "optimizer": {"state": {}}}, storage_writer=dcp.FileSystemWriter(str(sharded / "dcp")),
             no_dist=True)
    got = gpu_smoke._trained_weights(str(sharded))
    assert got.keys() == model.keys() and all(torch.equal(got[k], model[k]) for k in model)
    full = tmp_path / "full"
    full.mkdir()
    save_file(model, str(full / "trained.safetensors"))
    assert all(torch.equal(gpu_smoke._trained_weights(str(full))[k], model[k]) for k in model)
    assert not list(tmp_path.glob("**/full.pt"))  # the gathered copy does not outlive the read
    (tmp_path / "empty").mkdir()
    with __import__("pytest").raises(gpu_smoke.StepFailed, match="neither"):
        gpu_smoke._trained_weights(str(tmp_path / "empty"))
