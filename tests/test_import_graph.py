"""The package boundaries of ``nemo_viper`` (docs/architecture.md "Package boundaries"), checked on the source.

The graph is static (``ast`` over every module, ``recipes``/``launcher`` included: the build maps these top-level
directories to ``nemo_viper.recipes`` / ``nemo_viper.launcher``, see :func:`package_dirs`). Its nodes are
the sub-packages of ``nemo_viper`` and the modules directly in it (``config``, ``prompts``, ``cli``, ...).
An edge is any import that runs: at module level *and* inside functions (a lazy import is still a
dependency; it only defers the cost). Imports under ``if TYPE_CHECKING:`` are left out: they never run.
Relative imports are resolved against the importing module.
"""

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from launch import REPO

PACKAGE = REPO / "nemo_viper"
MEGATRON_FREE = ("algorithms", "rewards", "data")
# The policy / algorithm boundary (docs/architecture.md "The policy / algorithm boundary"): the interface module,
# and the RL loop and the GRPO step, which reach Megatron only through the policy object they are given.
MEGATRON_FREE_MODULES = ("nemo_viper.models.interfaces", "nemo_viper.training.loop", "nemo_viper.training.grpo",
                         "nemo_viper.training.checkpointing", "nemo_viper.runtime.metrics",
                         "nemo_viper.runtime.collectives")


def package_dirs() -> dict[str, Path]:
    """The build's package-dir mapping (``pyproject.toml``): ``{package: its directory in the checkout}``."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {package: REPO / directory for package, directory in mapping.items()}


def modules(roots: dict[str, Path] | None = None) -> dict[str, Path]:
    """``{dotted name: path}`` of every module of the packages ``{package: directory}`` (default: the build's
    mapping); a package mapped on its own is not also walked as a sub-directory of its parent."""
    roots = roots or package_dirs()
    found = {}
    for package, root in roots.items():
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = Path(directory) / name
                    parts = (*package.split("."), *path.relative_to(root).with_suffix("").parts)
                    found.setdefault(".".join(parts[:-1] if parts[-1] == "__init__" else parts), path)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import that runs in module ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]  # `from pkg import module`
    return found


def node_of(module: str) -> str | None:
    """The graph node of a ``nemo_viper`` module: its sub-package, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "nemo_viper" and len(parts) > 1 else None


def package_graph(sources: dict[str, Path], root: Path = PACKAGE) -> dict[str, dict[str, str]]:
    """``{node: {imported node: "file:line" of one such import}}``."""
    known = {node_of(name) for name in sources} - {None}
    graph = {node: {} for node in known}
    for name, path in sources.items():
        source = node_of(name)
        for target, line in imports(name, path):
            other = node_of(target)
            if source and other in known and other != source:
                graph[source].setdefault(other, f"{os.path.relpath(path, root.parent)}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of ``"node -> node (file:line)"`` steps, or None."""
    state, path = {}, []

    def visit(node):
        state[node], _ = "open", path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                loop = path[path.index(nxt):] + [nxt]
                return [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(loop, loop[1:])]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    return next((cycle for node in sorted(graph) if node not in state and (cycle := visit(node))), None)


def test_no_import_cycles_between_packages():
    graph = package_graph(modules())
    assert {"algorithms", "data", "models", "training", "prompts", "recipes", "launcher"} <= set(graph)
    assert "models" in graph["training"] and "data" in graph["training"]  # the scan sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between nemo_viper packages:\n  " + "\n  ".join(cycle)


def test_the_architecture_diagram_shows_the_imports():
    """docs/architecture.md's diagram has exactly the graph's arrows (``errors``, ``environment`` and the YAML's
    package ``conf`` aside)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    diagram = text[text.index("```mermaid"):].split("```")[1]
    drawn = set()
    for line in diagram.splitlines():
        if "-->" in line:
            left, right = (side.split("&") for side in line.split("-->"))
            drawn |= {(a.strip(), b.strip()) for a in left for b in right}
    graph = package_graph(modules())
    actual = {(a, b) for a, targets in graph.items() for b in targets if not {a, b} & {"errors", "environment", "conf"}}
    assert drawn == actual, f"missing from the diagram: {sorted(actual - drawn)}; not imports: {sorted(drawn - actual)}"


def test_the_scan_finds_a_cycle_through_a_function_level_import(tmp_path):
    """A lazy import counts; one under ``if TYPE_CHECKING:`` does not."""
    root = tmp_path / "nemo_viper"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "__init__.py").write_text("")
    (root / "a" / "__init__.py").write_text("from nemo_viper.b import thing\n")
    (root / "b" / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                            "    from nemo_viper.a import other\n")
    (root / "b" / "mod.py").write_text("def f():\n    from ..a import other\n")
    assert find_cycle(package_graph(modules({"nemo_viper": root}), root))[0].startswith("a -> b")
    (root / "b" / "mod.py").write_text("")
    assert find_cycle(package_graph(modules({"nemo_viper": root}), root)) is None


# Imported by every process (the package's __init__), importing Megatron only inside a function that patches it
# for a caller that already uses it.
MEGATRON_PATCHERS = {"nemo_viper.runtime.lifetime": "megatron-core's checkpoint writer, patched by a checkpoint save"}


def reachable(name: str, sources: dict[str, Path]) -> dict[str, str]:
    """``{module: the module that imports it}`` for every ``nemo_viper`` module that importing ``name`` can run,
    lazy imports included (an import of ``a.b.c`` also runs the packages ``a.b`` and ``a``)."""
    seen, stack = {name: ""}, [name]
    while stack:
        current = stack.pop()
        for target, _ in imports(current, sources[current]):
            parts = target.split(".")
            for module in (".".join(parts[:i]) for i in range(len(parts), 0, -1)):
                if module in sources and module not in seen:
                    seen[module] = current
                    stack.append(module)
    return seen


def test_no_megatron_is_reachable_from_the_boundary_even_through_lazy_imports():
    """Statically: no module that the policy interface, the GRPO step, the RL loop, ``algorithms/`` or
    ``rewards/`` can import, at any depth and inside functions too, imports Megatron."""
    sources = modules()
    megatron = {name for name, path in sources.items() if name not in MEGATRON_PATCHERS
                and any(target.split(".")[0] == "megatron" for target, _ in imports(name, path))}
    roots = [name for name in sources if node_of(name) in ("algorithms", "rewards")] + list(MEGATRON_FREE_MODULES)
    found = {root: sorted(set(reachable(root, sources)) & megatron) for root in roots}
    assert {root: via for root, via in found.items() if via} == {}, "Megatron reachable from the boundary"


def test_algorithms_rewards_data_and_the_rl_algorithm_side_do_not_import_megatron():
    sources = modules()
    megatron_free = {name for name in sources if node_of(name) in MEGATRON_FREE or name in MEGATRON_FREE_MODULES}
    assert set(MEGATRON_FREE_MODULES) <= megatron_free
    direct = [f"{sources[name].relative_to(PACKAGE.parent)}:{line}" for name in sorted(megatron_free)
              for target, line in imports(name, sources[name]) if target.split(".")[0] == "megatron"]
    assert direct == [], f"Megatron imported in {MEGATRON_FREE} or {MEGATRON_FREE_MODULES}: {direct}"
    loop = sources["nemo_viper.training.loop"].read_text()
    assert "hf_config" not in loop and "parallel_state" not in loop, "the loop asks the policy, not Megatron"
    # and importing every one of these modules loads no Megatron through anything they import
    names = sorted(megatron_free)
    check = ("import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
             "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('megatron', 'transformer_engine')}))")
    result = subprocess.run([sys.executable, "-c", check, *names], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
