"""Package structure, read statically with ``ast``: no import cycle, no write to another object's
private attribute.

Import graph: an edge ``a -> b`` for every ``import``/``from ... import`` of an ``onnxqat`` module
in ``a`` (``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg``). Imports under ``if TYPE_CHECKING:`` never run and are left out; the implicit import of a
parent package's ``__init__`` is not an edge.

- Module-level imports alone: no cycle at all.
- With function-local imports too: no cycle except through the edges in :data:`LOCAL_BACK_EDGES`,
  each with the reason it stays. A function-local import elsewhere is fine (lazy loading for the
  CLI's start-up, optional dependencies) as long as it closes no cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "onnxqat"

# (importer, imported) -> why the import is function-local and closes a cycle.
LOCAL_BACK_EDGES: dict[tuple[str, str], str] = {
    ("onnxqat.sim", "onnxqat.mixed"): (
        "QuantizationSimModel.mixed_precision is a convenience entry to onnxqat.mixed.search, which "
        "sits above the sim: it builds, calibrates and scores candidate sims (and uses onnxqat.analysis, "
        "which takes a sim). The search is the layer above; the method only forwards to it."
    ),
}


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: dict) -> set[str]:
    top = next(iter(modules)).split(".")[0]
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")[: None if is_package else -1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        for alias in node.names:
            full = f"{prefix}.{alias.name}"
            names.append(full if full in modules else prefix)
    found = set()
    for name in names:
        if name.split(".")[0] != top:
            continue
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            found.add(name)
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(root: pathlib.Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-local edges) of the package at ``root``."""
    modules = _modules(root)
    top: dict[str, set[str]] = {m: set() for m in modules}
    local: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"

        def walk(nodes: list[ast.AST], into: dict[str, set[str]], module: str = module,
                 is_package: bool = is_package) -> None:
            for node in nodes:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    into[module] |= _targets(module, is_package, node, modules)
                elif isinstance(node, ast.If) and _type_checking(node.test):
                    walk(list(node.orelse), into)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    walk(list(ast.iter_child_nodes(node)), local)
                else:
                    walk(list(ast.iter_child_nodes(node)), into)

        walk(tree.body, top)
    return top, local


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def private_writes(root: pathlib.Path) -> list[str]:
    """``file:line: target`` for every assignment, augmented assignment or ``del`` of ``X._name``
    (or ``setattr(X, "_name", ...)``) where ``X`` is not ``self``/``cls``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = list(node.targets)
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                targets = [node.target]
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                targets = [node.optional_vars]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("setattr", "delattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                  and node.args[1].value.startswith("_") and not node.args[1].value.startswith("__")
                  and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
            for target in targets:
                for part in ast.walk(target):
                    if (isinstance(part, ast.Attribute) and isinstance(part.ctx, (ast.Store, ast.Del))
                            and part.attr.startswith("_") and not part.attr.startswith("__")
                            and not (isinstance(part.value, ast.Name) and part.value.id in ("self", "cls"))):
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(part)}")
    return sorted(found, key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _without(graph: dict[str, set[str]], edges) -> dict[str, set[str]]:
    return {a: {b for b in bs if (a, b) not in edges} for a, bs in graph.items()}


def test_no_module_level_import_cycle():
    top, _ = import_graph(PACKAGE)
    assert sum(map(len, top.values())) > 50  # the graph was read (the package has ~170 edges)
    cycle = find_cycle(top)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_function_local_imports_close_no_cycle_but_the_listed_ones():
    top, local = import_graph(PACKAGE)
    full = {m: top[m] | local[m] for m in top}
    cycle = find_cycle(_without(full, LOCAL_BACK_EDGES))
    assert cycle is None, "cycle through function-local imports: " + " -> ".join(cycle or [])
    for a, b in LOCAL_BACK_EDGES:  # a listed edge that is there must be local and still close a cycle
        if b not in full[a]:
            continue  # not (or no longer) in this tree
        assert b not in top[a], f"{a} -> {b} became a module-level import"
        assert a in _reachable(full, b), f"{a} -> {b} closes no cycle any more: make it module-level"


def test_no_module_writes_another_objects_private_attribute():
    assert private_writes(PACKAGE) == []


# -- the checks themselves can fail -----------------------------------------------------------------


@pytest.fixture
def toy(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("from toy.sub import b\nimport os\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from toy import c\n"
        "def f():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text(
        "try:\n    from toy import a\nexcept ImportError:\n    a = None\n"
        "class C:\n    def __init__(self):\n        self._mine = 1\n"
        "def poke(other, xs):\n    other._state = 2\n    xs[0]._n += 1\n    setattr(other, '_x', 3)\n"
        "    del other._y\n    for other._z in xs:\n        pass\n")
    return pkg


def test_import_graph_of_a_toy_package(toy):
    top, local = import_graph(toy)
    assert top == {"toy": set(), "toy.sub": {"toy.sub.b"}, "toy.a": {"toy.sub.b"}, "toy.sub.b": set(),
                   "toy.c": {"toy.a"}}
    assert local["toy.sub.b"] == {"toy.a"}
    assert find_cycle(top) is None
    full = {m: top[m] | local[m] for m in top}
    assert find_cycle(full) == ["toy.a", "toy.sub.b", "toy.a"]
    assert find_cycle(_without(full, {("toy.sub.b", "toy.a")})) is None


def test_private_writes_of_a_toy_package(toy):
    assert private_writes(toy) == [
        "toy/c.py:9: other._state",
        "toy/c.py:10: xs[0]._n",
        "toy/c.py:11: setattr(other, '_x', 3)",
        "toy/c.py:12: other._y",
        "toy/c.py:13: other._z",
    ]


def test_readme_layout_names_every_module():
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Layout\n"):]
    section = section[: section.find("\n## ", 5) if "\n## " in section[5:] else len(section)]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", section))
    modules = {p.stem for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}
    packages = {p.parent.name for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    missing = sorted((modules | packages) - words)
    assert missing == [], f"README's Layout section does not mention {missing}"
