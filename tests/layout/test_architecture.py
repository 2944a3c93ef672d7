"""The import rules of docs/architecture.md, checked on the source (no import is executed).

Every import counts, including those deferred into functions (they are how cycles hide); imports
under ``if TYPE_CHECKING:`` do not.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set:
    """Absolute names of the modules (or names in modules) that ``path`` imports."""
    tree = ast.parse(path.read_text(), str(path))
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()

    def visit(nodes):
        for n in nodes:
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                visit(n.orelse)
                continue
            if isinstance(n, ast.Import):
                found.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                    target = ".".join(base + ([n.module] if n.module else []))
                else:
                    target = n.module or ""
                found.update(f"{target}.{a.name}" for a in n.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(n, field, None)
                if isinstance(child, list):
                    visit(child)

    visit(tree.body)
    return found


MODULES = {_module(p): p for top in ("engine", "variants") for p in (ROOT / top).rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The module an imported name belongs to (``engine.x.y`` or its longest module prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {
    m: {t for t in (_resolve(i) for i in _imports(p)) if t and t != m and t.startswith(("engine", "variants"))}
    for m, p in MODULES.items()
}


def _edges_with_packages(m: str) -> set:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first."""
    out = set(GRAPH[m])
    for t in GRAPH[m]:
        parts = t.split(".")
        out.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in MODULES)
    return {t for t in out if t != m and not m.startswith(t + ".")}


def test_no_import_cycle_among_engine_modules():
    graph = {m: _edges_with_packages(m) for m in MODULES}
    seen, stack, on_stack = {}, [], set()
    cycles = []

    def walk(v):  # iterative-enough DFS for a graph of ~150 modules
        seen[v] = True
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w in on_stack:
                cycles.append(stack[stack.index(w) :] + [w])
            elif w not in seen:
                walk(w)
        stack.pop()
        on_stack.discard(v)

    for v in sorted(graph):
        if v not in seen:
            walk(v)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


@pytest.mark.parametrize(
    "layer, may_import",
    [
        # the contract: arrays, checks and problem types; mods compile through the kernels' helpers
        ("engine.problems", ("engine.problems", "engine.kernels", "engine.runtime")),
        # kernels: pure functions; only the JIT cache's configuration above them
        ("engine.kernels", ("engine.kernels", "engine.runtime.jit_cache")),
        ("engine.runtime", ("engine.runtime", "engine.kernels")),
        (
            "engine.backends",
            ("engine.backends", "engine.problems", "engine.kernels", "engine.runtime", "engine.plugins"),
        ),
        ("engine.plugins", ("engine.plugins", "engine.runtime", "engine.variant")),
        # call plans: keys and per-call checks over the contract; no backend (ops come in plans)
        ("engine.plan", ("engine.plan", "engine.problems", "engine.kernels", "engine.runtime", "engine.plugins")),
    ],
)
def test_layers_import_downward_only(layer, may_import):
    bad = {
        (m, t)
        for m, ts in GRAPH.items()
        if m == layer or m.startswith(layer + ".")
        for t in ts
        if not any(t == ok or t.startswith(ok + ".") for ok in may_import)
    }
    assert not bad, f"{layer} imports above itself: {sorted(bad)}"


def test_variants_import_only_the_public_engine_namespace():
    """The built-in variants are the first plugins: they use what a third-party plugin can."""
    bad = {
        (m, i)
        for m, p in MODULES.items()
        if m.startswith("variants")
        for i in _imports(p)
        if i.startswith("engine") and _resolve(i) != "engine"  # a name of engine/__init__.py is fine
    }
    assert not bad, f"variants import engine internals: {sorted(bad)}"


def test_no_module_over_450_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"
