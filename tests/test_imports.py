"""sdzero's modules import one another in one direction: no module reaches itself through its imports, and the
tasks (sdzero.tasks) never reach the data loading or the reward combination that build on them.

The graph holds every `import sdzero...` and `from sdzero... import ...` of a module, those inside functions too:
an import deferred into a function still ties the two modules together.
"""

import ast
from pathlib import Path

import sdzero

SRC = Path(sdzero.__file__).parent


def module_names(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is named by its __init__.py)."""
    names = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(tree: ast.AST, importer: str, modules: dict) -> set[str]:
    """The package's modules that `tree` (the module `importer`) imports, anywhere in its body."""
    found = set()
    package = importer if modules[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..data import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import name` imports the submodule `name` when there is one, else the package.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != importer}
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = module_names(src)
    return {name: imported_modules(ast.parse(path.read_text()), name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph has none."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_function_level_and_relative_imports_are_edges():
    modules = {"pkg": Path("pkg/__init__.py"), "pkg.a": Path("pkg/a.py"), "pkg.b": Path("pkg/b.py"),
               "pkg.sub": Path("pkg/sub/__init__.py"), "pkg.sub.c": Path("pkg/sub/c.py")}
    source = ("def f():\n    from pkg import b\n"
              "def g():\n    from .sub import c\n"
              "import os\nfrom pkg.sub import helper\n")
    assert imported_modules(ast.parse(source), "pkg.a", modules) == {"pkg.b", "pkg.sub.c", "pkg.sub"}
    assert imported_modules(ast.parse("from ..b import x"), "pkg.sub.c", modules) == {"pkg.b"}


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_sdzero_has_no_import_cycle():
    graph = import_graph()
    assert "sdzero.tasks" in graph["sdzero.data"] or any(t.startswith("sdzero.tasks.") for t in graph["sdzero.data"])
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_tasks_never_reach_data_or_rewards():
    graph = import_graph()
    tasks = [name for name in graph if name == "sdzero.tasks" or name.startswith("sdzero.tasks.")]
    assert len(tasks) > 1
    for task in tasks:
        assert not reachable(graph, task) & {"sdzero.data", "sdzero.rewards"}, task
