"""Cost of the test suite per test file: wall seconds and CPU seconds (this process + its finished children).

A pytest plugin: ``.venv/bin/python -m pytest -q -p benchmarks.suite_cost [tests ...]``. At the end it prints one
row per file and writes them as JSON to ``$SUITE_COST_JSON`` when set. CPU seconds include every subprocess
a test waited for (torchrun ranks, CLI runs: ``RUSAGE_CHILDREN``), so they stay comparable on a shared, loaded
machine where wall seconds do not. Setup of a module- or session-scoped fixture counts for the first test
that needs it.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict

import pytest

_COST: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # file -> [wall s, cpu s, tests]
_TESTS: dict[str, tuple[float, float]] = {}  # test id -> (wall s, cpu s)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, cpu = time.monotonic(), _cpu_seconds()
    yield
    wall, cpu = time.monotonic() - wall, _cpu_seconds() - cpu
    _TESTS[item.nodeid] = (round(wall, 1), round(cpu, 1))
    row = _COST[item.location[0]]
    row[0] += wall
    row[1] += cpu
    row[2] += 1


def pytest_terminal_summary(terminalreporter):
    rows = sorted(_COST.items(), key=lambda kv: -kv[1][1])
    write = terminalreporter.write_line
    write(f"{'file':60s} {'tests':>5s} {'wall s':>8s} {'cpu s':>8s}")
    for path, (wall, cpu, count) in rows:
        write(f"{path:60s} {count:5d} {wall:8.1f} {cpu:8.1f}")
    write(f"{'total':60s} {sum(r[2] for _, r in rows):5d} {sum(r[0] for _, r in rows):8.1f} "
          f"{sum(r[1] for _, r in rows):8.1f}")
    if target := os.environ.get("SUITE_COST_JSON"):
        with open(target, "w") as out:
            json.dump({"files": {path: {"tests": count, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
                                 for path, (wall, cpu, count) in rows},
                       "tests": {test: {"wall_s": wall, "cpu_s": cpu} for test, (wall, cpu) in _TESTS.items()}},
                      out, indent=1)
