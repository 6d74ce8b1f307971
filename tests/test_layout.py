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


def test_backends_are_chosen_by_capability_not_by_name():
    """Outside backends/, no code compares anything with a backend's name, nor imports a backend's
    module (tune.py measures llama.cpp's weight copies and imports it by design); callers ask the
    registry and check Capabilities. A model's kind ("mlx": an mlx-lm directory) and a conversion
    target (`--to mlx`) are not backend names."""
    from magpie_local.backends import BACKENDS

    names = set(BACKENDS)
    offenders = []
    for f in PACKAGE.rglob("*.py"):
        relative = f.relative_to(PACKAGE)
        if relative.parts[0] == "backends":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                named = [s for s in sides if isinstance(s, ast.Constant) and s.value in names]
                others = [s for s in sides if s not in named]
                allowed = all(isinstance(o, ast.Attribute) and o.attr == "kind" or isinstance(o, ast.Name)
                              and o.id == "to" for o in others)
                if named and not allowed:
                    offenders.append(f"{relative}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.module and str(relative) != "tune.py":
                if any(node.module.endswith(f"backends.{n}") for n in names):
                    offenders.append(f"{relative}:{node.lineno} imports {node.module}")
    assert offenders == []
    assert set(BACKENDS) == {"llamacpp", "mlx", "server"}  # the names the check looks for are the registry's
