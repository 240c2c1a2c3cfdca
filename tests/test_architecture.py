"""The house's shape, checked: the package's import graph has no cycle, its imports of itself sit at the top of a
module, no module is over 500 lines, and every method module satisfies the Method protocol."""

import ast
import inspect
from pathlib import Path

import pytest

from medpeft import methods
from medpeft.methods.base import Capabilities, Method

PACKAGE = Path(__file__).resolve().parents[1] / "medpeft"


def module_of(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def package_imports(path: Path):
    """(imported medpeft module, line, whether the import sits inside a function) for every import of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_of(path)
    base = here if is_package(path) else here.rpartition(".")[0]
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    modules = {module_of(p) for p in PACKAGE.rglob("*.py")}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                root = base.split(".")
                root = root[:len(root) - (node.level - 1)]
                target = ".".join(root + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "medpeft":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import config` imports the module medpeft.config
                sub = f"{target}.{alias.name}"
                yield (sub if sub in modules else target), node.lineno, id(node) in inside
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "medpeft":
                    yield alias.name, node.lineno, id(node) in inside


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        here = module_of(path)
        targets = edges.setdefault(here, set())
        for target, _, _ in package_imports(path):
            # importing medpeft.a.b runs medpeft.a's __init__ first
            parts = target.split(".")
            targets.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        # a module's own packages are already being imported when it runs: no edge back to them
        parts = here.split(".")
        targets.difference_update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    edges = graph()
    assert {"medpeft.training.run", "medpeft.outputs", "medpeft.evaluation"} <= set(edges)
    assert "medpeft.outputs" in edges["medpeft.evaluation"]  # the graph sees relative imports
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))
    # evaluation, export, inference and the pipeline read outputs through medpeft.outputs, not through training
    for reader in ("medpeft.evaluation", "medpeft.export", "medpeft.inference", "medpeft.outputs"):
        assert not any(t.startswith("medpeft.training") for t in edges[reader]), reader


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_imports_itself_only_at_the_top_of_a_module():
    inside = [f"{p.relative_to(PACKAGE.parent)}:{line} imports {t}" for p in PACKAGE.rglob("*.py")
              for t, line, local in package_imports(p) if local]
    assert not inside, inside


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long


@pytest.mark.parametrize("name", methods.NAMES)
def test_every_method_satisfies_the_protocol(name):
    module = methods.get(name)
    assert isinstance(module.CAPABILITIES, Capabilities)
    assert module.NAME == name and isinstance(module.DEFAULTS, dict) and module.WEIGHTS_FILE.endswith(".safetensors")
    assert inspect.isclass(module.Options) and callable(module.Options().validate)
    for member, spec in vars(Method).items():
        if member.startswith("_") or not inspect.isfunction(spec):
            continue
        wanted = [p for p in inspect.signature(spec).parameters if p != "self"]
        got = list(inspect.signature(getattr(module, member)).parameters)
        assert got == wanted, (name, member, got, wanted)
