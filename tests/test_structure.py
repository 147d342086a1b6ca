"""The package's shape, checked from the source: no import cycle between jaxllm modules (module-
and function-level imports alike), no module over 600 lines, no private name used across
modules, and the task name compared only inside jaxllm/tasks/."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jaxllm")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(open(path, encoding="utf-8").read()) for name, path in MODULES.items()}


def _owner(name: str) -> str | None:
    """The module `name` lives in (`jaxllm.data.chat.load_template` -> `jaxllm.data.chat`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(tree) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) of every jaxllm import."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("jaxllm"):
            out += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("jaxllm")]
    return out


def _graph() -> dict[str, set[str]]:
    """module -> modules its imports run: the target and the packages above it (their
    __init__ runs first), except the importer's own packages (already being initialised)."""
    graph = {}
    for name, tree in TREES.items():
        targets = set()
        for module, imported, _ in _imports(tree):
            target = _owner(f"{module}.{imported}") if imported else _owner(module)
            while target and target != "jaxllm":
                if target != name and not name.startswith(target + "."):
                    targets.add(target)
                target = target.rpartition(".")[0]
        graph[name] = targets
    return graph


def _cycle(graph) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search, colours)."""
    colour, parent = {}, {}

    def visit(v):
        colour[v] = "grey"
        for w in sorted(graph[v]):
            if colour.get(w) == "grey":
                path, u = [w], v
                while u != w:
                    path.append(u)
                    u = parent[u]
                return path[::-1]
            if w not in colour:
                parent[w] = v
                found = visit(w)
                if found:
                    return found
        colour[v] = "black"
        return None

    for v in sorted(graph):
        if v not in colour:
            found = visit(v)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) in (["a", "b", "c"], ["b", "c", "a"],
                                                                        ["c", "a", "b"])
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle + cycle[:1])


def test_no_module_over_600_lines():
    big = {name: n for name, path in MODULES.items() if (n := open(path).read().count("\n")) > 600}
    assert not big, big


def test_no_private_name_used_across_modules():
    found = []
    for name, tree in TREES.items():
        module_aliases = {}
        for module, imported, line in _imports(tree):
            if imported is None:
                continue
            if imported.startswith("_") and not imported.startswith("__"):
                found.append(f"{name}:{line} imports {module}.{imported}")
            if _owner(f"{module}.{imported}") == f"{module}.{imported}":  # `from jaxllm.data import chat`
                module_aliases[imported] = f"{module}.{imported}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.asname and a.name in module_aliases:
                        module_aliases[a.asname] = module_aliases[a.name]
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{name}:{node.lineno} uses {module_aliases[node.value.id]}.{node.attr}")
    assert not found, found


def test_task_name_compared_only_in_tasks():
    """`cfg.task` (or any `.task` attribute) in a comparison, outside jaxllm/tasks/."""
    found = []
    for name, tree in TREES.items():
        if name == "jaxllm.tasks" or name.startswith("jaxllm.tasks."):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Attribute) and side.attr == "task":
                        found.append(f"{name}:{node.lineno}")
    assert not found, found
