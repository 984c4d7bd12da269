"""Worker: a stand-in for a long phase process (run under torchrun). It imports nemo_viper like every
phase does, starts a ``spawn`` multiprocessing child (as megatron-core or a data loader may), records
``<pid> <parent pid>`` of itself and of the child as files in ``--pids``, and sleeps."""

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import nemo_viper  # noqa: F401  (what every phase process imports first)


def record(directory: str) -> None:
    Path(directory, str(os.getpid())).write_text(f"{os.getpid()} {os.getppid()}\n")


def child(directory: str) -> None:
    record(directory)
    time.sleep(600)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pids", required=True)
    args = parser.parse_args()
    helper = multiprocessing.get_context("spawn").Process(target=child, args=(args.pids,))
    helper.start()
    record(args.pids)
    time.sleep(600)


if __name__ == "__main__":
    main()
