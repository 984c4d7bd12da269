"""Run-dir and writer locks where ``flock`` is unavailable (Lustre mounted without ``flock``): the heartbeat lock
file refuses a second holder, naming host and pid; a lock left by a killed holder is taken over; a contended
take-over lets exactly one process in. ``flock`` is disabled in every process (``fcntl.flock`` raises ENOSYS)."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from launch import REPO

from nemo_viper.runtime import locks

NO_FLOCK = """
import errno, fcntl
def no_flock(*args):
    raise OSError(errno.ENOSYS, "Function not implemented")
fcntl.flock = no_flock
"""
HOLDER = NO_FLOCK + """
import sys, time
from pathlib import Path
from nemo_viper.runtime import locks
locks.HEARTBEAT_S = 0.1
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
try:
    with locks.exclusive_writer(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
except locks.DirectoryBusyError as exc:
    print("refused:", exc, flush=True)
"""


@pytest.fixture
def no_flock(monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)


def holder(target, go, seconds):
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(target), str(go), str(seconds)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)


def test_without_flock_a_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(no_flock, tmp_path):
    target = tmp_path / "run"
    go = tmp_path / "go"
    go.touch()
    first = holder(target, go, 60)
    try:
        assert first.stdout.readline().strip() == "held"
        held = locks.lock_path(target).with_name(locks.lock_path(target).name + ".held")
        record = json.loads(held.read_text())
        assert record["pid"] == first.pid and record["host"] == socket.gethostname()
        beat = held.stat().st_mtime
        time.sleep(0.5)
        assert held.stat().st_mtime > beat, "the holder's heartbeat does not touch its lock file"
        with pytest.raises(locks.DirectoryBusyError, match=rf"pid {first.pid} on {socket.gethostname()}"):
            with locks.exclusive_writer(target):
                pass
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert held.exists()  # a killed holder cannot clean up: the file stays, stale
    with locks.exclusive_writer(target):
        assert json.loads(held.read_text())["pid"] == os.getpid()
    assert not held.exists()


def test_without_flock_a_holder_on_another_node_counts_until_its_heartbeat_stops(no_flock, tmp_path):
    target = tmp_path / "run"
    held = locks.lock_path(target).with_name(locks.lock_path(target).name + ".held")
    held.parent.mkdir(parents=True, exist_ok=True)
    held.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": "1", "pid_ns": "x",
                                "command": "nemo-viper run", "token": "t"}))
    with pytest.raises(locks.DirectoryBusyError, match="pid 1 on node-elsewhere: nemo-viper run"):
        with locks.exclusive_writer(target):
            pass
    old = time.time() - locks.STALE_AFTER_S - 5
    os.utime(held, (old, old))
    with locks.exclusive_writer(target):
        assert json.loads(held.read_text())["host"] == socket.gethostname()


def test_without_flock_a_contended_take_over_lets_one_process_in(tmp_path):
    """Four processes find the same stale lock (its holder's pid is gone) at once: one holds it, three are
    refused naming that one."""
    target = tmp_path / "run"
    held = locks.lock_path(target).with_name(locks.lock_path(target).name + ".held")
    held.parent.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "0",
                                "pid_ns": os.readlink("/proc/self/ns/pid"), "command": "dead", "token": "old"}))
    outputs, winner = contend(target, tmp_path / "go", 4)
    assert sorted(o.split(":")[0] for o in outputs) == ["held", "refused", "refused", "refused"], outputs
    assert all(f"pid {winner} on" in o for o in outputs if o.startswith("refused")), outputs


def test_without_flock_contenders_for_a_free_lock_never_read_a_half_written_record(tmp_path):
    """Six processes take a free lock at once, three times: every refusal names the one that holds it (a
    refusal that read the lock file between its creation and its record would name ``pid ?``)."""
    for attempt in range(3):
        outputs, winner = contend(tmp_path / f"run{attempt}", tmp_path / f"go{attempt}", 6)
        assert sorted(o.split(":")[0] for o in outputs) == ["held"] + ["refused"] * 5, outputs
        assert all(f"pid {winner} on" in o for o in outputs if o.startswith("refused")), outputs


def contend(target, go, processes):
    """Start ``processes`` holders of ``target``'s lock, release them together; their outputs and the winner's pid."""
    procs = [holder(target, go, 2) for _ in range(processes)]
    time.sleep(1.0)  # all started and waiting for the go file
    go.touch()
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    return outputs, (procs[outputs.index("held")].pid if "held" in outputs else None)


def test_a_take_over_decided_on_an_old_reading_leaves_a_lock_taken_since_alone(tmp_path):
    """The race a contended take-over must survive: B read the dead holder's record, A took the lock over and
    holds it, then B acts on its old reading. A's lock stays; B's break file is gone again."""
    held = tmp_path / ".run.lock.held"
    dead = {"host": socket.gethostname(), "pid": 0, "token": "dead"}
    held.write_text(json.dumps({**dead, "pid": os.getpid(), "token": "fresh"}))
    locks._take_over(held, dead)
    assert json.loads(held.read_text())["token"] == "fresh"
    assert not held.with_name(held.name + ".break").exists()
    held.write_text(json.dumps(dead))
    locks._take_over(held, dead)
    assert not held.exists()
