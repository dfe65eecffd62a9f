"""Every module of ov_seg imports, and the modules import each other without a cycle.

The graph is read from the source with ``ast``: every ``import`` statement, at module level or
inside a function (a lazy import is still a dependency), gives an edge to the ov_seg module it
names (``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``).
"""

import ast
import importlib
from pathlib import Path

import pytest

import ov_seg

PACKAGE_ROOT = Path(ov_seg.__file__).resolve().parent


def _modules():
    """{dotted name: (path, is_package)} of every module under ov_seg/."""
    mods = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = ["ov_seg", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_graph(mods):
    """{module: set of ov_seg modules it imports} (see the module docstring)."""
    graph = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:
                        edges.add(sub)
                    elif target in mods:
                        edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph):
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


MODULES = _modules()
GRAPH = import_graph(MODULES)


def test_graph_reader_sees_imports():
    # known edges of each import form: absolute, relative, lazy (inside a function)
    assert "ov_seg.modeling.clip.text_tower" in GRAPH["ov_seg.modeling.clip.text_cache"]
    assert "ov_seg.modeling.clip.builder" in GRAPH["ov_seg.modeling.clip"]
    assert "ov_seg.mining.nouns" in GRAPH["ov_seg.data.caption_nouns"]
    assert len(MODULES) > 50


def test_find_cycles_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert find_cycles(GRAPH) == []


def test_mining_does_not_import_models():
    """The mining job gets its proposal source and crop classifier from its caller."""
    back = {
        (m, dep)
        for m, deps in GRAPH.items()
        if m.startswith("ov_seg.mining")
        for dep in deps
        if dep.startswith(("ov_seg.modeling", "ov_seg.engine"))
    }
    assert back == set()


def test_models_own_no_noun_extractor():
    """Caption nouns reach the models by one path: the caption mapper's ``nouns`` field
    (``ov_seg.data.caption_nouns``); no model module imports the miners."""
    assert {
        (m, dep)
        for m, deps in GRAPH.items()
        if m.startswith("ov_seg.modeling")
        for dep in deps
        if dep.startswith("ov_seg.mining")
    } == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports(name):
    assert importlib.import_module(name).__name__ == name
