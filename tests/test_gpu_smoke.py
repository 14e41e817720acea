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
