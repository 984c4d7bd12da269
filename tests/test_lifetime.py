"""No process outlives its job: killed starters take their phases (torchrun, its workers, their children) with
them, a checkpoint save starts no process, one writer per output directory, and the suite's orphan check
sees an orphan."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import orphans
from launch import WORKERS, _free_port, start_python

from nemo_viper.cli import main
from nemo_viper.runtime.locks import DirectoryBusyError, exclusive_writer


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


DRIVER = "import sys; from nemo_viper.runtime.lifetime import run_job; run_job(sys.argv[1:])"


@pytest.mark.slow
def test_kill_9_of_the_starter_kills_torchrun_its_workers_and_their_children(tmp_path):
    """What ``nemo-viper run`` does with an RL phase (``run_job`` of a torchrun), killed with SIGKILL."""
    pids = tmp_path / "pids"
    pids.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
                str(WORKERS / "sleeper.py"), "--pids", str(pids)]
    driver = start_python("-c", DRIVER, *torchrun)
    wait_until(lambda: len(list(pids.iterdir())) == 4 or driver.poll() is not None, 120,
               "2 workers and their 2 children did not start")
    assert driver.poll() is None, driver.communicate()
    started = {int(p.name): int(p.read_text().split()[1]) for p in pids.iterdir()}
    workers = [pid for pid, parent in started.items() if parent not in started]
    (torchrun_pid,) = {started[pid] for pid in workers}
    assert alive(torchrun_pid) and len(workers) == 2

    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    wait_until(lambda: not any(alive(pid) for pid in [torchrun_pid, *started]), 30,
               f"left behind: {[pid for pid in [torchrun_pid, *started] if alive(pid)]}")


@pytest.mark.slow
def test_a_checkpoint_save_starts_no_process_and_a_kill_during_one_leaves_none(tiny_hf_dir, tmp_path):
    """megatron-core's save used to start a spawn Manager and the resource tracker, orphaned by a kill."""
    out = tmp_path / "ckpt"
    worker = start_python(str(WORKERS / "checkpoint_saves.py"), "--hf", str(tiny_hf_dir), "--out", str(out))
    reports = []
    for line in worker.stdout:
        if line.startswith("{"):
            reports.append(json.loads(line))
        if len(reports) == 2:
            break
    assert len(reports) == 2, worker.communicate()[1][-4000:]
    assert reports == [{"children_before": []}, {"saved": 0, "children": []}]
    wait_until(lambda: any(out.glob(".step_*.partial/model")) or worker.poll() is not None, 120,
               "no later save started")
    os.kill(worker.pid, signal.SIGKILL)  # during a save
    worker.wait()
    time.sleep(1)
    assert not orphans()


def test_a_second_writer_of_a_directory_is_refused_until_the_first_dies(tmp_path):
    out = tmp_path / "rl1"
    holder = start_python("-c", "import sys, time; from nemo_viper.runtime.locks import exclusive_writer\n"
                                f"with exclusive_writer({str(out)!r}):\n    print('held', flush=True); time.sleep(600)")
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DirectoryBusyError, match=rf"^{out} is being written by another process \(pid {holder.pid}: "):
        with exclusive_writer(out):
            pass
    with exclusive_writer(out, part="task1"):  # another part of the same directory (another shard task)
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with exclusive_writer(out):  # the kernel released the dead holder's lock
        pass


def test_cli_refuses_a_second_writer_with_one_line(tmp_path, capsys):
    out = tmp_path / "base_model"
    with exclusive_writer(out):
        assert main(["tiny-model", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out} is being written by another process (pid {os.getpid()}") and "\n" not in err
    assert not out.exists()


def test_the_suites_orphan_check_sees_an_orphan():
    """The session fixture's check (tests/conftest.py) finds a process of this session whose parent died."""
    starter = start_python("-c", "import subprocess, sys; p = subprocess.Popen(['sleep', '600'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    orphan = int(starter.communicate(timeout=60)[0])
    try:
        wait_until(lambda: orphan in orphans(), 10, "the orphaned sleep was not reported")
        assert "sleep 600" in orphans()[orphan][1]
    finally:
        os.kill(orphan, signal.SIGKILL)
    wait_until(lambda: orphan not in orphans(), 10, "the orphan did not go")


def test_run_job_stops_the_whole_group_on_timeout(tmp_path):
    from nemo_viper.runtime.lifetime import run_job

    code = "import subprocess, time; p = subprocess.Popen(['sleep', '600'], stdout=subprocess.DEVNULL); print(p.pid, flush=True); time.sleep(600)"
    pid_file = tmp_path / "pid"
    with open(pid_file, "w") as out, pytest.raises(subprocess.TimeoutExpired):
        run_job([sys.executable, "-c", code], stdout=out, timeout=15)
    grandchild = int(pid_file.read_text())
    wait_until(lambda: not alive(grandchild), 10, "the group outlived the timeout")
