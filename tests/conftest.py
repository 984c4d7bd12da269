"""Shared fixtures. Megatron runs in subprocesses (see launch.py): CPU mode patches process-wide state."""

import os
import signal
import time
import uuid

import pytest
from processes import SESSION_MARKER, orphans

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every process this test session starts inherits the marker (children copy os.environ), so leaks are
# recognised by it, never confused with other processes on the machine.
os.environ[SESSION_MARKER] = uuid.uuid4().hex


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
