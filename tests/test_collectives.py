"""All collectives go through nemo_viper.runtime.collectives, which places tensors on the group's device."""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch import run_worker
from nemo_viper.runtime import collectives

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "nemo_viper" / "runtime" / "collectives.py"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list", "gather", "gather_object", "irecv",
    "isend", "recv", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send",
    "_all_gather_base", "_reduce_scatter_base", "monitored_barrier",
}


def _direct_collective_calls(path: Path) -> list[str]:
    """``torch.distributed`` collectives called in ``path`` (via any alias or ``from`` import)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, functions = {"torch.distributed"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            functions |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            modules |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in functions:
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {func.id}")
        elif isinstance(func, ast.Attribute) and func.attr in COLLECTIVES and ast.unparse(func.value) in modules:
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(func)}")
    return found


def test_no_module_calls_torch_distributed_collectives_directly():
    sources = [p for d in ("nemo_viper", "launcher", "recipes", "benchmarks") for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 50
    offenders = [call for path in sources if path != HELPER for call in _direct_collective_calls(path)]
    assert offenders == [], f"call torch.distributed collectives through nemo_viper.runtime.collectives: {offenders}"


def test_the_scan_finds_direct_calls(tmp_path):
    """The scan itself catches every spelling (so the test above could fail)."""
    probe = REPO / "nemo_viper" / "_probe_collectives.py"
    probe.write_text(
        "import torch\nimport torch.distributed as dist\nfrom torch.distributed import all_gather as ag\n"
        "from torch import distributed\n"
        "dist.all_reduce(x)\ntorch.distributed.broadcast(x, 0)\nag([], x)\ndistributed.barrier()\ndist.get_rank()\n"
    )
    try:
        calls = _direct_collective_calls(probe)
    finally:
        probe.unlink()
    assert [c.split(" ")[1] for c in calls] == ["dist.all_reduce", "torch.distributed.broadcast", "ag",
                                                "distributed.barrier"]


@pytest.mark.parametrize(
    "backend, types",
    [("nccl", ("cuda",)), ("gloo", ("cpu",)), ("cpu:gloo,cuda:nccl", ("cpu", "cuda")), ("NCCL", ("cuda",))],
)
def test_backend_device_types(backend, types):
    assert collectives.backend_device_types(backend) == types


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown torch.distributed backend 'carrier-pigeon'"):
        collectives.backend_device_types("carrier-pigeon")


def test_nccl_group_places_cpu_tensors_on_the_current_cuda_device(monkeypatch):
    """A fake group whose backend reports NCCL: CPU metric/count tensors must travel on CUDA."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    counts = torch.tensor([5.0, 2.0], dtype=torch.float64)  # what the GRPO normaliser builds
    assert collectives.group_device(object(), counts) == torch.device("cuda", 3)
    assert collectives.group_device(object()) == torch.device("cuda", 3)
    cuda_tensor = torch.empty(2, device="meta")  # stands in for a tensor already on an accelerator
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,meta:fake")
    assert collectives.group_device(object(), cuda_tensor) == torch.device("meta")
    assert collectives.group_device(object(), counts) == torch.device("cpu")


def test_gloo_group_keeps_cpu_tensors(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.group_device(object(), torch.zeros(1)) == torch.device("cpu")


def test_collectives_hand_the_backend_device_to_torch(monkeypatch):
    """all_reduce / all_gather / broadcast pass torch a tensor on group_device and return the caller's device."""
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(collectives, "group_device", lambda group, tensor=None: torch.device("meta"))

    def fake_collective(name):
        def run(*args, **kwargs):
            tensors = args[0] if isinstance(args[0], list) else [args[0]]
            seen.append((name, {t.device.type for t in tensors} | {args[1].device.type} if name == "all_gather"
                         else {t.device.type for t in tensors}))
        return run

    for name in ("all_reduce", "all_gather", "broadcast"):
        monkeypatch.setattr(dist, name, fake_collective(name))
    # meta results cannot come back to the CPU: the helper must try exactly that last
    for call in (lambda t: collectives.all_reduce(t), lambda t: collectives.all_gather(t),
                 lambda t: collectives.broadcast(t, src=0)):
        with pytest.raises(NotImplementedError):
            call(torch.ones(3, dtype=torch.float64))
    assert seen == [("all_reduce", {"meta"}), ("all_gather", {"meta"}), ("broadcast", {"meta"})]


def test_single_rank_is_the_identity():
    values = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce(values) is values
    assert collectives.all_gather(values).tolist() == [[1.0, 2.0]]
    assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]
    collectives.barrier()


@pytest.mark.slow
def test_helper_on_two_gloo_ranks():
    result = run_worker("collectives_gloo.py", nproc=2)
    assert "collectives ok 0" in result.stdout and "collectives ok 1" in result.stdout
