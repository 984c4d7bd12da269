"""One writer per output directory: an exclusive, non-blocking ``flock`` beside the directory.

A job that writes a directory (a phase of the closed loop: ``tiny-model``, a synthesis shard task, an RL
stage, an export) holds ``<parent>/.<name>[.<part>].lock`` while it runs; a second writer of the same
directory (a rerun while an earlier run is still alive) fails at once with a one-line error naming the
directory and the holder, instead of interleaving its writes with the first one's. The lock belongs to the
open file, so the kernel releases it when the holder exits, however it dies; no stale lock survives a
``kill -9``. (Lustre needs the ``flock`` mount option; NFSv4 emulates ``flock`` with byte-range locks.)
"""

from __future__ import annotations

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from nemo_viper.errors import NemoViperError


class DirectoryBusyError(NemoViperError):
    """Another live process holds the writer lock of the directory; the message names both."""


def lock_path(directory: str | Path, part: str | None = None) -> Path:
    directory = Path(directory).absolute()
    return directory.with_name(f".{directory.name}{'.' + part if part else ''}.lock")


@contextmanager
def exclusive_writer(directory: str | Path, part: str | None = None):
    """Hold the writer lock of ``directory`` (or of its ``part``, e.g. one shard task's) for the block.

    Raises :class:`DirectoryBusyError` if another process holds it."""
    path = lock_path(directory, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            what = f"{directory}" + (f" ({part})" if part else "")
            raise DirectoryBusyError(
                f"{what} is being written by another process ({holder}); wait for it to end or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}".encode(), 0)
        yield path
    finally:
        os.close(fd)
