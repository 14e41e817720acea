#!/usr/bin/env python
"""Host syncs per optimizer step of the real training step: train.main in this process, tiny presets, on the CPU.

    python bench/sync_count.py                       # SDXL, SD3, SDXL LoRA, SDXL fused backward (Adafactor)
    python bench/sync_count.py --cases sd3 -v        # every counted call site

A CPU has no device to wait for, so the calls that would make the host wait for a GPU are counted instead, by a
TorchFunctionMode over the whole step (the project's code only; torch's internals are not ours to change):
  - reads: a device tensor's value on the host (`item`, `bool`, `float`, `int`, `tolist`, `numpy`, `cpu`);
  - copies to the device of a host tensor (a tensor made on the host: the loader's batch, the tokenizer's ids, and
    everything computed from them on the host) that CUDA performs synchronously: a blocking `.to(device)` /
    `.copy_`, or a non-blocking one from pageable memory (only the loader's batch tensors are pinned on CUDA;
    pageable host-to-device copies synchronise the stream even with non_blocking=True).
Reads of host tensors (no device involved) and non-blocking copies of pinned tensors are not syncs: the loader's
batch (pin_memory on CUDA) and what models.family.host_to_device copies (it pins first on CUDA; on the CPU its
CUDA branch is substituted).

Each case runs 4 optimizer steps, 2 micro-batches each (1 for the fused backward pass), logging only at the last step;
the count of each step is printed, steps 1-3 are the steady state (step 4 also logs). Exit status 1 if a steady step
has more than --max syncs (default 1).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections import Counter, defaultdict
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS = 4
CASES: dict[str, tuple[str, list[str], int]] = {  # config, overrides, micro-batches per optimizer step
    "sdxl": ("configs/demo.toml", [], 2),
    "sd3": ("configs/demo_sd3.toml", ["cache.cache_text_encoder_outputs=false"], 2),
    "sdxl-lora": ("configs/demo.toml", ["network.network_module=lora", "network.network_dim=4"], 2),
    "sdxl-fused-backward": ("configs/demo.toml", ["optimizer.optimizer_type=Adafactor",
                                                  "train.fused_backward_pass=true"], 1),
}
READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}
TRANSFERS = {"to", "cuda", "copy_"}
HOST, PINNED = "host", "pinned"
# Functions whose reads run only on host tensors (they return at once for device tensors): on the CPU, where the
# training "device" is the host, they read; on a GPU they do not.
HOST_ONLY = {"_check_token_ids"}  # tags of host tensors: pageable, or the loader's (pinned under CUDA)


def _tag(t: Any) -> str | None:
    return getattr(t, "_sync_host", None) if isinstance(t, torch.Tensor) else None


def _set_tag(out: Any, tag: str) -> None:
    if isinstance(out, torch.Tensor):
        try:
            out._sync_host = tag
        except (AttributeError, RuntimeError):
            pass
    elif isinstance(out, (tuple, list)):
        for o in out:
            _set_tag(o, tag)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _target_device(args: tuple, kwargs: dict) -> bool:
    """Whether a `.to(...)` call names a device (a device, a device string, or a tensor to follow)."""
    if "device" in kwargs and kwargs["device"] is not None:
        return True
    for a in args[1:2]:
        if isinstance(a, (torch.device, str, torch.Tensor)):
            return True
    return False


def _caller() -> str | None:
    """The project's call site of the tensor method: the first frame outside torch's dispatch machinery, if it is
    the project's (a read inside torch or another package is not counted: e.g. AdamW's step counters are host
    tensors on CUDA too)."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.endswith(("torch/overrides.py", "torch/_tensor.py"))
                             or f.f_code.co_filename == __file__):
        f = f.f_back
    if f is None:
        return None
    name = f.f_code.co_filename
    if f.f_code.co_name in HOST_ONLY:
        return None
    if name.startswith(ROOT) and "site-packages" not in name:
        return f"{os.path.relpath(name, ROOT)}:{f.f_lineno}"
    return None


