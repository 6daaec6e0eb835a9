"""The import graph of scepd/, acme/ and agent/, read from the source with `ast` (imports inside
functions count too: a late import is still a dependency, and the acme <-> scepd cycle of
issue 12 was one).

* No cycle between packages (a module belongs to its parent package: scepd, scepd.scep,
  scepd.store, acme, agent, and any subpackage added later).
* The assembly (the entry points and scepd.http.assembly, which lists the front-ends and the ordered
  migrations) is the top of the graph: nothing else imports it, and it is the only part of
  scepd/ that imports acme/.
* The core (CA, policy, store, errors, enrollment) imports no web framework or wire codec.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("scepd", "acme", "agent")

#: The composition root: `scepd` (scepd.cli:main, python -m scepd), the aiohttp app factory and
#: scepd.http.assembly. They may import anything; nothing outside this set may import them.
ASSEMBLY = {"scepd.__main__", "scepd.entry", "scepd.cli", "scepd.http.app", "scepd.http.assembly"}

#: Core modules: transitively (through scepd's own modules) no aiohttp, asn1crypto or josepy.
CORE = ("scepd.ca.policy", "scepd.ca.authority", "scepd.errors", "scepd.enroll.enrollment", "scepd.store",
        "scepd.store.records", "scepd.store.sql")
FORBIDDEN_IN_CORE = ("aiohttp", "asn1crypto", "josepy")


def _modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """dotted name -> (file, is a package __init__)"""
    found = {}
    for top in TOP_PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _imports(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> every name it imports (ours resolved to the deepest module of ours, others as
    written), from module level and from inside functions and classes."""
    modules = _modules(root)

    def ours(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                for alias in node.names:
                    sub = f"{prefix}.{alias.name}"
                    targets.add(sub if sub in modules else prefix)
        graph[name] = {ours(t) or t for t in targets} - {name}
    return graph


def package_of(module: str, modules: dict[str, tuple[Path, bool]]) -> str:
    return module if modules[module][1] else module.rpartition(".")[0]


def _internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in ts if t in graph} for m, ts in graph.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative DFS, bounded by the graph)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(edges.get(start, ()))))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(edges.get(child, ())))))
    return None


def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Edges between packages; the assembly is a node of its own ("<assembly>")."""
    modules = _modules(root)
    graph = _internal(_imports(root))

    def node(m: str) -> str:
        return "<assembly>" if m in ASSEMBLY else package_of(m, modules)
    edges: dict[str, set[str]] = {}
    for m, targets in graph.items():
        for t in targets:
            if node(m) != node(t):
                edges.setdefault(node(m), set()).add(node(t))
    return edges


def test_the_graph_reader_sees_late_and_relative_imports(tmp_path):
    """The reader itself: a function-level relative import is an edge, and two packages that
    import each other (the shape of the old acme/cli.py <-> scepd/cli.py) are a cycle."""
    (tmp_path / "scepd").mkdir()
    (tmp_path / "acme").mkdir()
    (tmp_path / "agent").mkdir()
    for d in ("scepd", "acme", "agent"):
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "scepd" / "cli.py").write_text("def f():\n    from acme.cli import g\n")
    (tmp_path / "acme" / "cli.py").write_text("from scepd.cli import f\nfrom . import cli as me\n")
    imports = _imports(tmp_path)
    assert imports["scepd.cli"] == {"acme.cli"}
    assert imports["acme.cli"] == {"scepd.cli"}
    modules = _modules(tmp_path)
    edges: dict[str, set[str]] = {}
    for m, ts in _internal(imports).items():
        edges.setdefault(package_of(m, modules), set()).update(package_of(t, modules) for t in ts)
    assert find_cycle(edges) in (["acme", "scepd", "acme"], ["scepd", "acme", "scepd"])


def test_no_cycle_between_packages():
    edges = package_graph()
    assert {"scepd", "scepd.scep", "scepd.store", "acme", "agent"} <= set(edges) | {
        t for ts in edges.values() for t in ts}
    cycle = find_cycle(edges)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle or [])


def test_only_the_assembly_imports_acme():
    offenders = {m: sorted(t for t in ts if t == "acme" or t.startswith("acme."))
                 for m, ts in _imports().items() if m.startswith("scepd") and m not in ASSEMBLY}
    assert {m: ts for m, ts in offenders.items() if ts} == {}
    assert any(t.startswith("acme") for t in _imports()["scepd.http.assembly"])


def test_nothing_imports_the_assembly():
    """The front-ends and the core get what they need from the assembly (hooks, the click
    context), never by importing it: otherwise acme -> scepd.cli -> acme again."""
    offenders = {m: sorted(ts & ASSEMBLY) for m, ts in _imports().items() if m not in ASSEMBLY}
    assert {m: ts for m, ts in offenders.items() if ts} == {}


def _reach(core: str, graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Every outside package `core` imports, directly or through scepd's own modules:
    top-level name -> the scepd modules that import it."""
    seen, todo, found = {core}, [core], {}
    while todo:
        m = todo.pop()
        for t in graph[m]:
            if t in graph:
                if t.startswith("scepd") and t not in seen:
                    seen.add(t)
                    todo.append(t)
            else:
                found.setdefault(t.split(".")[0], set()).add(m)
    return found


def test_core_modules_import_no_web_framework_or_wire_codec():
    graph = _imports()
    for core in CORE:
        direct = {t.split(".")[0] for t in graph[core] if t not in graph}
        assert not direct & set(FORBIDDEN_IN_CORE), core
        reach = _reach(core, graph)
        assert "aiohttp" not in reach and "josepy" not in reach, (core, reach)
    # errors and the store reach no ASN.1 codec either; policy, authority and enrollment do, through
    # scepd.ca.csr (CsrFacts lives beside the asn1crypto CSR decoder)
    for core in ("scepd.errors", "scepd.store", "scepd.store.records", "scepd.store.sql"):
        assert "asn1crypto" not in _reach(core, graph), core
