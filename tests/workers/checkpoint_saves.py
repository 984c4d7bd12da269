"""Worker: save the tiny policy's checkpoint again and again (``--saves`` times), reporting each save.

Before the first save it prints ``children before: [...]``; after each save ``saved <i>: children [...]``, the
pids of its live child processes (``/proc``), so a test can see whether a save started any process.
"""

import argparse
import json
import os
from pathlib import Path

from nemo_viper.models.checkpoint import save_policy
from nemo_viper.models.policy import PolicyConfig, build_policy


def children() -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return sorted(pids)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--saves", type=int, default=1000)
    args = parser.parse_args()
    policy = build_policy(PolicyConfig(hf_path=args.hf, precision="fp32"))
    print(json.dumps({"children_before": children()}), flush=True)
    for i in range(args.saves):
        save_policy(policy, Path(args.out) / f"step_{i % 2}")
        print(json.dumps({"saved": i, "children": children()}), flush=True)


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
