"""Shared fixtures. Megatron runs in subprocesses (see launch.py): CPU mode patches process-wide state."""

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SESSION_MARKER = "NEMO_VIPER_TEST_SESSION"
# Every process this test session starts inherits the marker (children copy os.environ), so leaks are
# recognised by it, never confused with other processes on the machine.
os.environ[SESSION_MARKER] = uuid.uuid4().hex


def session_processes() -> dict[int, tuple[int, str]]:
    """``pid -> (parent pid, command line)`` of the live processes carrying this session's marker."""
    marker = f"{SESSION_MARKER}={os.environ[SESSION_MARKER]}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            found[int(entry.name)] = (parent, command)
    return found


def orphans() -> dict[int, tuple[int, str]]:
    """This session's processes that outlived the process that started them: their parent is neither
    this pytest process nor another process of the session (they were reparented to init or a subreaper)."""
    live = session_processes()
    return {pid: info for pid, info in live.items() if info[0] != os.getpid() and info[0] not in live}


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite():
    """Fail the session if a process it started is left behind, orphaned (e.g. a killed job's helper)."""
    yield
    deadline = time.monotonic() + 10  # a killed process's children get their parent-death signal promptly
    while (left := orphans()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:  # ours by the session marker: clean up, then report
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "processes outlived the tests that started them: " + "; ".join(
        f"pid {pid} (parent {parent}): {command[:200]}" for pid, (parent, command) in left.items())


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL HF checkpoint written by the project's own builder."""
    from nemo_viper.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")
