"""One writer per output directory, and one owner per run directory: exclusive locks that work on cluster file
systems.

A job that writes a directory (a phase of the closed loop: ``tiny-model``, a synthesis shard task, an RL
stage, an export) holds ``<parent>/.<name>[.<part>].lock`` while it runs; ``nemo-viper run`` and ``launch``
hold ``<parent>/.<run_dir>.owner.lock`` (:func:`run_dir_owner`) before they touch anything of the run. A
second writer fails at once with a one-line error naming the directory and the holder, instead of
interleaving its writes with the first one's. ``state.json`` and a dataset's manifest merge wait for the same
kind of lock (:func:`hold` with ``wait=True``).

Two mechanisms, chosen per lock when it is taken:

- **``flock``** on the lock file (local disks, NFSv4, Lustre mounted with ``flock``). The lock belongs to the
  open file, so the kernel releases it when the holder exits, however it dies.
- **A lock file with a heartbeat**, where ``flock`` is not available (``ENOSYS``/``EOPNOTSUPP``/``ENOLCK``:
  Lustre mounted without ``flock``, its default, and other file systems without it): ``<lock>.held`` holds
  the holder's host, pid, process start time, pid namespace and command, and is published whole: written to a
  file of the taker's own, then hard-linked to its name (``link(2)`` fails if the name exists, atomically on
  those file systems), so no contender ever reads a half-written record; a thread of the holder touches it every :data:`HEARTBEAT_S` seconds. A
  held lock is **stale** when its holder is on this host, in this pid namespace, and that process is gone
  (or the pid now belongs to a process started at another time), or, for any holder, when its heartbeat
  stopped :data:`STALE_AFTER_S` seconds ago (a dead node). A stale lock is taken over under a second
  ``O_EXCL`` file (``<lock>.held.break``), after checking that the file still holds the dead holder's token,
  so two contenders cannot both take it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from nemo_viper.errors import NemoViperError

HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0  # 12 missed heartbeats: the holder's node is gone
POLL_S = 0.2  # how often a waiting taker looks again (heartbeat locks only; flock waits in the kernel)
FLOCK_UNAVAILABLE = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}


class DirectoryBusyError(NemoViperError):
    """Another live process holds the writer lock of the directory; the message names both."""


class LockHeld(Exception):
    """``hold(..., wait=False)`` found the lock taken; ``holder`` describes the holder."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def lock_path(directory: str | Path, part: str | None = None) -> Path:
    directory = Path(directory).absolute()
    return directory.with_name(f".{directory.name}{'.' + part if part else ''}.lock")


@contextmanager
def exclusive_writer(directory: str | Path, part: str | None = None):
    """Hold the writer lock of ``directory`` (or of its ``part``, e.g. one shard task's) for the block.

    Raises :class:`DirectoryBusyError` if another process holds it."""
    path = lock_path(directory, part)
    try:
        with hold(path, wait=False):
            yield path
    except LockHeld as busy:
        what = f"{directory}" + (f" ({part})" if part else "")
        raise DirectoryBusyError(
            f"{what} is being written by another process ({busy.holder}); wait for it to end or stop it"
        ) from None


@contextmanager
def run_dir_owner(run_dir: str | Path):
    """Own ``run_dir`` for the block (``run``, ``launch``): a second owner is refused with one line before it
    has written anything."""
    try:
        with hold(lock_path(run_dir, "owner"), wait=False):
            yield
    except LockHeld as busy:
        raise DirectoryBusyError(
            f"{Path(run_dir).absolute()} is in use by another run ({busy.holder}); wait for it to end or stop it"
        ) from None


@contextmanager
def hold(path: str | Path, wait: bool):
    """Hold the exclusive lock ``path`` for the block: ``flock``, or the heartbeat lock file where ``flock`` is
    unavailable (module docstring). ``wait=False``: raise :class:`LockHeld` if it is taken."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeld(os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process") from None
        except OSError as exc:
            if exc.errno not in FLOCK_UNAVAILABLE:
                raise
            os.close(fd)
            fd = -1
        if fd >= 0:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {_command()}".encode(), 0)
            yield
            return
        with _heartbeat_lock(path.with_name(path.name + ".held"), wait):
            yield
    finally:
        if fd >= 0:
            os.close(fd)


def _command() -> str:
    return " ".join(sys.argv)[:200]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or None if
    there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # corrupt (records are published whole): judged by its age alone
        return {}


def _describe(holder: dict, age: float) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}: {holder.get('command', '?')}; "
            f"heartbeat {age:.0f} s ago")


def _is_stale(holder: dict, age: float) -> bool:
    if age > STALE_AFTER_S:
        return True
    same_process_space = holder.get("host") == socket.gethostname() and holder.get("pid_ns") == _pid_namespace()
    if not same_process_space or "pid" not in holder:
        return False
    return _process_start(int(holder["pid"])) != holder.get("started")


def _take_over(path: Path, stale: dict) -> None:
    """Remove ``path`` if it still holds ``stale``'s token, under the ``O_EXCL`` break file."""
    breaker = path.with_name(path.name + ".break")
    try:
        os.close(os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        try:
            if time.time() - breaker.stat().st_mtime > STALE_AFTER_S:  # its taker died while taking over
                breaker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return
    try:
        current = _read_holder(path)
        if current is not None and current.get("token") == stale.get("token"):
            path.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


@contextmanager
def _heartbeat_lock(path: Path, wait: bool):
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
          "pid_ns": _pid_namespace(), "command": _command(), "token": uuid.uuid4().hex}
    staging = path.with_name(f"{path.name}.{me['token']}")
    with open(staging, "w") as f:
        json.dump(me, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        while True:
            try:
                os.link(staging, path)
                break
            except FileExistsError:
                pass
            holder = _read_holder(path)
            if holder is None:  # released meanwhile
                continue
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if _is_stale(holder, age):
                _take_over(path, holder)
                continue
            if not wait:
                raise LockHeld(_describe(holder, age)) from None
            time.sleep(POLL_S)
    finally:
        staging.unlink(missing_ok=True)
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except FileNotFoundError:
                return

    beater = threading.Thread(target=beat, name=f"lock heartbeat {path.name}", daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()
        holder = _read_holder(path)
        if holder is not None and holder.get("token") == me["token"]:
            path.unlink(missing_ok=True)
