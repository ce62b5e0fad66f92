"""The package's shape: no import cycles, and layers that import only downwards.

Imports are read with ``ast`` (nothing is imported): module-level and function-level ones,
relative ones resolved, ``if TYPE_CHECKING:`` blocks skipped (annotations only).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvcli"

#: Layers, lowest first; a module may import its own layer and the ones below it.
#: (eval and profile both sit on the API; profile also uses eval's task generators.)
LAYERS = ["core", "cache", "attention", "methods", "engine", "api", "eval", "adapt", "profile", "batch", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """``ast.walk``, without ``if TYPE_CHECKING:`` bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """Module -> the kvcli modules it imports (a package import counts as its ``__init__``)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
                targets = [n for n in names if n in files]
                if len(targets) < len(names):
                    targets.append(base)  # names defined in the module (or package) ``base``
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in files and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "kvcli.api" in graph["kvcli.cli.ask"]  # ``from .. import api`` inside the command
    assert "kvcli.core.errors" in graph["kvcli.methods.registry"]  # ``from ..core.errors import``
    assert "kvcli.eval.tasks" in graph["kvcli.eval.scoring"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers_import_only_downwards():
    every = set(LAYERS)
    found = {m.split(".")[1] for m in import_graph() if m.count(".") >= 1}
    assert found <= every, f"a folder no layer names: {found - every}"
    wrong = [
        f"{mod} ({LAYERS[layer_of(mod)]}) imports {dep} ({LAYERS[layer_of(dep)]})"
        for mod, deps in import_graph().items()
        for dep in deps
        if layer_of(mod) is not None and layer_of(dep) is not None and layer_of(dep) > layer_of(mod)
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_nothing_but_the_cli_imports_the_cli():
    users = [
        mod
        for mod, deps in import_graph().items()
        if not mod.startswith("kvcli.cli") and any(d.startswith("kvcli.cli") for d in deps)
    ]
    assert not users


@pytest.mark.parametrize("layer", ["core"])
def test_core_needs_no_torch(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n.split(".")[0] in ("torch", "transformers") for n in names), path


def test_every_subpackage_is_installed():
    """``pip install .`` (not editable) installs only the packages pyproject lists."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, packages - listed


def test_repository_root_shadows_no_installed_package(tmp_path):
    """Run from the repository root (``python -m pytest``, ``python -c``, profile's child
    processes), the current directory comes first on ``sys.path``, and a top-level folder
    with an ``__init__.py`` hides an installed package of the same name.  transformers
    imports Hugging Face's ``kernels`` package, and our ``kernels/__init__.py`` once broke
    every model load run from here; the Triton kernels now live one level down, in
    ``kernels/kvcli_kernels``.  Any other top-level package must not share its name with
    something installed (looked up from elsewhere, so that the repository is not on the path)."""
    import os
    import subprocess
    import sys

    names = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "kvcli")
    assert "kernels" not in names
    code = "import importlib.util as u, sys; print([n for n in sys.argv[1:] if u.find_spec(n) is not None])"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # installed packages only
    out = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", f"top-level folders that shadow installed packages: {out.stdout.strip()}"
    assert (ROOT / "kernels" / "kvcli_kernels" / "__init__.py").is_file()
