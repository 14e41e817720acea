"""Run logging on rank 0: a log file in logs/, metrics as JSON lines, TensorBoard and Weights & Biases when asked.

Every sink gets the same rows: MetricsWriter.write(step, row) goes to metrics.jsonl, TensorBoard scalars and
wandb.log; images (previews) go to TensorBoard and wandb. wandb's run id is the run's own id (training/resume.py),
so a resumed run continues the same wandb run.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch


# The project's packages: their modules log with logging.getLogger(__name__) ("data.store", "training.resume", ...).
PROJECT_LOGGERS = ("core", "data", "diffusion", "models", "networks", "tools", "training")


class _Stderr(logging.StreamHandler):
    """The console: sys.stderr as it is at each record, not as it was when the run started (a project module's
    record can come after the run, e.g. cache.main after train.main in one process, when a stream captured
    then is closed)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _ToRunLog(logging.Handler):
    """Hands a project module's record to the run log's own handlers (console, and train.log on rank 0), so a warning
    from data.store lands in the run log too, once; the record still propagates to the root logger's handlers
    (pytest's caplog; none in a plain run, so the terminal shows it once). The handlers are called directly, not
    through the run logger: a capture handler attached to that logger (pytest 9 attaches its own to every
    non-propagating logger) would see the record a second time. A handler taken off the run logger since (closed
    by whoever ran train.main in process, its folder perhaps deleted) is skipped: a FileHandler would reopen it."""

    def __init__(self, level: int, logger: logging.Logger):
        super().__init__(level)
        self.logger = logger
        self.targets = list(logger.handlers)

    def emit(self, record: logging.LogRecord) -> None:
        live = self.logger.handlers
        for h in self.targets:
            if h in live and record.levelno >= h.level:
                h.handle(record)


def setup_logging(log_dir: str | None, is_main: bool, name: str = "train") -> logging.Logger:
    """Console + file logger on rank 0; warnings only on the other ranks. The project's module loggers
    (PROJECT_LOGGERS) write through it, at the same levels."""
    logger = logging.getLogger("sdtrain")
    logger.handlers.clear()
    logger.propagate = False
    level = logging.INFO if is_main else logging.WARNING
    logger.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = _Stderr()
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main and log_dir:
        os.makedirs(log_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(log_dir, f"{name}.log"))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    for pkg in PROJECT_LOGGERS:
        mod = logging.getLogger(pkg)
        for h in [h for h in mod.handlers if isinstance(h, _ToRunLog)]:  # a second run in this process
            mod.removeHandler(h)
        mod.addHandler(_ToRunLog(level, logger))
        mod.setLevel(level)
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


def check_wandb() -> None:
    """log.wandb needs the wandb package (requirements-optional.txt): a clear error when it is missing."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError("log.wandb = true needs the wandb package: pip install wandb (requirements-optional.txt), "
                         "or set log.wandb = false") from None


@dataclass
class WandbRun:
    """What wandb.init is given: [log] wandb_* options, the run id (the same across resumes) and the resolved config."""

    project: str
    name: str
    run_id: str
    tags: list[str] = field(default_factory=list)
    entity: str = ""
    mode: str = "online"  # "offline": written under logs/wandb, `wandb sync` uploads it later
    config: dict[str, Any] = field(default_factory=dict)


def wandb_run(log_cfg: Any, out_dir: str, run_id: str, config: dict[str, Any]) -> WandbRun | None:
    """The WandbRun of [log] (run name: log.wandb_run_name, else the run folder's name), or None with wandb off."""
    if not log_cfg.wandb:
        return None
    name = log_cfg.wandb_run_name or os.path.basename(os.path.normpath(out_dir))
    return WandbRun(project=log_cfg.wandb_project, name=name, run_id=run_id, tags=list(log_cfg.wandb_tags),
                    entity=log_cfg.wandb_entity, mode=log_cfg.wandb_mode, config=config)


def _wandb_id(run_id: str) -> str:
    """wandb run ids allow letters, digits, '-' and '_' only (and 64 characters at most)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)[:64] or "run"


def group_lrs(optimizer: Any) -> dict[str, float]:
    """The learning rate of every optimizer parameter group, as lr/<group name> (index when unnamed)."""
    return {f"lr/{g.get('name') or i}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


class MetricsWriter:
    """metrics.jsonl (step, loss, lr, grad norm, images/s, GPU memory, ...), TensorBoard events and a wandb run."""

    def __init__(self, log_dir: str, enabled: bool, tensorboard: bool = True, wandb: WandbRun | None = None):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self._f = open(self.path, "a", buffering=1) if enabled else None
        self._tb = None
        self._wandb: Any = None
        self._pending: tuple[int, dict[str, Any]] | None = None  # wandb: one row per step, committed as a whole
        if enabled and tensorboard:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))
        if enabled and wandb is not None:
            self._wandb = _start_wandb(wandb, log_dir)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled or self._f is None:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        self._f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._to_wandb(step, scalars)

    def write_images(self, step: int, paths: list[str], group: str = "samples") -> None:
        """PNGs (previews) as TensorBoard / wandb images, tag <group>/<file index within the round> (or /grid)."""
        if self._tb is None and self._wandb is None:
            return
        import numpy as np
        from PIL import Image
        logged = {}
        for path in paths:
            name = os.path.basename(path)
            tag = f"{group}/grid" if name.endswith("_grid.png") else f"{group}/{name.split('_')[1]}"
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
            if self._tb is not None:
                self._tb.add_image(tag, pixels, step, dataformats="HWC")
            if self._wandb is not None:
                logged[tag] = self._wandb.Image(pixels, caption=name)
        if self._tb is not None:
            self._tb.flush()
        if logged:
            self._to_wandb(step, logged)

    def _to_wandb(self, step: int, values: dict[str, Any]) -> None:
        """Gather what a step logs (training row, validation, images) into one wandb row, committed when the next
        step arrives or at close (wandb drops a row logged at a step it has already committed)."""
        if self._pending is not None and self._pending[0] != step:
            self._flush_wandb()
        if self._pending is None:
            self._pending = (step, {})
        self._pending[1].update(values)

    def _flush_wandb(self) -> None:
        if self._pending is not None:
            step, row = self._pending
            self._wandb.log(row, step=step, commit=True)
            self._pending = None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._flush_wandb()
            self._wandb.finish()
            self._wandb.teardown()  # the service writes the run's last records before it stops
            self._wandb = None


def _start_wandb(run: WandbRun, log_dir: str) -> Any:
    """wandb.init for the run (files under logs/wandb; resumed when the id exists); returns the wandb module."""
    check_wandb()
    import wandb
    wandb.init(project=run.project, name=run.name, id=_wandb_id(run.run_id), resume="allow", tags=run.tags or None,
               entity=run.entity or None, mode=run.mode, config=run.config, dir=log_dir)
    return wandb