class SyncCounter(TorchFunctionMode):
    """Counts would-be syncs (see the module docstring) at project call sites while `on`."""

    def __init__(self) -> None:
        super().__init__()
        self.on, self.step = False, 0
        self.sites: dict[int, Counter] = defaultdict(Counter)

    def _count(self, kind: str) -> None:
        site = _caller()
        if site is not None:
            self.sites[self.step][f"{kind} {site}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        ins = _tensors(args) + _tensors(kwargs)
        tags = {_tag(t) for t in ins} - {None}
        if self.on and ins:
            if name in READS:
                pass  # counted by the patched tensor methods (read_patches): also inside autograd hooks
            elif name in ("to", "cuda") and _tag(args[0]) is not None and \
                    (name == "cuda" or _target_device(args, kwargs)):
                pinned_async = _tag(args[0]) == PINNED and kwargs.get("non_blocking", False)
                if not pinned_async:
                    self._count(f"copy .{name} ({'blocking' if not kwargs.get('non_blocking') else 'pageable'})")
            elif name == "copy_" and len(args) > 1 and _tag(args[1]) is not None and _tag(args[0]) is None:
                self._count("copy .copy_")
        out = func(*args, **kwargs)
        if tags and name not in TRANSFERS | READS:
            _set_tag(out, HOST)
        elif tags and name == "to" and not _target_device(args, kwargs):
            _set_tag(out, HOST)  # a dtype cast on the host stays on the host
        elif tags and name in ("to", "cuda") and out is args[0]:
            out = out.clone()  # on the CPU the "device copy" is the tensor itself: a copy stands for the device's
        return out


@contextlib.contextmanager
def read_patches(counter: SyncCounter):
    """Tensor reads counted by patching the tensor methods themselves: a TorchFunctionMode is thread-local and not
    active inside autograd hooks (where the fused backward pass steps each parameter), the patched methods are."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    inside = threading.local()  # float() calls item(): one read, counted at the outermost call

    def make(name, orig):
        def read(self, *a, **k):
            if getattr(inside, "depth", 0):
                return orig(self, *a, **k)
            if counter.on and _tag(self) is None:
                counter._count(f"read .{name}")
            inside.depth = 1
            try:
                return orig(self, *a, **k)
            finally:
                inside.depth = 0
        return read

    for name, orig in originals.items():
        setattr(torch.Tensor, name, make(name, orig))
    try:
        yield
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def _tag_batches(loader_batches):
    """The loader's batch tensors are host tensors, pinned under CUDA (the loader's pin_memory)."""
    for batch in loader_batches:
        for v in batch.values():
            for t in _tensors(v):
                _set_tag(t, PINNED)
        yield batch


def count(case: str, verbose: bool = False) -> dict[int, Counter]:
    """Run the case's training and return the counted sites per optimizer step (1-based)."""
    import train
    from data.demo import make_demo_dataset
    from models import tokenizers

    config, overrides, accum = CASES[case]
    counter = SyncCounter()
    micro = [0]
    step_loss = train.micro_step_loss
    groups = train.micro_batch_groups
    layouts = tokenizers.CLIPTokenizer.layouts

    def micro_step_loss(*a, **k):
        counter.on = True
        counter.step = micro[0] // accum + 1
        micro[0] += 1
        return step_loss(*a, **k)

    def micro_batch_groups(loader, n):
        return groups(_tag_batches(loader), n)

    def tagged_layouts(self, *a, **k):
        out = layouts(self, *a, **k)
        _set_tag(out, HOST)
        return out

    sentencepiece_tag = None
    try:
        from models import t5 as t5_mod
        if hasattr(t5_mod, "T5Tokenizer"):
            sentencepiece_tag = t5_mod.T5Tokenizer.__call__
            def t5_call(self, *a, **k):
                out = sentencepiece_tag(self, *a, **k)
                for t in _tensors(out):
                    _set_tag(t, HOST)
                return out
            t5_mod.T5Tokenizer.__call__ = t5_call
    except ImportError:
        pass
    train.micro_step_loss, train.micro_batch_groups = micro_step_loss, micro_batch_groups
    tokenizers.CLIPTokenizer.layouts = tagged_layouts
    # models.family.host_to_device pins host tensors and copies them without blocking on CUDA; on the CPU it takes
    # its plain branch, so here it is replaced by what it does on CUDA (the pin taken as done)
    import importlib
    patched_h2d = []

    def h2d_as_on_cuda(t, device):
        if _tag(t) is not None:
            _set_tag(t, PINNED)
        return t.to(device, non_blocking=True)

    for name in ("models.family", "models.sdxl", "models.sd3", "train"):
        mod = importlib.import_module(name)
        if hasattr(mod, "host_to_device"):
            patched_h2d.append((mod, mod.host_to_device))
            mod.host_to_device = h2d_as_on_cuda
    try:
        with tempfile.TemporaryDirectory(prefix="sync_count_") as tmp:
            make_demo_dataset(os.path.join(tmp, "imgs"), n=8, size=(64, 64))
            args = [config, f"data.image_dirs=['{os.path.join(tmp, 'imgs')}']", "cache.cache_dir=",
                    f"output_dir={os.path.join(tmp, 'run')}", "data.resolution=64", "data.min_bucket_reso=64",
                    "data.max_bucket_reso=64", "data.batch_size=1", f"train.max_train_steps={STEPS}",
                    f"train.gradient_accumulation_steps={accum}", f"log.log_every_n_steps={STEPS}",
                    "sample.sample_every_n_steps=0", "sample.sample_prompts=", "save.save_every_n_steps=0",
                    "save.save_state=false", "save.save_on_train_end=false", "optimizer.lr_warmup_steps=0",
                    "optimizer.max_grad_norm=1.0", "log.tensorboard=false", *overrides]
            with counter, read_patches(counter):
                rc = train.main(args)
            for h in list(logging.getLogger("sdtrain").handlers):  # train.main leaves its run log open
                h.close()
                logging.getLogger("sdtrain").removeHandler(h)
            if rc:
                raise RuntimeError(f"train.main exit {rc} for case {case}")
    finally:
        train.micro_step_loss, train.micro_batch_groups = step_loss, groups
        tokenizers.CLIPTokenizer.layouts = layouts
        for mod, fn in patched_h2d:
            mod.host_to_device = fn
        if sentencepiece_tag is not None:
            t5_mod.T5Tokenizer.__call__ = sentencepiece_tag
    return dict(counter.sites)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--max", type=int, default=1, help="syncs allowed per steady-state optimizer step")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every counted site")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bad = []
    print(f"sync_count: torch {torch.__version__}, {STEPS} optimizer steps per case, step {STEPS} logs")
    for case in args.cases.split(","):
        sites = count(case)
        per_step = [sum(sites.get(s, Counter()).values()) for s in range(1, STEPS + 1)]
        steady = max(per_step[:-1])
        print(f"{case:22s} syncs per step {per_step} (steady max {steady})")
        if args.verbose or steady > args.max:
            for s in range(1, STEPS + 1):
                for site, n in sorted(sites.get(s, Counter()).items()):
                    print(f"    step {s}: {n} x {site}")
        if steady > args.max:
            bad.append(case)
    print(f"sync_count: {'OK' if not bad else 'over ' + str(args.max) + ': ' + ', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
