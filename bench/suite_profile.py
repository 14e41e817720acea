"""Where the test suite's time goes, measured so that it holds on a loaded machine: per test the wall time AND the
CPU seconds of the pytest process plus its children (getrusage RUSAGE_SELF + RUSAGE_CHILDREN deltas over setup, call
and teardown; a subprocess / torchrun launch counts once it has been waited for, torchrun's workers through their
agent). A module- or session-scoped fixture is set up inside the first test that uses it, so its cost lands there
(and its teardown on the last one). Collection (imports of every test module) is counted apart.

    python bench/suite_profile.py [--out suite_profile.json] [--cores 2] [--top 40] [-- pytest args]
    python bench/suite_profile.py --report suite_profile.json [--top 40]     # print a saved profile again
    nice -n 10 python bench/suite_profile.py --out /tmp/before.json -- -q -x tests/test_train.py

Prints the top tests by CPU seconds, the per-file totals, and the estimated idle wall time on a `--cores`-core machine.

**The idle estimate.** Under load the wall clock measures the load; CPU seconds barely change with it. The pytest
process runs tests one after another, so a test's own CPU is serial; its children may run side by side (torchrun /
run_workers start 2 workers, one per core), so a sampler thread reads the CPU of every live descendant from /proc
every 0.2 s and, per interval, takes max(largest process, sum / cores) as the time that interval needs on an idle
`cores`-core machine. The ratio of that to the sampled child CPU scales the test's child CPU (no samples: serial).
    idle(test) = self CPU + child CPU * parallel ratio
Time a test spends asleep (time.sleep, a lock wait, a timeout) is not CPU and is missed; the "slept" column is the
pytest process's wall time off CPU and off the run queue (/proc/self/schedstat), an upper bound of it when the
test has no children. Contention inflates CPU seconds a little too (shared caches): treat the estimate as +-15%.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def _cpu(who: int) -> float:
    """User + system CPU seconds of getrusage(who)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _schedstat() -> tuple[float, float]:
    """(seconds on CPU, seconds waiting on a run queue) of this process's main thread; zeros where unavailable."""
    try:
        with open("/proc/self/schedstat") as f:
            run, wait = f.read().split()[:2]
        return int(run) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def _process_table() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, CPU seconds of the process's live threads)} for every process in /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid ...; utime stime are 14, 15
        table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return table


class _ChildSampler:
    """Samples the CPU of every descendant of this process; accumulates, per interval, the CPU they used (summed)
    and the time that interval would need on an idle `cores`-core machine: max(largest process, sum / cores)."""

    def __init__(self, cores: int, interval: float = 0.2) -> None:
        self.cores, self.interval = cores, interval
        self.sampled_cpu = self.idle_need = 0.0
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def take(self) -> tuple[float, float]:
        """(sampled child CPU, idle need) since the last take()."""
        with self._lock:
            out = (self.sampled_cpu, self.idle_need)
            self.sampled_cpu = self.idle_need = 0.0
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.interval):
            table = _process_table()
            kids: dict[int, list[int]] = defaultdict(list)
            for pid, (ppid, _) in table.items():
                kids[ppid].append(pid)
            todo, seen = list(kids[me]), {}
            while todo:
                pid = todo.pop()
                seen[pid] = table[pid][1]
                todo.extend(kids[pid])
            deltas = [cpu - self._last.get(pid, 0.0) for pid, cpu in seen.items()]
            self._last = seen
            deltas = [d for d in deltas if d > 0]
            if deltas:
                with self._lock:
                    self.sampled_cpu += sum(deltas)
                    self.idle_need += max(max(deltas), sum(deltas) / self.cores)


class SuiteProfile:
    """The pytest plugin: one record per test (wall, self CPU, child CPU, idle estimate, slept)."""

    def __init__(self, cores: int) -> None:
        self.cores = cores
        self.records: list[dict] = []
        self.collect: dict = {}
        self.sampler = _ChildSampler(cores)
        self.started = time.time()

    def pytest_collection(self, session):  # noqa: ARG002 - pytest hook signature
        self._collect_start = (time.perf_counter(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN))

    def pytest_collection_finish(self, session):  # noqa: ARG002
        w, s, c = self._collect_start
        self.collect = {"wall": time.perf_counter() - w, "self_cpu": _cpu(resource.RUSAGE_SELF) - s,
                        "child_cpu": _cpu(resource.RUSAGE_CHILDREN) - c}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):  # noqa: ARG002
        self.sampler.take()
        w0, s0, c0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        r0, q0 = _schedstat()
        self._outcome = "passed"
        yield
        wall = time.perf_counter() - w0
        self_cpu, child_cpu = _cpu(resource.RUSAGE_SELF) - s0, _cpu(resource.RUSAGE_CHILDREN) - c0
        r1, q1 = _schedstat()
        sampled, need = self.sampler.take()
        ratio = need / sampled if sampled > 0.05 else 1.0
        self.records.append({"test": item.nodeid, "file": item.nodeid.split("::")[0], "outcome": self._outcome,
                             "wall": wall, "self_cpu": self_cpu, "child_cpu": child_cpu,
                             "idle": self_cpu + child_cpu * min(1.0, ratio),
                             "slept": max(0.0, wall - (r1 - r0) - (q1 - q0))})

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self._outcome = "failed"
        elif report.skipped and self._outcome == "passed":
            self._outcome = "skipped"

    def dump(self, path: str) -> None:
        self.sampler.stop()
        data = {"cores": self.cores, "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started)),
                "load_at_end": os.getloadavg(), "collect": self.collect, "tests": self.records}
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=0)
        os.replace(path + ".tmp", path)


