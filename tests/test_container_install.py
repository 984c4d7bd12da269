"""The project image's install step (``scripts/install_in_container.py``, run by ``./Dockerfile``) against a
simulated NGC NeMo container: a fresh venv where torch, Transformer Engine, apex, megatron-core,
Megatron-Bridge and transformers are "preinstalled" (distributions with a module and a sentinel file each)
and must stay untouched. Packages come from a local wheel house (no index)."""

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from launch import copy_checkout

pytestmark = pytest.mark.slow

CONTAINER = {"torch": "2.13.0", "transformer_engine": "2.9.0", "apex": "0.1", "megatron_core": "0.19.2",
             "megatron_bridge": "0.6.2", "transformers": "5.12.1", "diffusers": "0.42.1"}
COPIED_FROM_DEV_VENV = ("packaging", "setuptools", "_distutils_hack")  # the NGC container has these too


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def write_wheel(house: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A minimal valid wheel: one module and its dist-info."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}.py": f"VERSION = {version!r}\n".encode(),
        f"{dist_info}/METADATA": ("Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
                                  + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(path, data) for path, data in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(house / f"{module}-{version}-py3-none-any.whl", "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3.*/site-packages"))


def make_container(root: Path, versions: dict[str, str]) -> Path:
    """A venv with ``versions`` preinstalled as dist-info + module + sentinel, plus packaging/setuptools."""
    venv = root / "container"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    site = site_packages(venv)
    for name, version in versions.items():
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
        (site / name / "SENTINEL").write_text(f"container build of {name}\n")
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text("")
        (info / "INSTALLER").write_text("container\n")
    dev_site = Path(sysconfig.get_paths()["purelib"])
    for package in COPIED_FROM_DEV_VENV:
        shutil.copytree(dev_site / package, site / package)
        for info in dev_site.glob(f"{package}-*.dist-info"):
            shutil.copytree(info, site / info.name)
    shutil.copy(dev_site / "distutils-precedence.pth", site)
    return venv


def snapshot(venv: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file of the container-owned packages."""
    site = site_packages(venv)
    files = {}
    for name, version in CONTAINER.items():
        for path in [*(site / name).rglob("*"), *(site / f"{name}-{version}.dist-info").rglob("*")]:
            if path.is_file() and "__pycache__" not in path.parts:
                files[str(path.relative_to(site))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """The checkout's files (the editable install writes its egg-info next to them)."""
    return copy_checkout(tmp_path_factory.mktemp("repo") / "nemo_viper")


@pytest.fixture(scope="module")
def wheel_house(tmp_path_factory):
    house = tmp_path_factory.mktemp("wheels")
    write_wheel(house, "viper-lacking", "1.0")  # the container lacks it: installed
    write_wheel(house, "viper-needs-numpy-free", "2.0", requires=("viper-lacking>=1",))
    write_wheel(house, "viper-greedy", "1.0", requires=("torch>=3",))  # would replace the container's torch
    write_wheel(house, "viper-pulls-te", "1.0", requires=("transformer_engine_cu12",))  # would add a TE build
    write_wheel(house, "transformer_engine_cu12", "9.0")
    # installed --no-deps: with its declared deps it would add viper-heavy and replace the container's transformers
    write_wheel(house, "viper-harness", "1.0", requires=("viper-heavy", "transformers>=6"))
    write_wheel(house, "viper-heavy", "1.0")
    write_wheel(house, "transformers", "6.0.0")
    # vLLM wheels built for the container's torch and for another one; both declare more than the engine needs
    write_wheel(house, "vllm", "0.32.0", requires=("torch==2.13.0", "viper-heavy"))
    write_wheel(house, "vllm", "0.32.5", requires=("torch==2.14.0", "viper-heavy"))
    return house


def run_install(venv: Path, repo: Path, lock_lines: list[str], house: Path, tmp_path: Path,
                nodeps_lines: tuple[str, ...] = (), vllm_lines: tuple[str, ...] = ()):
    lock, nodeps, vllm = tmp_path / "test.lock", tmp_path / "test-nodeps.lock", tmp_path / "test-vllm.lock"
    lock.write_text("# test lock\n" + "\n".join(lock_lines) + "\n")
    nodeps.write_text("# test no-deps lock\n" + "".join(f"{line}\n" for line in nodeps_lines))
    vllm.write_text("# test vLLM lock\n" + "".join(f"{line}\n" for line in vllm_lines))
    env = {"PATH": "/usr/bin:/bin", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(house), "HOME": str(tmp_path)}
    return subprocess.run([str(venv / "bin" / "python"), str(repo / "scripts" / "install_in_container.py"),
                           "--lock", str(lock), "--nodeps-lock", str(nodeps), "--vllm-lock", str(vllm),
                           "--revision", "abc123", "--base-image", "nvcr.io/nvidia/nemo:26.08",
                           "--info-out", str(tmp_path / "BUILD_INFO.json")],
                          capture_output=True, text=True, env=env, timeout=600)


def test_installs_what_the_container_lacks_and_leaves_its_stack_untouched(tmp_path, repo_copy, wheel_house):
    venv = make_container(tmp_path, CONTAINER)
    before = snapshot(venv)
    result = run_install(venv, repo_copy, ["viper-needs-numpy-free==2.0", "diffusers==0.42.1"], wheel_house, tmp_path,
                         nodeps_lines=("viper-harness==1.0",))
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(venv) == before, "a container-owned package was modified"
    info = json.loads((tmp_path / "BUILD_INFO.json").read_text())
    assert info["revision"] == "abc123" and info["base_image"] == "nvcr.io/nvidia/nemo:26.08"
    assert info["installed_from_lock"] == ["viper-needs-numpy-free==2.0"]  # diffusers: the container has it
    assert info["installed_without_deps"] == ["viper-harness==1.0"]
    assert info["versions"]["torch"] == "2.13.0" and info["versions"]["nemo-viper"] == "0.1.0"
    assert info["versions"]["transformers"] == "5.12.1"
    assert "viper-lacking==1.0" in info["pip_freeze"] and "viper-harness==1.0" in info["pip_freeze"]
    assert not any(line.startswith("viper-heavy") for line in info["pip_freeze"]), "a no-deps entry's deps came along"
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import viper_lacking, viper_harness, nemo_viper.environment"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("entry,message", [
    ("viper-greedy==1.0", "pip cannot install the lock without changing the container's packages"),
    ("viper-pulls-te==1.0", "would replace transformer-engine 2.9.0 with transformer-engine 9.0"),
    ("nodeps:megatron-core==0.19.2", "megatron-core belongs to the container and cannot be locked"),
])
def test_build_fails_before_changing_anything_if_the_lock_would_replace_the_stack(
        entry, message, tmp_path, repo_copy, wheel_house):
    venv = make_container(tmp_path, CONTAINER)
    before = snapshot(venv)
    lock, nodeps = (["viper-lacking==1.0"], (entry.removeprefix("nodeps:"),)) if entry.startswith("nodeps:") \
        else (["viper-lacking==1.0", entry], ())
    result = run_install(venv, repo_copy, lock, wheel_house, tmp_path, nodeps_lines=nodeps)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert snapshot(venv) == before
    assert not list(site_packages(venv).glob("viper_lacking*")), "nothing is installed when the plan fails"


