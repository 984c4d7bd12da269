"""The processes of this test session, recognised by a marker in their environment (set by conftest.py)."""

import os
from pathlib import Path

SESSION_MARKER = "NEMO_VIPER_TEST_SESSION"


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
