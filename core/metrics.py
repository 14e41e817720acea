"""Run logging on rank 0: a log file in logs/, metrics as JSON lines, TensorBoard when installed."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import torch


def setup_logging(log_dir: str | None, is_main: bool, name: str = "train") -> logging.Logger:
    """Console + file logger on rank 0; warnings only on the other ranks."""
    logger = logging.getLogger("sdtrain")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main and log_dir:
        os.makedirs(log_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(log_dir, f"{name}.log"))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def peak_memory(device: torch.device) -> dict[str, float]:
    """{"gpu_mem_gb": peak memory allocated so far} on a CUDA device; {} elsewhere (CUDA is never touched then)."""
    if device.type != "cuda":
        return {}
    return {"gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def check_tensorboard() -> None:
    """log.tensorboard needs the tensorboard package (requirements-optional.txt): a clear error when it is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("log.tensorboard = true needs the tensorboard package: pip install tensorboard "
                         "(requirements-optional.txt), or set log.tensorboard = false") from None


def group_lrs(optimizer: Any) -> dict[str, float]:
    """The learning rate of every optimizer parameter group, as lr/<group name> (index when unnamed)."""
    return {f"lr/{g.get('name') or i}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


class MetricsWriter:
    """metrics.jsonl (step, loss, lr, grad norm, images/s, GPU memory, ...) and TensorBoard events."""

    def __init__(self, log_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self._f = open(self.path, "a", buffering=1) if enabled else None
        self._tb = None
        if enabled and tensorboard:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled or self._f is None:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        self._f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def write_images(self, step: int, paths: list[str]) -> None:
        """Preview PNGs as TensorBoard images, tag samples/<file index within the round> (HWC uint8)."""
        if self._tb is None:
            return
        import numpy as np
        from PIL import Image
        for path in paths:
            name = os.path.basename(path)
            tag = "samples/grid" if name.endswith("_grid.png") else f"samples/{name.split('_')[1]}"
            with Image.open(path) as im:
                self._tb.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