def test_a_containers_own_vllm_in_the_supported_range_is_kept(tmp_path, repo_copy, wheel_house):
    venv = make_container(tmp_path, {**CONTAINER, "vllm": "0.32.1"})
    sentinel = site_packages(venv) / "vllm" / "SENTINEL"
    result = run_install(venv, repo_copy, ["viper-lacking==1.0"], wheel_house, tmp_path, vllm_lines=("vllm==0.32.0",))
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "BUILD_INFO.json").read_text())
    assert info["vllm"] == {"version": "0.32.1", "source": "container 0.32.1"}
    assert sentinel.read_text() == "container build of vllm\n"


def test_a_containers_vllm_outside_the_supported_range_stops_the_build(tmp_path, repo_copy, wheel_house):
    venv = make_container(tmp_path, {**CONTAINER, "vllm": "0.20.1"})
    result = run_install(venv, repo_copy, ["viper-lacking==1.0"], wheel_house, tmp_path, vllm_lines=("vllm==0.32.0",))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: the container's vllm 0.20.1 is outside the supported range >=0.32,<0.33")
    assert not list(site_packages(venv).glob("viper_lacking*")), "nothing is installed"


def test_without_a_container_vllm_the_wheel_for_its_torch_comes_without_dependencies(tmp_path, repo_copy,
                                                                                        wheel_house):
    venv = make_container(tmp_path, CONTAINER)
    before = snapshot(venv)
    result = run_install(venv, repo_copy, ["viper-lacking==1.0"], wheel_house, tmp_path, vllm_lines=("vllm==0.32.0",))
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "BUILD_INFO.json").read_text())
    assert info["vllm"] == {"version": "0.32.0", "source": "wheel"}
    assert snapshot(venv) == before and info["versions"]["torch"] == "2.13.0"
    assert not any(line.startswith("viper-heavy") for line in info["pip_freeze"]), "vLLM's declared deps came along"


