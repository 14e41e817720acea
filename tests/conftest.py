import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MISSING = "could not import"  # the reason pytest.importorskip gives
HINT = "a package the tests need is missing: python -m pip install -r requirements.txt -r requirements-dev.txt"


def _missing_package(reason: object) -> bool:
    return MISSING in str(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test skipped by pytest.importorskip fails instead: requirements-dev.txt installs every package the tests
    use, so a missing one is a missing requirement (CI must see it), not a reason to skip. Hardware skips stay."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and call.excinfo is not None and _missing_package(call.excinfo.value):
        rep.outcome, rep.longrepr = "failed", f"{call.excinfo.value}\n{HINT}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a module that calls pytest.importorskip at import (the whole file would be skipped)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and _missing_package(rep.longrepr):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else rep.longrepr
        rep.outcome, rep.longrepr = "failed", f"{reason}\n{HINT}"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Tiny models run fastest on one thread (thread start-up dominates); seeds fixed per test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
