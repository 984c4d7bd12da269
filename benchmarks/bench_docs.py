"""Where benchmark results go: one section per benchmark in ``docs/benchmarks.md``.

Each script in ``benchmarks/`` writes its own section (``## ...``) with :func:`write_section`, which
replaces only that section (or appends it), so the scripts can be rerun independently.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Figures are medians over repeats, measured side by side in one run on the 2-core CPU development
machine (no GPU). That machine is shared and noisy: compare figures within a section, not across runs.
Each section gives the command that reproduces it.
"""


def cpu_model() -> str:
    """The CPU's model name, for the machine line of a section."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def write_section(title: str, section: str) -> None:
    """Replace the section that starts with the heading ``title`` (``## ...``) by ``section``, or append it."""
    text = DOCS.read_text() if DOCS.exists() else HEADER
    section = section.rstrip("\n") + "\n\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text.rstrip("\n") + "\n")


def machine_line() -> str:
    """``<date>; <n> CPU cores (<model>), <GPU or not>, torch <version>, <n> torch thread(s)``."""
    from datetime import UTC, datetime

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{datetime.now(UTC):%Y-%m-%d}; {os.cpu_count()} CPU cores ({cpu_model()}), {gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)")


def reproduce_command() -> str:
    """The command line that reruns the calling benchmark with the same arguments, from the repo root."""
    import shlex
    import sys

    script = f"benchmarks/{Path(sys.argv[0]).name}"
    return "HF_HUB_OFFLINE=1 .venv/bin/python " + shlex.join([script, *sys.argv[1:]])
