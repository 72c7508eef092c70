"""The architecture, pinned: which packages may import which, and where SQL may be written.

Read from the source with ``ast`` (nothing is imported). Each exception is listed here with
its reason; a listed exception that no longer occurs fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("edge_agent", "cloud_hub", "hub_protocol")

# Package-level import circles still present, with why. Remove an entry when it is fixed.
KNOWN_CIRCLES: dict[frozenset[str], str] = {
    # results, lifecycle -> sync (the outbox) and inference -> results, lifecycle are meant;
    # the edge closing the circle is sync -> inference:
    frozenset(
        {"edge_agent.inference", "edge_agent.sync", "edge_agent.results", "edge_agent.lifecycle"}
    ): (
        "sync/model_updates.py still holds the automatic rollback, re-runs and shadow "
        "comparison (inference logic) and imports inference; issue 13 step 1 moves them to "
        "inference/ (not done yet)"
    ),
}

# SQL lives in store modules: a module named store.py or queries.py, one inside a store/
# package, or a migrations module. The others that write SQL, with why.
SQL_ALLOWED: dict[str, str] = {
    "edge_agent/sync/outbox.py": "the outbox table's own module (enqueue, batches, receipts)",
    "edge_agent/sync/state.py": "the sync_state table's own module (HLC, cursors)",
    "edge_agent/web/accounts.py": "the account store (users, sessions, tokens)",
    "edge_agent/audit.py": "the audit_log table's own module (rows and their hash chain)",
    "edge_agent/inference/registry.py": "the model_versions table's own module",
    "edge_agent/results/forward.py": "the forwards queue's own module",
    "edge_agent/lifecycle/tiers.py": "moves instance rows with their files (one transaction)",
}
# Not yet moved (issue 13, remaining): listed so that the test says where SQL still is.
SQL_NOT_YET_MOVED: dict[str, str] = {
    "edge_agent/lifecycle/manager.py": "the Lifecycle split into a lifecycle store is not done",
    "edge_agent/sync/model_updates.py": "moves with the rollout logic to inference/",
    "edge_agent/sync/uplink.py": "cursor and connectivity rows, to sync/state.py",
    "edge_agent/app.py": "startup checks (orphans, missing files), to the studies store",
    "edge_agent/status.py": "status reads, to the stores they read",
    "edge_agent/cli/users.py": "the audit export query, to web/accounts.py",
}

SQL = re.compile(
    r"^\s*(SELECT\b|INSERT\s+(OR\s+\w+\s+)?INTO\b|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b|"
    r"CREATE\s+(TABLE|INDEX|UNIQUE)|WITH\s+\w+\s+AS\b|ALTER\s+TABLE\b|DROP\s+(TABLE|INDEX)\b)",
    re.IGNORECASE,
)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _unit(module: str) -> str:
    """The unit an import edge is counted between: a sub-package of edge_agent (or a
    top-level module of it), or a whole other package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "edge_agent" and len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in _modules().items():
        src = _unit(module)
        for target in _imports(path):
            if _unit(target) != src:
                edges[src].add(_unit(target))
    return edges


def _circles(edges: dict[str, set[str]]) -> set[frozenset[str]]:
    """Each strongly connected group of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.add(frozenset(group))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_hub_and_contract_never_import_the_edge() -> None:
    bad = [
        f"{module} imports {target}"
        for module, path in _modules().items()
        if not module.startswith("edge_agent")
        for target in _imports(path)
        if target.startswith("edge_agent")
    ]
    assert bad == []


def test_the_contract_imports_nothing_of_ours_but_itself() -> None:
    bad = [
        f"{module} imports {target}"
        for module, path in _modules().items()
        if module.startswith("hub_protocol")
        for target in _imports(path)
        if not target.startswith("hub_protocol")
    ]
    assert bad == []


def test_no_import_circle_between_packages() -> None:
    assert _circles(_graph()) == set(KNOWN_CIRCLES)


def test_no_import_circle_between_the_web_modules() -> None:
    modules = {m: p for m, p in _modules().items() if m.startswith("edge_agent.web.")}
    edges = {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items()}
    assert _circles(edges) == set()


def _is_store_module(rel: str) -> bool:
    name = Path(rel).name
    return (
        name in ("store.py", "queries.py", "migrations.py")
        or "/store/" in rel
        or name.startswith("migrations")
    )


def _leading_text(node: ast.AST) -> str:
    """The text a string literal starts with (an f-string's first literal part too)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _leading_text(node.values[0])
    return ""


def test_sql_only_in_store_modules() -> None:
    with_sql = set()
    for path in _modules().values():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if SQL.match(_leading_text(node)):
                with_sql.add(rel)
                break
    outside = {rel for rel in with_sql if not _is_store_module(rel)}
    assert outside - set(SQL_ALLOWED) - set(SQL_NOT_YET_MOVED) == set(), "SQL outside a store"
    listed = set(SQL_ALLOWED) | set(SQL_NOT_YET_MOVED)
    assert listed - outside == set(), "listed exceptions that no longer write SQL"