def report(data: dict, top: int) -> str:
    """The printed summary of a saved profile."""
    tests, collect, cores = data["tests"], data["collect"] or {"wall": 0, "self_cpu": 0, "child_cpu": 0}, data["cores"]
    lines = [f"profile of {len(tests)} tests, started {data.get('started', '?')}, load at end "
             f"{' '.join(f'{x:.1f}' for x in data.get('load_at_end', []))}; times in seconds; idle = estimated "
             f"wall on an idle {cores}-core machine", "",
             f"top {top} tests by CPU (self + children):",
             f"{'cpu':>7} {'self':>7} {'child':>7} {'idle':>7} {'wall':>7} {'slept':>6}  test"]
    for r in sorted(tests, key=lambda r: -(r["self_cpu"] + r["child_cpu"]))[:top]:
        lines.append(f"{r['self_cpu'] + r['child_cpu']:7.1f} {r['self_cpu']:7.1f} {r['child_cpu']:7.1f} "
                     f"{r['idle']:7.1f} {r['wall']:7.1f} {r['slept']:6.1f}  {r['test']}"
                     + ("" if r["outcome"] == "passed" else f" [{r['outcome']}]"))
    files: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for r in tests:
        f = files[r["file"]]
        f["n"] += 1
        for k in ("self_cpu", "child_cpu", "idle", "wall", "slept"):
            f[k] += r[k]
    lines += ["", "per file (sorted by idle estimate):",
              f"{'n':>4} {'cpu':>7} {'self':>7} {'child':>7} {'idle':>7} {'wall':>7} {'slept':>6}  file"]
    for name, f in sorted(files.items(), key=lambda kv: -kv[1]["idle"]):
        lines.append(f"{int(f['n']):4d} {f['self_cpu'] + f['child_cpu']:7.1f} {f['self_cpu']:7.1f} "
                     f"{f['child_cpu']:7.1f} {f['idle']:7.1f} {f['wall']:7.1f} {f['slept']:6.1f}  {name}")
    cpu = sum(r["self_cpu"] + r["child_cpu"] for r in tests)
    idle = sum(r["idle"] for r in tests) + collect["self_cpu"] + collect["child_cpu"]
    wall = sum(r["wall"] for r in tests) + collect["wall"]
    slept = sum(r["slept"] for r in tests)
    failed = [r["test"] for r in tests if r["outcome"] == "failed"]
    lines += ["", f"collection: wall {collect['wall']:.1f}, CPU {collect['self_cpu'] + collect['child_cpu']:.1f}",
              f"total: {len(tests)} tests, CPU {cpu:.0f} s, wall {wall:.0f} s ({wall / 60:.1f} min) measured, "
              f"estimated idle wall {idle:.0f} s ({idle / 60:.1f} min) on {cores} cores "
              f"(+ up to {slept / 60:.1f} min asleep, see the docstring)",
              f"failed: {len(failed)}" + "".join(f"\n  {t}" for t in failed[:20])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run pytest with the profiler (or reprint a saved profile); returns pytest's exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="suite_profile.json", help="where the per-test records go (JSON)")
    p.add_argument("--report", help="print this saved profile and exit")
    p.add_argument("--cores", type=int, default=2, help="cores of the machine the idle estimate is for")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest (default: -q -p no:cacheprovider)")
    a = p.parse_args(argv)
    if a.report:
        with open(a.report) as f:
            print(report(json.load(f), a.top))
        return 0
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    plugin = SuiteProfile(a.cores)
    code = pytest.main(a.pytest_args or ["-q", "-p", "no:cacheprovider"], plugins=[plugin])
    plugin.dump(a.out)
    with open(a.out) as f:
        print("\n" + report(json.load(f), a.top))
    print(f"\nrecords: {a.out}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
