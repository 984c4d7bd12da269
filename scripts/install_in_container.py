#!/usr/bin/env python
"""Install nemo_viper into the NGC NeMo container (the project image's build step, see ./Dockerfile).

    python scripts/install_in_container.py [--lock container/requirements.lock]
                                           [--nodeps-lock container/requirements-nodeps.lock]
                                           [--vllm-lock container/requirements-vllm.lock] [--revision SHA]
                                           [--base-image IMAGE] [--info-out /opt/nemo_viper/BUILD_INFO.json]

Run it with the container's Python. It

1. checks the container's versions (torch, transformers, megatron-core, Megatron-Bridge) against the ranges
   the code needs (``nemo_viper/environment.py``) and stops if one is outside;
2. picks from the lock the packages the container lacks (absent, or at a version the project's
   ``pyproject.toml`` does not accept); the container's own versions of everything else are kept;
3. asks pip what installing them would do (``pip install --dry-run --report``) with the container-owned
   packages (torch, Transformer Engine, apex, megatron-core, Megatron-Bridge) and transformers pinned to
   their installed versions, and stops, having changed nothing, if pip cannot or would install any of them;
4. installs them; then the no-deps lock's entries ``--no-deps`` (packages whose declared dependencies would
   pull in what the image must not have, e.g. lmms-eval's wandb/spaCy/audio stacks and an unpinned
   torchvision; the checked lock holds the dependencies their code imports), each unless that exact version
   is already there; then vLLM (below); then the project itself (editable, ``--no-deps``);
5. checks that the container-owned packages are exactly as before, and writes the build info (revision,
   base image, versions, what was installed, the full ``pip freeze``) to ``--info-out``.

vLLM: a container that ships its own keeps it (owned like torch from then on), provided its version is in
``VLLM_VERSIONS`` (else the build stops: one line). Otherwise the vLLM lock's version is installed
``--no-deps``: its wheel when the wheel's torch requirement admits the container's torch, else built from
source against the container's torch (``--no-binary vllm --no-build-isolation``: the container's CUDA
toolkit compiles its kernels). Either way the container's torch stays.

Any failure exits with status 1 and one ``error:`` line. pip's index options come from the environment
(``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ``PIP_NO_INDEX``, ...).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nemo_viper.environment import (  # noqa: E402
    CONTAINER_OWNED,
    VLLM_VERSIONS,
    installed_versions,
    normalize,
    version_problems,
)

FROZEN = (*CONTAINER_OWNED, "transformers")  # transformers: the version the container's Megatron-Bridge runs with


class InstallError(Exception):
    pass


def read_lock(path: Path) -> dict[str, str]:
    """Normalized name -> ``name==version`` line of every entry (``#`` comments allowed)."""
    entries = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise InstallError(f"{path}:{number}: {line!r} is not an exact pin (name==version)")
        if normalize(requirement.name) in FROZEN:
            raise InstallError(f"{path}:{number}: {requirement.name} belongs to the container and cannot be locked")
        entries[normalize(requirement.name)] = line
    return entries


def project_specs() -> dict[str, Requirement]:
    """Normalized name -> the project's requirement on it (``pyproject.toml`` dependencies)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {normalize(Requirement(r).name): Requirement(r) for r in project.get("dependencies", [])}


def lacking(lock: dict[str, str], installed: dict[str, str]) -> list[str]:
    """The lock lines the container needs: absent packages, or versions the project does not accept."""
    specs = project_specs()
    needed = []
    for name, line in lock.items():
        have = installed.get(name)
        if have is None or (name in specs and not specs[name].specifier.contains(Version(have), prereleases=True)):
            needed.append(line)
    return needed


def pip(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], text=True,
                          capture_output=True, **kwargs)


def check_plan(requirements: list[str], constraints: Path, frozen: dict[str, str], owned: tuple[str, ...]) -> None:
    """Fail, having changed nothing, if installing ``requirements`` would touch a package in ``owned``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        result = pip("install", "--dry-run", "--quiet", "--report", str(report),
                     "-c", str(constraints), *requirements)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise InstallError("pip cannot install the lock without changing the container's packages: "
                               + " | ".join(lines[-6:]))
        planned = {normalize(item["metadata"]["name"]): item["metadata"]["version"]
                   for item in json.loads(report.read_text())["install"]}
    for name in owned:  # the report lists only what pip would install or replace
        if name in planned:
            now = f"{name} {frozen[name]}" if name in frozen else f"{name} (not in the container)"
            raise InstallError(f"installing the lock would replace {now} with {name} {planned[name]}; "
                               "the container's torch/TE/apex/megatron-core/Megatron-Bridge/transformers must stay")


def without_deps(lock: dict[str, str], nodeps: dict[str, str], installed: dict[str, str]) -> list[str]:
    """The no-deps lock lines to install: every entry the container does not have at exactly that version
    (its code's imports were checked for that version only)."""
    both = sorted(set(lock) & set(nodeps))
    if both:
        raise InstallError(f"{', '.join(both)} in both the lock and the no-deps lock")
    return [line for name, line in nodeps.items()
            if installed.get(name) != next(iter(Requirement(line).specifier)).version]


def wheel_torch_requirement(pin: str) -> SpecifierSet | None:
    """The torch requirement of the wheel pip would install for ``pin`` (``None``: no wheel, or no torch in it)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        result = pip("install", "--dry-run", "--quiet", "--no-deps", "--only-binary", ":all:", "--report",
                     str(report), pin)
        if result.returncode != 0:
            return None
        metadata = json.loads(report.read_text())["install"][0]["metadata"]
    for line in metadata.get("requires_dist", []):
        requirement = Requirement(line)
        if normalize(requirement.name) == "torch" and requirement.marker is None:
            return requirement.specifier
    return None


def vllm_install(vllm_lock: dict[str, str], installed: dict[str, str]) -> tuple[str, list[str]]:
    """How the image gets vLLM: ``("container <version>", [])`` (the container's own, kept) or
    ``("wheel" | "built against the container's torch", pip arguments)``; ``("none", [])`` without a vLLM lock."""
    have = installed.get("vllm")
    if have is not None:
        if Version(have) not in SpecifierSet(VLLM_VERSIONS, prereleases=True):
            raise InstallError(f"the container's vllm {have} is outside the supported range {VLLM_VERSIONS} "
                               "(the vLLM backend's calls are checked for that range; nemo_viper/environment.py)")
        return f"container {have}", []
    if not vllm_lock:
        return "none", []
    if set(vllm_lock) != {"vllm"}:
        raise InstallError(f"the vLLM lock holds {', '.join(sorted(vllm_lock))}; it pins vllm only")
    pin = vllm_lock["vllm"]
    torch_spec = wheel_torch_requirement(pin)
    if torch_spec is not None and torch_spec.contains(Version(installed["torch"]), prereleases=True):
        return "wheel", ["--no-deps", pin]
    return "built against the container's torch", ["--no-deps", "--no-build-isolation", "--no-binary", "vllm", pin]


def install(lock_path: Path, revision: str, base_image: str, info_out: Path | None, editable: bool = True,
            nodeps_lock_path: Path | None = None, vllm_lock_path: Path | None = None) -> dict:
    problems = version_problems()
    if problems:
        raise InstallError("; ".join(problems))
    before = installed_versions()
    vllm_source, vllm_args = vllm_install(read_lock(vllm_lock_path) if vllm_lock_path else {}, before)
    owned = (*FROZEN, "vllm") if "vllm" in before else FROZEN  # a container's own vLLM stays as it is
    frozen = {name: before[name] for name in owned if name in before}
    lock = read_lock(lock_path)
    needed = lacking(lock, before)
    no_deps = without_deps(lock, read_lock(nodeps_lock_path) if nodeps_lock_path else {}, before)
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "container-constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in frozen.items()))
        if needed:
            check_plan(needed, constraints, frozen, owned)
            result = pip("install", "-c", str(constraints), *needed)
            if result.returncode != 0:
                raise InstallError(f"pip install failed: {result.stderr.strip().splitlines()[-1]}")
        if no_deps:
            result = pip("install", "--no-deps", *no_deps)
            if result.returncode != 0:
                raise InstallError(f"pip install --no-deps failed: {result.stderr.strip().splitlines()[-1]}")
        if vllm_args:
            result = pip("install", *vllm_args)
            if result.returncode != 0:
                raise InstallError(f"installing {vllm_args[-1]} ({vllm_source}) failed: "
                                   f"{result.stderr.strip().splitlines()[-1]}")
        result = pip("install", "--no-deps", "--no-build-isolation", *(["-e"] if editable else []), str(REPO))
        if result.returncode != 0:
            raise InstallError(f"installing the project failed: {result.stderr.strip().splitlines()[-1]}")
    after = installed_versions()
    changed = [f"{n} {frozen.get(n)} -> {after.get(n)}" for n in owned if after.get(n) != frozen.get(n)]
    if changed:
        raise InstallError(f"container packages changed: {', '.join(changed)}")
    info = {
        "revision": revision,
        "base_image": base_image,
        "versions": {name: after[name] for name in (*owned, "nemo-viper") if name in after},
        "vllm": {"version": after.get("vllm"), "source": vllm_source},
        "installed_from_lock": needed,
        "installed_without_deps": no_deps,
        "pip_freeze": pip("freeze").stdout.splitlines(),
    }
    if info_out is not None:
        info_out.parent.mkdir(parents=True, exist_ok=True)
        info_out.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=REPO / "container" / "requirements.lock")
    parser.add_argument("--nodeps-lock", type=Path, default=REPO / "container" / "requirements-nodeps.lock",
                        help="exact pins installed --no-deps after the lock")
    parser.add_argument("--vllm-lock", type=Path, default=REPO / "container" / "requirements-vllm.lock",
                        help="the vLLM version installed when the container has none")
    parser.add_argument("--revision", default="unknown", help="the project's git revision (recorded)")
    parser.add_argument("--base-image", default="unknown", help="the NGC NeMo image built on (recorded)")
    parser.add_argument("--info-out", type=Path, help="where to write the build info JSON")
    args = parser.parse_args(argv)
    try:
        info = install(args.lock, args.revision, args.base_image, args.info_out,
                       nodeps_lock_path=args.nodeps_lock, vllm_lock_path=args.vllm_lock)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(f"nemo_viper {args.revision} installed; added {len(info['installed_from_lock'])} locked packages and "
          f"{len(info['installed_without_deps'])} without their dependencies; vLLM: {info['vllm']['source']}; "
          f"{versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
