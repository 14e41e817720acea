"""Command-line handling shared by train.py and cache.py: `script.py cfg.toml [table.key=value ...]`."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from core.config import Config, ConfigError, load_config, to_toml


def parse(argv: Sequence[str] | None, prog: str, description: str, extra_flags: Sequence[tuple[str, str]] = ()) -> tuple[Config, argparse.Namespace]:
    """Parse `cfg.toml [overrides] [--print-config]`; print the resolved config and exit when asked.
    Config errors are printed as one clear message (exit code 2) before anything is loaded."""
    ap = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Overrides after the file are typed by the field, e.g. train.max_train_steps=100 "
               "optimizer.learning_rate=2e-6 data.image_dirs='[\"a\",\"b\"]'. "
               "Run under torchrun for several GPUs / nodes, or as a plain single process.")
    ap.add_argument("config", help="TOML config file")
    ap.add_argument("overrides", nargs="*", help="table.key=value overrides")
    ap.add_argument("--print-config", action="store_true", help="print the fully resolved config as TOML and exit")
    for flag, help_text in extra_flags:
        ap.add_argument(flag, action="store_true", help=help_text)
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
