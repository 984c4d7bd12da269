"""Run a script or the CLI in fresh processes (``torchrun`` for several ranks) and check the outcome."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from nemo_viper.runtime.lifetime import run_job, start_job

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def copy_checkout(target: Path) -> Path:
    """The tracked and untracked-but-not-ignored files of the checkout at ``target`` (as ``COPY .`` and a
    clone see them); symlinks stay symlinks."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        source, copy = REPO / rel, target / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            copy.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, copy)
    return target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(args: list[str], nproc: int = 1, timeout: int = 300, gpu: bool = False) -> subprocess.CompletedProcess:
    """``python <args>`` on ``nproc`` ranks; fails the test on a non-zero exit.

    Several ranks run under ``python -m torch.distributed.run --nproc-per-node nproc``; one rank runs as
    ``python <args>`` with the environment torchrun would give it (rank 0 of 1, a free master port), as
    ``nemo-viper run`` starts its one-process phases: the launcher would cost several CPU-seconds and
    seconds of rendezvous per job (measured: a no-op script under torchrun 9 CPU-s, alone 0.05). Without
    ``gpu`` the ranks see no GPU (conftest hides it from every subprocess): the CPU suite runs the same gloo /
    CPU-mode path on a GPU machine as in CI (and any number of ranks fits on one GPU)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if gpu:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("NEMO_VIPER_TEST_GPUS", "")
    if nproc == 1:
        command = [sys.executable, *args]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                   f"--master-port={_free_port()}", *args]
    result = run_job(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


def start_python(*args: str, **popen_kwargs) -> subprocess.Popen:
    """``python <args>`` (a worker script or ``-m nemo_viper.cli ...``) in the repo, output captured as text; the
    process and its children die with the test process (:func:`nemo_viper.runtime.lifetime.start_job`)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    return start_job([sys.executable, *args], env=env, cwd=REPO, text=True, **popen_kwargs)


def run_worker(name: str, *args: str, nproc: int = 1, gpu: bool = False, timeout: int = 300):
    return run_ranks([str(WORKERS / name), *args], nproc=nproc, gpu=gpu, timeout=timeout)


def run_cli(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return run_ranks(["-m", "nemo_viper.cli", *args], nproc=nproc)
