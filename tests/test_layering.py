"""The layers of the Architecture section hold: no module imports a layer above its own, and no import cycles.

Read from the source: every import counts for the ranks, those inside functions too (a lazy import is still an
edge); the cycle check reads top-level imports (a lazy import is how a cycle would be broken, were one needed).
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# (package prefix, rank): a module may import only modules of its own rank or lower.
RANKS = [("quantkit.errors", 0), ("quantkit.dtypes", 0), ("quantkit.version", 0), ("quantkit.io", 0), ("quantkit.dist", 0),
         ("quantkit.model.layout", 0),
         ("quantkit.model", 1), ("quantkit.calibrate", 1),
         ("quantkit.quant", 2),
         ("quantkit.backends", 3), ("quantkit.formats", 3),
         ("quantkit.run", 4),
         ("quantkit.eval", 5),
         ("quantkit.cli", 6),
         ("quantkit.plan", 7),
         ("quantkit", 8)]  # the package's facade (quantkit.load, the lazy API), entry, __main__


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("eval", "calibrate"):
        parts.insert(0, "quantkit")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for folder in ("quantkit", "eval", "calibrate") for p in (REPO / folder).rglob("*.py")}


def imports(path: Path, lazy: bool = True) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree) if lazy else tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in found if n.startswith("quantkit")}


def rank(name: str) -> int:
    if name.endswith(".__main__"):  # `python -m ...`: a script, imported by nothing
        return RANKS[-1][1]
    return next(r for prefix, r in RANKS if name == prefix or name.startswith(prefix + "."))


MODULES = sources()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_its_layer_and_below(name):
    found = {n for n in imports(MODULES[name]) if n in MODULES}
    above = sorted(n for n in found if rank(n) > rank(name))
    assert not above, f"{name} (layer {rank(name)}) imports {above} from a higher layer"


def test_no_import_cycles():
    graph = {name: {n for n in imports(path, lazy=False) if n in MODULES and n != name} for name, path in MODULES.items()}
    done, stack = set(), []

    def visit(name):
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("imported, absent", [
    ("quantkit.run.pipeline, quantkit.run.sizing", ("quantkit.plan", "quantkit.cli")),
    ("quantkit.cli", ("quantkit.plan",))])
def test_a_quantize_run_does_not_import_the_planner(imported, absent):
    # The write path sizes its output through quantkit.run.sizing; the planner (child-process memory probe, timed
    # passes, disk bandwidth) is `quantkit plan`'s alone, and the command line reaches it only through quantkit.entry.
    import subprocess
    import sys

    code = f"import sys, {imported}; print(sorted(m for m in sys.modules if m.startswith({absent!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
