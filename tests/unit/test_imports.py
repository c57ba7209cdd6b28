"""The direction of imports (docs/architecture.md): no import cycle anywhere in plait, and the pure
layers (the layout rules, the planner, the hardware table) import neither torch nor the parallel
code. Read from the source, so that an import inside a function counts as much as one at the top
(only imports under `if TYPE_CHECKING:` are left out: they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import plait

SRC = Path(plait.__file__).parent
# Pure Python by design: they run before any worker starts and on a laptop for 16,384 GPUs.
# (plait.optim's table is torch-free at import too; its builders import torch when they run:
# tests/unit/test_optim.py checks that.)
PURE = ("plait.layout", "plait.planner", "plait.hardware", "plait.config", "plait.validation", "plait.errors",
        "plait.model.sizes", "plait.model.flops")


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (absolute names), wherever the import statement stands."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for sub in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(name, path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_pure_layers_import_no_torch_and_no_parallel_code():
    offenders = []
    for name, path in _modules().items():
        if not any(name == p or name.startswith(p + ".") for p in PURE):
            continue
        for imported in _imports(name, path):
            if imported == "torch" or imported.startswith("torch.") or imported.startswith("plait.parallel"):
                offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders
