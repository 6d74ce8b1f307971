"""The library's shape: SQL only in the store, no import cycles, one error base."""

import ast
import re
from pathlib import Path

import magpie_local as ml

PACKAGE = Path(ml.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def test_sql_lives_in_the_store_only():
    sql = re.compile(r"\.execute\(|\bSELECT\b|\bINSERT\b|\bDELETE FROM\b|\.conn\b|\.atomic\(")
    offenders = [f"{f.relative_to(PACKAGE)}:{i}" for f in PACKAGE.rglob("*.py") if f.name != "store.py"
                 for i, line in enumerate(f.read_text().splitlines(), 1) if sql.search(line)]
    assert offenders == []


def test_no_import_cycles():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        package = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):  # lazy imports inside functions count too
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                graph[m].update(subs)
                if base in mods and len(subs) < len(node.names):
                    graph[m].add(base)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
        graph[m].discard(m)

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert cycles == []


def test_every_error_shares_one_base():
    modules = [__import__(m, fromlist=["_"]) for m in _modules() if not m.endswith("__main__")]
    errors = [(name, obj) for module in modules for name, obj in vars(module).items()
              if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__.startswith("magpie_local")
              and not name.startswith("_")]  # private ones are control flow (server retries), never shown
    assert errors and all(issubclass(obj, ml.MagpieError) for _, obj in errors), errors
