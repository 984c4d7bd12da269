"""Process lifetime: no process outlives the job (or the test) that started it.

Three mechanisms, all Linux (elsewhere they degrade to plain subprocesses):

1. :func:`run_job` starts a child command (a phase of ``nemo-viper run``, a ``torchrun`` of the tests) in
   its own process group, with ``PR_SET_PDEATHSIG = SIGKILL`` set between ``fork`` and ``exec``: if the
   starting process dies, even by ``kill -9``, the kernel kills the child. When the start fails or is
   interrupted (an exception, Ctrl-C, a timeout) the whole group is terminated, then killed.
2. The child's environment carries :data:`ENV_FLAG`; every process that imports :mod:`nemo_viper` with the
   flag set (the CLI, ``torchrun`` workers running ``-m nemo_viper.cli`` or a test worker, ``spawn``-ed
   multiprocessing children, which re-import the parent's main module) calls :func:`die_with_parent` on
   itself (``nemo_viper/__init__.py``). The chain ``run -> torchrun -> workers -> their children`` thus
   dies from the top down, whichever link is killed.
3. megatron-core's checkpoint save runs a ``spawn`` multiprocessing ``Manager`` (a server process, plus the
   multiprocessing resource tracker) only to carry its writer threads' results back to the saving process;
   it outlived a killed job. :func:`keep_checkpoint_writes_in_process` replaces it with an in-process
   queue, which is all a synchronous save needs: no save starts a process at all.

``PR_SET_PDEATHSIG`` fires when the parent *thread* that forked the child exits; every process this
project starts is started from its parent's main thread. A process whose parent died before it could
set the signal (it has been reparented to init, pid 1) exits at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

ENV_FLAG = "NEMO_VIPER_DIE_WITH_PARENT"
"""Set to ``1`` in the environment of every process :func:`run_job` starts (inherited by their children)."""

PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")
# Resolved once in the parent: after fork (preexec_fn) only the foreign call runs, no dlopen.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if _LINUX else None


def die_with_parent(expected_parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent exits; exit now if the parent is gone already
    (the parent is not ``expected_parent``, or, when that is unknown, this process was reparented to pid 1)."""
    if _prctl is None:
        return
    if _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    parent = os.getppid()
    if (expected_parent is not None and parent != expected_parent) or (expected_parent is None and parent == 1):
        os._exit(1)


def follow_parent_from_env() -> None:
    """:func:`die_with_parent` if this process was started (directly or not) by :func:`run_job`."""
    if os.environ.get(ENV_FLAG) == "1":
        die_with_parent()


def start_job(command: list[str], *, env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start ``command`` in a new process group that dies with this process (see the module docstring)."""
    parent = os.getpid()
    env = dict(os.environ if env is None else env, **{ENV_FLAG: "1"})
    return subprocess.Popen(command, env=env, start_new_session=True,
                            preexec_fn=(lambda: die_with_parent(parent)) if _LINUX else None, **popen_kwargs)


def stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM ``process``'s group, SIGKILL it after ``grace_s`` seconds, and reap ``process``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # members of the group may outlive its leader by a moment
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_job(command: list[str], *, timeout: float | None = None, env: dict | None = None,
            **popen_kwargs) -> subprocess.CompletedProcess:
    """:func:`start_job`, wait for it (``input``/``capture_output`` as in :func:`subprocess.run`), and stop its
    whole group if this wait ends any other way than by the command exiting (raising the error)."""
    input_data = popen_kwargs.pop("input", None)
    if popen_kwargs.pop("capture_output", False):
        popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input_data is not None:
        popen_kwargs["stdin"] = subprocess.PIPE
    process = start_job(command, env=env, **popen_kwargs)
    try:
        stdout, stderr = process.communicate(input_data, timeout=timeout)
    except BaseException:
        stop_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def keep_checkpoint_writes_in_process() -> None:
    """Make megatron-core's distributed-checkpoint save pass write results through an in-process queue
    instead of a ``spawn`` multiprocessing ``Manager`` server (see the module docstring).

    megatron-core 0.19's ``FileSystemWriterAsync`` (used by every ``torch_dist`` save) creates that queue once
    per process in ``get_write_results_queue`` and only uses it from threads of the saving process when the
    save is synchronous, which every save of this project is (``async_sharded_save=False``)."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
