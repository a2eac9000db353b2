"""The layout DESIGN.md describes, read from the code's own imports (every import that runs, lazy
ones too; `if TYPE_CHECKING:` blocks are annotations only):
no import circle, packages importing one way, plan types that stand alone, codecs reached by name,
no module past ~500 lines. A change that breaks one of these fails here, not in a later review."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "streammerge"
# lower first: a package may import only those before it (and the top-level helper modules)
ORDER = ("formats", "adapters", "planning", "hub", "run", "verification")
MAX_LINES = 550
# bitsandbytes' own planning and checks (merged_4bit) name its modules; nothing else outside the codecs does
CODEC_USERS = {"streammerge.formats.quantized", "streammerge.formats.compressed_tensors", "streammerge.planning.quant", "streammerge.verification.quant"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                       for n in ast.walk(block)}  # never run: annotations only
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package, one level up per extra dot
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name and t != "streammerge")
    return graph


MODULES = _modules()
GRAPH = _imports(MODULES)


def test_the_import_graph_is_read():
    """Known edges (relative, absolute and lazy imports) are seen, so the checks below see everything."""
    assert GRAPH["streammerge.verification.verifier"] >= {"streammerge.verification.dispatch", "streammerge.verification.folders"}
    assert "streammerge.formats.codecs" in GRAPH["streammerge.verification.base"]
    assert "streammerge.run.pipeline" in GRAPH["streammerge.verification.verifier"]  # imported inside run()
    assert len(MODULES) > 50 and sum(map(len, GRAPH.values())) > 200


def test_no_import_circle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in sorted(MODULES):
        if m not in index:
            visit(m)
    assert circles == []


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and MODULES[module].name == "__init__.py") else None


def test_packages_import_one_way():
    upward = []
    for m, targets in GRAPH.items():
        here = _package(m)
        if here not in ORDER:
            continue
        for t in targets:
            there = _package(t)
            if there is None:  # a top-level module: only the small shared ones (errors, options, ...)
                assert t.split(".")[1] not in ("api", "cli", "demo", "live", "__main__"), (m, t)
            elif there != here and ORDER.index(there) > ORDER.index(here):
                upward.append((m, t))
    assert upward == []


def test_plan_types_stand_alone():
    allowed = {"streammerge.errors", "streammerge.options", "streammerge.version"}
    assert GRAPH["streammerge.planning.types"] <= allowed


def test_codecs_are_reached_by_name():
    named = {(m, t) for m, ts in GRAPH.items() for t in ts
             if t.startswith("streammerge.formats.codecs.") and not m.startswith("streammerge.formats.codecs")}
    assert {m for m, _ in named} <= CODEC_USERS, sorted(named)


def test_no_module_grows_past_the_limit():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}
