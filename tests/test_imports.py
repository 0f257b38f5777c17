"""The import graph the design asks for, read from the source (every import, including those under
``TYPE_CHECKING``): ``scorer`` and ``vllm_sim`` import nothing of the other parts, ``podstate`` only
``scorer``, and no module of ``scorer`` or of the gateway's request path is part of a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("scorer", "podstate", "gateway", "vllm_sidecar", "vllm_sim", "bench", "loraroute")


def module_imports(package: str) -> dict[str, set[str]]:
    """module name -> the project modules it imports (``from a.b import c`` counts a.b and a.b.c)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d.split(".")[0] in PARTS and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary circle found by a depth-first walk (each reported once, from its smallest node)."""
    found: set[tuple[str, ...]] = set()

    def walk(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if dep in path:
                loop = path[path.index(dep):]
                k = loop.index(min(loop))
                found.add(tuple(loop[k:] + loop[:k]))
            elif len(path) < 12:
                walk(dep, [*path, dep])

    for start in graph:
        walk(start, [start])
    return [list(c) for c in sorted(found)]


def test_parts_import_one_way() -> None:
    allowed = {"scorer": {"scorer"}, "vllm_sim": {"vllm_sim"}, "podstate": {"podstate", "scorer"}}
    for part, ok in allowed.items():
        for module, deps in module_imports(part).items():
            bad = {d for d in deps if d.split(".")[0] not in ok}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_no_import_circle_in_scorer_or_gateway() -> None:
    for part in ("scorer", "gateway"):
        assert cycles(module_imports(part)) == [], part


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
