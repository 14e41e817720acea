#!/usr/bin/env python
"""Regenerate the README's config reference from the dataclass docs in core/config.py.

    python scripts/gen_config_reference.py          # rewrite README.md in place
    python scripts/gen_config_reference.py --check  # exit 1 if README.md is out of date
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from core.config import reference_markdown  # noqa: E402

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{reference_markdown()}\n{END}{tail}"


def main() -> int:
    path = os.path.join(ROOT, "README.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = render(text)
    if "--check" in sys.argv:
        if new != text:
            print("README.md config reference is out of date: run python scripts/gen_config_reference.py")
            return 1
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
