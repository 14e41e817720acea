"""The README and docs/ stay true to the repository: the config reference is generated, links resolve, the README is short.

Cheap text checks (no model, no torch): they fail when a page is moved or renamed without its links, when a
config field is added without regenerating docs/config-reference.md, or when a documented file no longer exists.
"""
import os
import re
import sys
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 200  # issue #22: the README says what it is and where to read next; the rest lives in docs/

# Top-level folders whose files the pages name in backticks (`core/config.py`, `configs/sdxl_lora.toml`).
_REPO_DIRS = ("bench", "configs", "core", "data", "diffusion", "docs", "models", "networks", "scripts", "tests",
              "tools", "training")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_CODE_PATH = re.compile(r"`((?:%s)/[A-Za-z0-9_./-]*[A-Za-z0-9_])(?:::[A-Za-z0-9_]+)?`" % "|".join(_REPO_DIRS))
_FENCE = re.compile(r"^(```|~~~)")


def _pages() -> list[str]:
    """README.md and every Markdown page under docs/ (relative to the repository root)."""
    pages = ["README.md"]
    for dirpath, _, files in os.walk(os.path.join(ROOT, "docs")):
        pages += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files if f.endswith(".md")]
    return sorted(pages)


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _prose(text: str) -> str:
    """The text outside fenced code blocks (links and paths inside ``` blocks are examples, not references)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, `-`, `_` kept), spaces -> `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(rel: str) -> set[str]:
    """Every anchor a page offers: its headings' slugs (repeats numbered -1, -2 as GitHub does)."""
    seen: dict[str, int] = {}
    for line in _prose(_read(rel)).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        seen.setdefault(f"{s}-{n}" if n else s, 1)
    return set(seen)


def test_config_reference_is_current():
    """docs/config-reference.md is what scripts/gen_config_reference.py writes from core/config.py's field docs."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gen_config_reference
    assert os.path.isfile(gen_config_reference.PATH), "run: python scripts/gen_config_reference.py"
    assert _read(os.path.relpath(gen_config_reference.PATH, ROOT)) == gen_config_reference.render(), \
        "docs/config-reference.md is stale: run python scripts/gen_config_reference.py"


def test_config_reference_check_mode_fails_when_stale(tmp_path, monkeypatch, capsys):
    """`--check` exits 1 on a stale page and 0 on a current one (what CI or a pre-commit hook would call)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gen_config_reference
    page = tmp_path / "config-reference.md"
    monkeypatch.setattr(gen_config_reference, "PATH", str(page))
    monkeypatch.setattr(sys, "argv", ["gen_config_reference.py", "--check"])
    page.write_text(gen_config_reference.render().replace("learning_rate", "learning_rat"), encoding="utf-8")
    assert gen_config_reference.main() == 1
    assert "out of date" in capsys.readouterr().out
    page.write_text(gen_config_reference.render(), encoding="utf-8")
    assert gen_config_reference.main() == 0


@pytest.mark.parametrize("page", _pages())
def test_relative_links_resolve(page):
    """Every relative link (and image) in README / docs points at an existing file, and its #anchor at a heading."""
    base = os.path.dirname(page)
    broken = []
    for m in _LINK.finditer(_prose(_read(page))):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        rel = os.path.normpath(os.path.join(base, path)) if path else page
        if not os.path.exists(os.path.join(ROOT, rel)):
            broken.append(f"{target} (no file {rel})")
        elif anchor and rel.endswith(".md") and anchor not in _anchors(rel):
            broken.append(f"{target} (no heading #{anchor} in {rel})")
    assert not broken, f"{page}: broken links: " + ", ".join(broken)


@pytest.mark.parametrize("page", _pages())
def test_named_repository_files_exist(page):
    """A file or folder a page names in backticks (`core/config.py`, `bench/store_bench.py`) exists: renames and
    package moves (the core/ split) cannot leave the docs pointing at old names."""
    missing = sorted({p for p in _CODE_PATH.findall(_prose(_read(page)))
                      if "*" not in p and "{" not in p and not os.path.exists(os.path.join(ROOT, p))})
    assert not missing, f"{page} names files that do not exist: {', '.join(missing)}"


def test_readme_is_short():
    """The README stays an entry page: what it is, the two commands, quick starts, features, where to read next."""
    n = len(_read("README.md").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"


def test_slug_rule():
    """The anchor rule the link check relies on, on headings of the kind these pages use."""
    assert _slug("Coming from kohya / euge-trainer / HCP") == "coming-from-kohya--euge-trainer--hcp"
    assert _slug("`[[data.subsets]]`") == "datasubsets"
    assert _slug("Full fine-tune on one 24 GB GPU") == "full-fine-tune-on-one-24-gb-gpu"
