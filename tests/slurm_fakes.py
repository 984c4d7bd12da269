"""Stand-ins for the Slurm commands a login node has (``sbatch``; ``srun --help`` with pyxis) and those a job
calls (``srun``, ``scontrol``, and ``python`` as the task script calls it), as executables on ``PATH``, so that
rendered scripts run with every command they would run recorded (the hostile-strings tests), and for what the
local cluster cannot show (pyxis; the code a ``cluster.code=package`` job is shipped). Each records its argv."""

import json
import os
from pathlib import Path

RECORD_ARGV = """#!{python}
import json, os, sys
with open(os.path.join({log!r}), "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
"""

SBATCH = RECORD_ARGV + """
counter = os.path.join({root!r}, "counter")
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1001
open(counter, "w").write(str(n))
import shutil
shutil.copy(sys.argv[-1], os.path.join({root!r}, f"job_{{n}}.sh"))
print(n)
"""

SRUN = RECORD_ARGV + """
if "--help" in sys.argv:
    print("      --container-image=[USER@][REGISTRY#]IMAGE[:TAG]|PATH")  # pyxis
if "hostname" in sys.argv:
    print("127.0.0.1")
"""

SCONTROL = RECORD_ARGV + """
print("node1")
"""


class FakeSlurm:
    def __init__(self, root: Path, python: str):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.log = root / "calls.jsonl"
        for name, body in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL), ("python", RECORD_ARGV)):
            path = self.bin / name
            path.write_text(body.format(python=python, log=str(self.log), root=str(root)))
            path.chmod(0o755)

    def env(self, **extra) -> dict:
        return {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", **extra}

    def calls(self, name: str) -> list[list[str]]:
        if not self.log.is_file():
            return []
        return [c[1:] for c in map(json.loads, self.log.read_text().splitlines()) if c[0] == name]