def test_a_vllm_wheel_for_another_torch_is_built_against_the_containers_instead(tmp_path, repo_copy, wheel_house):
    """The wheel needs torch 2.14.0: the installer builds from source (no sdist in this house: the build step
    fails, and says so), never installing that wheel or another torch."""
    venv = make_container(tmp_path, CONTAINER)
    before = snapshot(venv)
    result = run_install(venv, repo_copy, ["viper-lacking==1.0"], wheel_house, tmp_path, vllm_lines=("vllm==0.32.5",))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: installing vllm==0.32.5 (built against the container's torch) failed")
    assert snapshot(venv) == before and not list(site_packages(venv).glob("vllm-*"))


def test_build_fails_on_an_unsupported_transformers(tmp_path, repo_copy, wheel_house):
    venv = make_container(tmp_path, {**CONTAINER, "transformers": "4.57.0"})
    result = run_install(venv, repo_copy, ["viper-lacking==1.0"], wheel_house, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: transformers 4.57.0 is outside the supported range >=5.3,<6")


def test_the_project_locks_are_exact_pins_of_the_tested_environment():
    """container/requirements.lock and requirements-nodeps.lock: exact pins, none container-owned, none in
    both, each the version of constraints.txt (the tested CPU environment); lmms-eval only without its deps."""
    import importlib.util

    from launch import REPO

    spec = importlib.util.spec_from_file_location("install_in_container", REPO / "scripts" / "install_in_container.py")
    installer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installer)
    lock = installer.read_lock(REPO / "container" / "requirements.lock")
    nodeps = installer.read_lock(REPO / "container" / "requirements-nodeps.lock")
    assert installer.without_deps(lock, nodeps, {}) == list(nodeps.values())
    assert {"lmms-eval", "qwen-vl-utils"} <= set(nodeps) and "lmms-eval" not in lock
    assert {"sacrebleu", "evaluate", "loguru", "tenacity"} <= set(lock)
    tested = {installer.normalize(name): version for name, _, version in
              (line.split("#")[0].strip().partition("==") for line in (REPO / "constraints.txt").read_text().splitlines())
              if version}
    pins = {name: next(iter(installer.Requirement(line).specifier)).version for name, line in {**lock, **nodeps}.items()}
    assert {name: (v, tested[name]) for name, v in pins.items() if name in tested and v != tested[name]} == {}
    assert set(pins) - set(tested) == {"nvidia-dali-cuda130"}  # the container's CUDA build of the tested DALI
