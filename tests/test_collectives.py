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


@pytest.fixture(scope="module")
def two_gloo_ranks(tmp_path_factory):
    """One 2-rank gloo job serves both tests below: ``(stdout, [rank 0 results, rank 1 results])``."""
    out = tmp_path_factory.mktemp("gloo")
    result = run_worker("collectives_gloo.py", "--out", str(out), nproc=2)
    return result.stdout, [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.slow
def test_helper_on_two_gloo_ranks(two_gloo_ranks):
    stdout, _ = two_gloo_ranks
    assert "collectives ok 0" in stdout and "collectives ok 1" in stdout


def _float64_reference() -> dict[str, float]:
    """Every metric of both ranks as one process computes it in float64 from the ranks' inputs: the loss
    metrics on all rows at once (one call, no split), the rollout statistics by their definitions (means and
    stds of the ranks averaged, extremes global), the replicated gradient norm as it is."""
    from workers.collectives_gloo import LOSS, loss_inputs, rollout_inputs

    from nemo_viper.algorithms import ClippedPolicyLoss, LossNormalizer, group_advantages

    full = loss_inputs()
    loss, metrics = ClippedPolicyLoss(LOSS)(full["logprobs"], full["old_logprobs"], full["advantages"], full["mask"],
                                            LossNormalizer.from_masks([full["mask"]]), full["ref_logprobs"])
    reference = {f"train/{k}": m.value.item() for k, m in metrics.items()}
    reference["train/loss"] = loss.item()
    reference["train/grad_norm"] = 3.25
    ranks = [rollout_inputs(rank) for rank in range(2)]

    def over_ranks(name: str, per_rank) -> None:
        values = [per_rank(x) for x in ranks]
        reference[f"{name}/mean"] = sum(v.mean().item() for v in values) / 2
        reference[f"{name}/std"] = sum(v.std().item() for v in values) / 2
        reference[f"{name}/min"] = min(v.min().item() for v in values)
        reference[f"{name}/max"] = max(v.max().item() for v in values)

    over_ranks("reward", lambda x: x["rewards"])
    over_ranks("advantage", lambda x: group_advantages(x["rewards"], x["group_index"]).double())
    over_ranks("response_length", lambda x: x["mask"].sum(dim=1).double())
    for key in ranks[0]["reward_metrics"]:
        reference[f"reward/{key}"] = sum(x["reward_metrics"][key] for x in ranks) / 2
    reference["response/truncated_fraction"] = sum(x["truncated"].double().mean().item() for x in ranks) / 2
    gaps = [(x["trainer_logprobs"] - x["sampler_logprobs"]).abs()[x["mask"]] for x in ranks]
    reference["rollout/logprob_diff_mean"] = sum(g.mean().item() for g in gaps) / 2
    reference["rollout/logprob_diff_max"] = max(g.max().item() for g in gaps)
    return reference


@pytest.mark.slow
def test_every_metric_kind_reduces_over_two_ranks_like_a_float64_reference(two_gloo_ranks):
    """Loss-function contributions (SUM: the two ranks' sums equal the loss metrics of all rows in one call;
    ratio_max: MAX), rollout statistics (MEAN of the ranks' means and stds, global MIN / MAX), the log-prob
    mismatch (MEAN, MAX) and the replicated gradient norm: each reduced over two gloo ranks by the reduction
    its producer declares, equal to a float64 reference. The ranks hold different rows and values, so a
    wrongly declared reduction (a MAX summed, a mean summed, a sum averaged) changes the result."""
    _, ranks = two_gloo_ranks
    reference = _float64_reference()
    assert ranks[0]["reduced"] == ranks[1]["reduced"], "every rank must get the same reduced metrics"
    reduced = ranks[0]["reduced"]
    assert reduced.keys() == reference.keys()
    kinds = {kind for _, kind in ranks[0]["produced"].values()}
    assert kinds == {"sum", "mean", "max", "min", "replicated"}
    for key, expected in reference.items():  # (rel 1e-7: the truncated fraction is produced in float32)
        assert reduced[key] == pytest.approx(expected, rel=1e-7 if key == "response/truncated_fraction" else 1e-12,
                                             abs=1e-15), key
