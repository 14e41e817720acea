#!/usr/bin/env python
"""GPU smoke run: the code paths that only run on a GPU, end to end, on one GPU in a few minutes.

    python scripts/gpu_smoke.py [--out DIR] [--only step,step] [--quick] [--budget-s S]   # CUDA (when visible)
    python scripts/gpu_smoke.py --device cpu [--quick]                       # CPU: CUDA-only steps are SKIP

Tiny presets (random weights, real structure) and generated images, nothing downloaded. Every entry point runs as a
user runs it: `torchrun --standalone --nproc_per_node=1` (a process group of one: NCCL on a GPU, gloo on the CPU),
`python generate.py`. `--quick` runs a short subset in this process instead (entry points' main() called directly;
what the CI test runs). One line per step, `PASS` / `FAIL` / `SKIP`, then a summary; exit status 1 on any FAIL.

Steps: nccl (collectives of core/dist.py and cache.py's device-side sums on the real backend), init-parity (random
preset weights equal on CPU and GPU), cache-sdxl / cache-sd3 (VAE latents; SD3 also the text-encoder outputs),
train-{sdxl,sd3}-{bf16,fp16} (autocast, GradScaler, fused AdamW, pinned non-blocking copies, peak-memory metric,
previews at the last step), train-compile (train.compile = true), train-fsdp (train.fsdp = true), sigterm-resume
(SIGTERM to the worker mid-run, then train.resume = "auto" to the end; compared with the uninterrupted fp16 run),
exports (every exported file reloaded, network equal to the trained weights: a full state's trained.safetensors or a
sharded (FSDP) state's DCP folder), generate (generate.py on the
SDXL and SD3 exports), cpu-vs-cuda (the same fp32 run on the GPU and on the CPU: losses equal within
CPU_CUDA_RTOL).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# CPU vs CUDA, fp32 with TF32 off (NVIDIA_TF32_OVERRIDE=0), the noise drawn by the CPU generator
# (train.noise_device = "cpu"), deterministic algorithms, plain SGD: the two runs differ only in the order of
# floating-point reductions inside the kernels (GEMM blocking, convolution algorithms, SDPA): ~1e-6 relative per
# op, ~1e-5 through the tiny network; SGD keeps the weight differences linear in the gradient differences over the
# few steps. Measured on the CPU alone (1 vs 2 threads, same config, 8 steps): 1.8e-7. 1e-3 leaves room for cuDNN's
# fp32 convolution algorithms and is far below what a real device bug gives (other noise, weights or conditioning
# change the loss by several percent).
CPU_CUDA_RTOL = 1e-3
# The same run twice on one GPU (straight vs SIGTERM + resume), deterministic algorithms: bit-identical on the CPU
# (also tested in tests/test_train.py); on a GPU the fp16 kernels are deterministic too, so a looser bound only
# absorbs a kernel without a deterministic variant (torch warns about those, warn_only).
RESUME_RTOL = {"cpu": 0.0, "cuda": 1e-3}
STEP_TIMEOUT_S = 600


@dataclass
class Result:
    name: str
    status: str  # PASS / FAIL / SKIP
    detail: str = ""
    seconds: float = 0.0


class StepFailed(Exception):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise StepFailed(msg)


class Skip(Exception):
    pass


# -----------------------------------------------------------------------------
# Running the entry points: under torchrun (subprocess) or, with --quick, in this process


@dataclass
class Runner:
    device: str          # "cuda" or "cpu"
    out: str
    in_process: bool
    logs: dict[str, str] = field(default_factory=dict)

    def env(self, device: str | None = None) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if (device or self.device) == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the entry points pick CUDA whenever one is visible
            env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: thread start-up dominates
        return env

    def _log_path(self, tag: str) -> str:
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        return os.path.join(self.out, "logs", f"{tag}.log")

    def popen(self, script: str, args: list[str], tag: str, torchrun: bool = True, device: str | None = None,
              extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun \
            else [sys.executable]
        log = open(self._log_path(tag), "w")
        self.logs[tag] = log.name
        env = {**self.env(device), **(extra_env or {})}
        proc = subprocess.Popen(launcher + [script, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return proc

    def run(self, script: str, args: list[str], tag: str, torchrun: bool = True, device: str | None = None,
            extra_env: dict[str, str] | None = None, during: Callable[[Callable[[], None]], None] | None = None) -> int:
        """Run an entry point to its end; its exit status. `during(interrupt)` runs alongside it (a thread when
        in process) and may call interrupt() once to send SIGTERM to the training process."""
        if self.in_process and device in (None, self.device) and not extra_env:
            return self._run_here(script, args, tag, during)
        proc = self.popen(script, args, tag, torchrun, device, extra_env)
        if during is not None:
            during(lambda: _signal_workers(proc, torchrun))
        try:
            return proc.wait(timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise StepFailed(f"{script} ran over {STEP_TIMEOUT_S} s; log {self.logs[tag]}") from None

    def _run_here(self, script: str, args: list[str], tag: str,
                  during: Callable[[Callable[[], None]], None] | None) -> int:
        import importlib

        from core import dist
        mod = importlib.import_module(os.path.splitext(script)[0])
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        det = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        lock, running = threading.Lock(), [True]

        def interrupt() -> None:
            with lock:  # never after main() returned: the default SIGTERM action would end this process
                if running[0]:
                    os.kill(os.getpid(), signal.SIGTERM)

        watcher = threading.Thread(target=during, args=(interrupt,), daemon=True) if during else None
        self.logs[tag] = "(in process: see the run folder's logs/train.log)"
        try:
            dist.shutdown()
            dist.init(device=self.device)  # the entry points' own dist.init() then returns this
            if watcher is not None:
                watcher.start()
            try:
                code = mod.main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
                print(f"{script}: {e.code}", file=sys.stderr)
            return int(code or 0)
        finally:
            with lock:
                running[0] = False
            if watcher is not None:
                watcher.join(timeout=60)
            for s, h in handlers.items():
                signal.signal(s, h)
            torch.use_deterministic_algorithms(det[0], warn_only=det[1])
            dist.shutdown()

    def tail(self, tag: str, n: int = 3000) -> str:
        path = self.logs.get(tag, "")
        if not os.path.isfile(path):
            return ""
        with open(path, errors="replace") as f:
            return f.read()[-n:]


def _signal_workers(proc: subprocess.Popen, torchrun: bool) -> None:
    """SIGTERM to the training worker (torchrun's child, as SLURM signals every process of a job step)."""
    pids = [proc.pid]
    if torchrun:
        with contextlib.suppress(OSError):
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                pids = [int(p) for p in f.read().split()] or pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


# -----------------------------------------------------------------------------
# The smoke run


FAMILY_CONFIG = {"sdxl": "configs/demo.toml", "sd3": "configs/demo_sd3.toml"}


class Smoke:
    def __init__(self, runner: Runner, quick: bool):
        self.r, self.quick = runner, quick
        self.cuda = runner.device == "cuda"
        self.out = runner.out
        self.data = os.path.join(self.out, "data")
        self.steps = 16 if self.cuda else 4  # enough steps on a GPU for a SIGTERM to land mid-run
        self.runs: dict[str, str] = {}       # step name -> run folder
        self.prompts = os.path.join(self.out, "prompts.txt")

    # -- config pieces
    def common(self, family: str) -> list[str]:
        return [FAMILY_CONFIG[family], f"data.image_dirs=['{self.data}']",
                f"cache.cache_dir={os.path.join(self.out, 'cache_' + family)}",
                "data.resolution=64", "data.min_bucket_reso=64", "data.max_bucket_reso=64", "data.batch_size=2",
                "data.max_dataloader_n_workers=1" if self.cuda else "data.max_dataloader_n_workers=0"]

    def train_args(self, family: str, name: str, precision: str, *extra: str, previews: bool = False) -> list[str]:
        out = os.path.join(self.out, "runs", name)
        self.runs[name] = out
        args = self.common(family) + [
            f"output_dir={out}", f"train.max_train_steps={self.steps}", f"train.mixed_precision={precision}",
            "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "save.save_every_n_steps=0",
            "sample.sample_every_n_steps=0", "log.tensorboard=false", "train.deterministic=true"]
        if previews:
            args += [f"sample.sample_prompts={self.prompts}", f"sample.sample_every_n_steps={self.steps}",
                     "sample.sample_params={width=64, height=64, steps=2}"]
        return args + list(extra)

    # -- steps
    def setup(self) -> None:
        from data.demo import make_demo_dataset
        make_demo_dataset(self.data, n=8, size=(64, 80))
        with open(self.prompts, "w") as f:
            f.write("a red circle --d 3 --s 2 --w 64 --h 64\n")

    def nccl(self) -> str:
        if self.r.in_process:
            raise Skip("needs torchrun (not run with --quick)")
        probe = os.path.join(self.out, "dist_probe.py")
        with open(probe, "w") as f:
            f.write(DIST_PROBE)
        code = self.r.run(probe, [], "nccl")
        text = self.r.tail("nccl")
        check(code == 0 and "probe ok" in text, f"exit {code}:\n{text}")
        backend = "nccl" if self.cuda else "gloo"
        check(f"backend {backend}" in text, f"expected the {backend} backend:\n{text}")
        return text.strip().splitlines()[-1]

    def init_parity(self) -> str:
        if not self.cuda:
            raise Skip("CUDA only")
        import models
        n = 0
        for family in ("sdxl", "sd3"):
            a, b = models.build(family, "tiny", device="cpu", seed=7), models.build(family, "tiny", device="cuda", seed=7)
            sa, sb = a.export_state_dict(), b.export_state_dict()
            check(sa.keys() == sb.keys(), f"{family}: key sets differ")
            bad = [k for k in sa if not torch.equal(sa[k], sb[k].cpu())]
            check(not bad, f"{family}: {len(bad)} tensors differ between CPU and CUDA init, e.g. {bad[:3]}")
            n += len(sa)
        return f"{n} tensors identical"

    def cache(self, family: str) -> str:
        from data.store import LatentStore
        code = self.r.run("cache.py", self.common(family), f"cache-{family}")
        check(code == 0, f"cache.py exit {code}:\n{self.r.tail(f'cache-{family}')}")
        store = LatentStore(os.path.join(self.out, "cache_" + family))
        check(len(store) == 8, f"{len(store)} records, expected 8")
        key = store.keys()[0]
        names = store.record_info(key)["t"]
        lat = store.get(key).get("latent")
        check(lat is not None and bool(torch.isfinite(lat.float()).all()), "latent missing or not finite")
        if family == "sd3":
            check(any(n.startswith("te") for n in names), f"no cached text-encoder outputs in the record: {names}")
        return f"{len(store)} records; tensors {sorted(names)}"

    def train(self, family: str, precision: str, *extra: str, name: str | None = None, previews: bool = False) -> str:
        name = name or f"train-{family}-{precision}"
        code = self.r.run("train.py", self.train_args(family, name, precision, *extra, previews=previews), name)
        out = self.runs[name]
        check(code == 0, f"train.py exit {code}:\n{self.r.tail(name)}")
        return self.check_run(out, previews, fp16=precision == "fp16")

    def check_run(self, out: str, previews: bool, fp16: bool) -> str:
        rows = _metrics(out)
        check([r["step"] for r in rows] == list(range(1, self.steps + 1)), f"steps logged {[r['step'] for r in rows]}")
        check(all(math.isfinite(r["loss"]) for r in rows), f"non-finite losses {[r['loss'] for r in rows]}")
        log = _read(os.path.join(out, "logs", "train.log"))
        backend = "nccl" if self.cuda else "gloo"
        if not self.r.in_process:
            check(f"process group {backend}" in log, f"train.py did not run on a {backend} process group")
        if self.cuda:
            check(all(r.get("gpu_mem_gb", 0) > 0 for r in rows), "gpu_mem_gb missing from the metrics")
        check(os.path.isfile(os.path.join(out, "models", _export_name(out))), "no final export")
        detail = f"loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}"
        if previews:
            pngs = glob.glob(os.path.join(out, "samples", f"{self.steps:06d}_*.png"))
            check(len(pngs) >= 2, f"previews missing: {pngs}")  # the image and the grid
            detail += f", {len(pngs)} preview files"
        if self.cuda:
            detail += f", peak {max(r['gpu_mem_gb'] for r in rows):.2f} GiB"
        progress = _progress(out)
        if fp16:
            scale = (progress.get("scaler") or {}).get("scale")
            check(scale is not None and scale > 0, f"no GradScaler state in the resume state: {progress.get('scaler')}")
            detail += f", scaler scale {scale:g}"
        return detail

    def sigterm_resume(self) -> str:
        name = "sigterm-resume"
        args = self.train_args("sdxl", name, "fp16", previews=True)
        out = self.runs[name]

        def during(interrupt: Callable[[], None]) -> None:
            path = os.path.join(out, "logs", "metrics.jsonl")
            deadline = time.time() + STEP_TIMEOUT_S
            while time.time() < deadline:
                if os.path.isfile(path) and _read(path).count("\n") >= 1:
                    interrupt()
                    return
                time.sleep(0.005)

        code = self.r.run("train.py", args, name, during=during)
        check(code == 0, f"interrupted run exit {code}:\n{self.r.tail(name)}")
        stopped = max(r["step"] for r in _metrics(out))
        check(stopped < self.steps, f"the run finished (step {stopped}) before the signal arrived")
        check("stop requested" in _read(os.path.join(out, "logs", "train.log")), "no 'stop requested' in train.log")
        code = self.r.run("train.py", args + ["train.resume=auto"], name + "-2")
        check(code == 0, f"resumed run exit {code}:\n{self.r.tail(name + '-2')}")
        check("resumed from" in _read(os.path.join(out, "logs", "train.log")), "no 'resumed from' in train.log")
        detail = f"stopped at step {stopped}, resumed to {self.steps}; " + self.check_run(out, True, fp16=True)
        straight = self.runs.get("train-sdxl-fp16")
        if straight and os.path.isdir(straight):  # the same config, uninterrupted
            a, b = _losses(straight), _losses(out)
            rel = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a)
            tol = RESUME_RTOL[self.r.device]
            check(a.keys() == b.keys() and rel <= tol, f"losses differ from the straight run: max rel {rel:.3g} > {tol}")
            detail += f"; vs straight run max rel loss diff {rel:.2g} (tol {tol:g})"
        else:
            detail += "; no straight fp16 run to compare with (exact resume: tests/test_train.py)"
        return detail

    def exports(self) -> str:
        import models
        files = sorted(glob.glob(os.path.join(self.out, "runs", "*", "models", "*.safetensors")))
        check(bool(files), "no exports found")
        for path in files:
            comp = models.load(path)  # strict: every key and shape of the original layout
            bad = [k for k, v in comp.export_state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
            check(not bad, f"{path}: non-finite tensors {bad[:3]}")
            run = os.path.dirname(os.path.dirname(path))
            if os.path.basename(path) == _export_name(run):  # the final export holds the final trained weights
                trained = {k[len("network."):]: v for k, v in _trained_weights(_last_state(run)).items()
                           if k.startswith("network.")}
                net = comp.network.state_dict()
                check(trained.keys() == net.keys(), f"{path}: network keys differ from the trained state")
                diff = [k for k in net if not torch.equal(net[k], trained[k].to(net[k].dtype))]
                check(not diff, f"{path}: {len(diff)} network tensors differ from the trained weights, e.g. {diff[:3]}")
        return f"{len(files)} files reloaded"

    def generate(self) -> str:
        done = []
        for name in ("train-sdxl-bf16", "train-sd3-bf16", "sigterm-resume"):
            run = self.runs.get(name)
            if not run or not os.path.isdir(os.path.join(run, "models")):
                continue
            ckpt = os.path.join(run, "models", _export_name(run))
            dest = os.path.join(self.out, "generated", name)
            args = ["--model", ckpt, "--prompt", "a blue square", "--steps", "2", "--w", "64", "--h", "64",
                    "--out", dest, "--device", self.r.device, "--precision", "bf16"]  # generate.py's GPU default
            code = self.r.run("generate.py", args, f"generate-{name}", torchrun=False)
            check(code == 0, f"generate.py exit {code}:\n{self.r.tail(f'generate-{name}')}")
            from PIL import Image
            pngs = glob.glob(os.path.join(dest, "*.png"))
            check(len(pngs) == 1, f"{dest}: {pngs}")
            with Image.open(pngs[0]) as im:
                check(im.size == (64, 64) and "a blue square" in im.text.get("parameters", ""), f"{pngs[0]}: {im.size}")
            done.append(name)
        check(bool(done), "no export to generate from")
        return "from " + ", ".join(done) + " (bf16 network and text encoders)"

    def cpu_vs_cuda(self) -> str:
        if not self.cuda:
            raise Skip("CUDA only")
        sgd = ["optimizer.optimizer_type=SGD", "optimizer.learning_rate=0.05", "train.noise_device=cpu"]
        env = {"NVIDIA_TF32_OVERRIDE": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        losses = {}
        for dev in ("cuda", "cpu"):
            name = f"cmp-{dev}"
            code = self.r.run("train.py", self.train_args("sdxl", name, "no", *sgd), name, device=dev, extra_env=env)
            check(code == 0, f"{dev} run exit {code}:\n{self.r.tail(name)}")
            losses[dev] = _losses(self.runs[name])
        a, b = losses["cuda"], losses["cpu"]
        check(a.keys() == b.keys(), f"steps differ: {sorted(a)} vs {sorted(b)}")
        rel = {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a}
        worst = max(rel.values())
        check(worst <= CPU_CUDA_RTOL, f"max rel loss diff {worst:.3g} > {CPU_CUDA_RTOL}: {a} vs {b}")
        return f"{len(a)} steps, max rel loss diff {worst:.2g} (step 1: {rel[1]:.2g}; tol {CPU_CUDA_RTOL:g})"

    def plan(self) -> list[tuple[str, bool, Callable[[], str]]]:
        """(name, in the --quick subset, step)."""
        t = self.train
        return [  # GPU-only checks early, so a run cut short by --budget-s still has them
            ("nccl", False, self.nccl),
            ("init-parity", True, self.init_parity),
            ("cache-sdxl", True, lambda: self.cache("sdxl")),
            ("cpu-vs-cuda", True, self.cpu_vs_cuda),
            ("train-sdxl-bf16", False, lambda: t("sdxl", "bf16", previews=True)),
            ("train-sdxl-fp16", False, lambda: t("sdxl", "fp16")),
            ("train-compile", False, self.train_compile),
            ("cache-sd3", False, lambda: self.cache("sd3")),
            ("train-sd3-bf16", False, lambda: t("sd3", "bf16", previews=True)),
            ("train-fsdp", False, lambda: t("sd3", "bf16", "train.fsdp=true", name="train-fsdp", previews=True)),
            ("train-sd3-fp16", False, lambda: t("sd3", "fp16")),
            ("sigterm-resume", True, self.sigterm_resume),
            ("exports", True, self.exports),
            ("generate", True, self.generate),
        ]

    def train_compile(self) -> str:
        if not self.cuda:
            raise Skip("CUDA only here (inductor on the CPU needs a C++ compiler and minutes for the tiny blocks)")
        return self.train("sdxl", "bf16", "train.compile=true", name="train-compile")


DIST_PROBE = '''
import sys, torch
sys.path.insert(0, %r)
from core import dist
import cache
info = dist.init()
assert dist.is_dist(), "no process group under torchrun"
b = dist.backend()
assert dist.all_reduce_mean(2.5) == 2.5 and dist.any_true(True) and not dist.any_true(False)
assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.all_gather_object(3) == [3]
dist.barrier()
for dt in (torch.int32, torch.int64):  # cache.py: status codes (int32) and counts (int64) summed on the device
    t = torch.arange(5, dtype=dt)
    s = cache._sum_over_ranks(t, info.device)
    assert s.device.type == "cpu" and s.dtype == dt and torch.equal(s, t * info.world_size), s
print(f"probe ok: backend {b}, device {info.device}, world {info.world_size}")
dist.shutdown()
''' % ROOT


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _metrics(out: str) -> list[dict[str, Any]]:
    path = os.path.join(out, "logs", "metrics.jsonl")
    return [json.loads(line) for line in _read(path).splitlines() if line.strip()] if os.path.isfile(path) else []


def _losses(out: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(out)}  # a resumed run's rows are appended, by step


def _last_state(out: str) -> str:
    states = sorted(d for d in os.listdir(os.path.join(out, "state")) if d.startswith("step-") and ".tmp" not in d)
    check(bool(states), f"{out}: no resume state")
    return os.path.join(out, "state", states[-1])


def _trained_weights(state: str) -> dict[str, torch.Tensor]:
    """The trained weights of a resume state (part-prefixed keys): `trained.safetensors` of a full state, or the
    `model` entry of a sharded (FSDP) state's DCP folder, gathered into one file the way tests/test_fsdp.py reads it
    (torch's dcp_to_torch_save) in a temporary folder."""
    from safetensors.torch import load_file

    path = os.path.join(state, "trained.safetensors")
    if os.path.isfile(path):
        return load_file(path)
    folder = os.path.join(state, "dcp")
    check(os.path.isdir(folder), f"{state}: neither trained.safetensors nor a dcp/ folder")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, os.path.join(tmp, "full.pt"))
        full = torch.load(os.path.join(tmp, "full.pt"), weights_only=False)
    check(isinstance(full.get("model"), dict) and bool(full["model"]), f"{folder}: no trained weights in it")
    return full["model"]


def _progress(out: str) -> dict[str, Any]:
    return json.loads(_read(os.path.join(_last_state(out), "progress.json")))


def _export_name(out: str) -> str:
    import tomllib
    with open(os.path.join(out, "config.toml"), "rb") as f:
        return tomllib.load(f)["save"]["output_name"] + ".safetensors"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="", help="work folder (default: a temporary folder, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--quick", action="store_true", help="a short subset, run in this process (the CI test)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="steps that would start later than this many seconds "
                    "after the start are SKIP (budget), so a run under a timeout ends with its summary (0: no limit)")
    ap.add_argument("--only", default="", help="comma-separated step names (setup always runs; exports, generate and "
                    "the sigterm-resume comparison use the runs of earlier steps)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda but no CUDA device is visible (use --device cpu)", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="gpu_smoke_")
    os.makedirs(out, exist_ok=True)
    smoke = Smoke(Runner(args.device, out, in_process=args.quick), args.quick)
    only = {s for s in args.only.split(",") if s}
    plan = smoke.plan()
    unknown = only - {name for name, _, _ in plan}
    if unknown:
        print(f"gpu_smoke: unknown step(s) {sorted(unknown)}; steps: {', '.join(n for n, _, _ in plan)}", file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"gpu_smoke: torch {torch.__version__}, device {dev}, work folder {out}"
          + (", --quick (in process)" if args.quick else ""), flush=True)
    t_all = time.perf_counter()
    smoke.setup()
    results: list[Result] = []
    for name, in_quick, fn in plan:
        if (only and name not in only) or (args.quick and not in_quick):
            results.append(Result(name, "SKIP", "not selected" if only else "not in --quick"))
            print(f"SKIP {name}: {results[-1].detail}", flush=True)
            continue
        if args.budget_s and time.perf_counter() - t_all > args.budget_s:
            results.append(Result(name, "SKIP", f"(budget) past --budget-s {args.budget_s:g}"))
            print(f"SKIP {name}: {results[-1].detail}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            res = Result(name, "PASS", fn())
        except Skip as e:
            res = Result(name, "SKIP", str(e))
        except StepFailed as e:
            res = Result(name, "FAIL", str(e))
        except Exception:  # a crash in a step is that step's failure; the others still run
            res = Result(name, "FAIL", traceback.format_exc(limit=6))
        res.seconds = time.perf_counter() - t0
        results.append(res)
        print(f"{res.status} {name} ({res.seconds:.1f} s): {res.detail}", flush=True)
    failed = [r.name for r in results if r.status == "FAIL"]
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_smoke: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.perf_counter() - t_all:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if not args.out and not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
