"""Command-line handling shared by train.py and cache.py: `script.py cfg.toml [table.key=value ...]`."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, Sequence

from core.config import Config, ConfigError, load_config, to_toml
from core.fsio import describe_os_error


def parse(argv: Sequence[str] | None, prog: str, description: str,
          extra_flags: Sequence[tuple[str, str | dict]] = ()) -> tuple[Config, argparse.Namespace]:
    """Parse `cfg.toml [overrides] [--print-config]`; print the resolved config and exit when asked.
    Config errors are printed as one clear message (exit code 2) before anything is loaded. `extra_flags`:
    (flag, help) for a switch, or (flag, add_argument keywords) for an option with a value."""
    ap = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Overrides after the file are typed by the field, e.g. train.max_train_steps=100 "
               "optimizer.learning_rate=2e-6 data.image_dirs='[\"a\",\"b\"]'. "
               "Run under torchrun for several GPUs / nodes, or as a plain single process.")
    ap.add_argument("config", help="TOML config file")
    ap.add_argument("overrides", nargs="*", help="table.key=value overrides")
    ap.add_argument("--print-config", action="store_true", help="print the fully resolved config as TOML and exit")
    for flag, spec in extra_flags:
        ap.add_argument(flag, **(spec if isinstance(spec, dict) else {"action": "store_true", "help": spec}))
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        sys.stdout.write(to_toml(cfg))
        raise SystemExit(0)
    return cfg, args


def one_line_errors(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an entry point's main(): a full disk, a read-only or forbidden path ends it with one line
    ("train.py: no space left on device: <path>", exit code 1) instead of a traceback; other errors pass. A
    progress bar still drawn is ended first, so the line does not land on it."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                line = describe_os_error(e)
                if line is None:
                    raise
                close_progress_bars()
                raise SystemExit(f"{prog}: {line}") from None
            except SystemExit:
                close_progress_bars()
                raise
        return run
    return wrap


def close_progress_bars() -> None:
    """Close every live tqdm bar (each ends its line), so a message printed next starts a line of its own."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        bar.close()


def error_line(kind: str, e: BaseException, prog: str = "") -> str:
    """One line for an error met while doing `kind` ("data error: ..."); a full / read-only disk (also when rank 0
    met it and shared it, see dist.main_first) is said as such: "no space left on device: <path>"."""
    cause = e if isinstance(e, OSError) else e.__cause__
    disk = describe_os_error(cause) if isinstance(cause, OSError) else None
    head = f"{prog}: " if prog else ""
    return f"{head}{disk}" if disk else f"{head}{kind}: {e}"


def run_entry(main: Callable[[], int], shutdown: Callable[[], None]) -> None:
    """An entry point's `if __name__ == "__main__"`: main(), then shutdown() (the process group destroyed), then
    exit_now. A SystemExit (a user error every rank stops on with its one line) takes the same way out: left to the
    interpreter's teardown with a live gloo group, a torchrun worker could die of "terminate called without an
    active exception" (SIGABRT) after printing its line."""
    try:
        code = main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            close_progress_bars()
            print(e.code, file=sys.stderr)
            code = 1
    shutdown()
    exit_now(code)


def exit_now(code: int) -> None:
    """End an entry point once its work is done and written: logs and streams flushed, then os._exit, skipping the
    interpreter's teardown of torch's thousands of modules (seconds per process, every torchrun worker)."""
    import logging
    import os
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
