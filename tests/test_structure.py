"""The code's shape: no import cycle between the project's modules, no module over 500 lines, light imports.

Imports are read from the source (ast), all of them: top level, inside functions and under TYPE_CHECKING, since a
cycle through any of them is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hired", "runtime", "serving", "export", "models", "bench")
CYCLE_FREE = ("hired", "runtime", "serving", "export", "models")
MAX_LINES = 500


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its source (resolving relative imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:
        # `from a.b import c` may import module a.b.c or name c of a.b: take the longest known module
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                add(f"{mod}.{alias.name}")
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import cycle among `nodes` (as a list of modules, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m not in nodes:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_graph_sees_function_level_and_type_checking_imports():
    graph = import_graph()
    # runtime.pipeline imports runtime.session inside Pipeline.__init__ only (onnxruntime loads lazily)
    assert "runtime.session" in graph["runtime.pipeline"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}, {"a", "b"}) is None


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    nodes = {n for n in graph if n.split(".")[0] in CYCLE_FREE}
    # a package's __init__ re-exporting its submodules is not a cycle a reader must untangle: drop the edges
    # from a submodule up to its own package __init__ (they only reach names the submodules define)
    pruned = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    assert find_cycle(pruned, nodes) is None


def test_no_module_over_500_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these modules (over {MAX_LINES} lines): {long}"


@pytest.mark.parametrize("package", ["hired", "runtime", "serving"])
def test_runtime_side_packages_import_no_torch_transformers_or_onnx(package):
    code = (
        f"import sys, {package}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serving_client_does_not_import_the_server():
    code = (
        "import sys\n"
        "from serving import RemotePipeline\n"
        "print(sorted(m for m in sys.modules if m.startswith('serving.') and 'triton' in m or 'pytriton' in m))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_runtime_side_sources_never_import_torch_transformers_or_onnx_even_lazily():
    """Read from the source: a lazy import inside a function counts (e.g. serving.triton_repo reading graphs)."""
    found = []
    for name, path in module_files().items():
        if name.split(".")[0] not in ("hired", "runtime", "serving"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            found += [f"{name}: {n}" for n in names if n.split(".")[0] in ("torch", "transformers", "onnx")]
    assert found == []
