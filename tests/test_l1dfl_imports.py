"""The loss, kernel, trainer and bench modules import one way: no circle, whatever is imported first.

Two circles existed: ``kernels/__init__.py`` <-> ``losses/l1dfl.py`` (BinStatistics and
compute_dtype lived in the loss module, which imports the kernels) and ``bench.py`` <->
``kernels/verify_cuda.py``. The shared pieces now live below both (``kernels/_common.py``;
``bench.verify_cuda_main``). The graph below counts every import of a package module, also those
inside functions (the old circles were such lazy imports).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "nnunetv2_l1dfl"
#: Module prefixes this test holds to an acyclic graph.
CHECKED = ("kernels", "losses", "training", "nnunet_trainers", "bench", "demo", "phantom")


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> package modules it imports (anywhere in its body), from the source's AST."""
    files = {}
    for path in (root / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path

    def module_of(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {module_of(a.name) for a in node.names if a.name.startswith(PACKAGE)}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PACKAGE):
                targets |= {module_of(f"{node.module}.{a.name}") for a in node.names}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (each holds a circle)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_the_graph_sees_lazy_imports(repo_root):
    graph = import_graph(repo_root)
    assert "nnunetv2_l1dfl.kernels" in graph["nnunetv2_l1dfl.losses.l1dfl"]  # imported inside a method
    assert "nnunetv2_l1dfl.kernels.verify_cuda" in graph["nnunetv2_l1dfl.bench"]


def test_no_import_circle_through_the_loss_kernels_trainers_or_bench(repo_root):
    graph = import_graph(repo_root)
    checked = tuple(f"{PACKAGE}.{name}" for name in CHECKED)
    circles = [c for c in strongly_connected(graph) if any(m.startswith(checked) for m in c)]
    assert not circles, f"import circles: {circles}"
    assert graph[f"{PACKAGE}.kernels._common"] == set()  # the shared pieces import nothing of ours


FIRST = ["nnunetv2_l1dfl.kernels", "nnunetv2_l1dfl.losses.l1dfl",
         "nnunetv2_l1dfl.kernels.verify_cuda", "nnunetv2_l1dfl.bench"]


@pytest.mark.parametrize("first", FIRST)
def test_each_module_imports_first_in_a_fresh_interpreter(repo_root, first):
    """Import one module first, then the others, and use what crossed the old circles."""
    others = [m for m in FIRST if m != first]
    code = "; ".join([
        "import importlib",
        f"importlib.import_module({first!r})",
        *[f"importlib.import_module({m!r})" for m in others],
        "from nnunetv2_l1dfl.losses.l1dfl import BinStatistics, compute_dtype",
        "from nnunetv2_l1dfl.kernels import _common",
        "assert BinStatistics is _common.BinStatistics and compute_dtype is _common.compute_dtype",
        "from nnunetv2_l1dfl.bench import verify_cuda_main",
        "import torch; from nnunetv2_l1dfl import L1DFLLoss",
        "print(float(L1DFLLoss()(torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 3, 3, dtype=torch.int16))))",
    ])
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), result.stderr[-2000:]
