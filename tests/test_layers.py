"""The package's imports run one way: no cycles, and each part imports only the parts
beneath it. An AST scan of zmqchat/ (every import statement counts: at the top, inside a
function, or under `if TYPE_CHECKING:`), so the rule holds for lazy imports too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "zmqchat"

# Each part of the package, and the parts it may import (besides itself). A module belongs
# to the first part whose name it starts with (longest prefix first).
ALLOWED: dict[str, set[str]] = {
    # the bottom: the wire protocol and the log lines import nothing of ours
    "zmqchat.protocol": set(),
    "zmqchat._ops.logs": set(),
    # how the programs describe themselves (--help, /help, the README's tables)
    "zmqchat._usage": set(),
    # the broker's core: no I/O, no broker loop, no metrics exporter, no store, no cluster
    "zmqchat._core": {"zmqchat.protocol", "zmqchat._ops.logs"},
    # how a broker was started (flags): the core's rules only
    "zmqchat._config": {"zmqchat._core"},
    # file contents on disk (one broker's store, a cluster broker's cache)
    "zmqchat._blobs": {"zmqchat.protocol", "zmqchat._core"},
    # the full-text index and edits of a history database (one broker's, a cluster broker's)
    "zmqchat._index": {"zmqchat.protocol"},
    # the two implementations of the state interfaces
    "zmqchat._local": {
        "zmqchat.protocol",
        "zmqchat._ops.logs",
        "zmqchat._core",
        "zmqchat._blobs",
        "zmqchat._index",
    },
    "zmqchat._cluster": {
        "zmqchat.protocol",
        "zmqchat._ops.logs",
        "zmqchat._core",
        "zmqchat._config",
        "zmqchat._blobs",
        "zmqchat._index",
    },
    # the operator's side reads the core's counters through its own interface
    "zmqchat._ops.metrics": {"zmqchat._core"},
    # the broker's loop and flags: everything of the broker's side
    "zmqchat.broker": {
        "zmqchat.protocol",
        "zmqchat._ops",
        "zmqchat._core",
        "zmqchat._config",
        "zmqchat._local",
        "zmqchat._cluster",
        "zmqchat._usage",
        "zmqchat._blobs",
        "zmqchat._index",
    },
    # the client library knows nothing of what is built on it
    "zmqchat._client": {"zmqchat.protocol"},
    "zmqchat._bot": {"zmqchat.protocol", "zmqchat._client"},
    "zmqchat._cli": {"zmqchat.protocol", "zmqchat._client", "zmqchat._usage"},
    # the public API and `python -m zmqchat`
    "zmqchat.__main__": {"zmqchat._cli"},
    "zmqchat": {"zmqchat._client", "zmqchat._bot"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def part_of(module: str) -> str:
    for part in sorted(ALLOWED, key=len, reverse=True):
        if module == part or module.startswith(part + "."):
            return part
    raise AssertionError(f"{module} belongs to no part of the package: add it to ALLOWED")


def imports_of(module: str) -> set[str]:
    """The package's modules that `module` imports, anywhere in its text."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from zmqchat import protocol` imports the module zmqchat.protocol
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_belongs_to_a_part():
    """Every module of the package is placed in the layering (a new one must be)."""
    for module in MODULES:
        part_of(module)


def test_each_part_imports_only_what_lies_beneath_it():
    """No import breaks the layers: the core never imports the broker, the store, the
    cluster or the exporter; the client library never imports the bot or the CLI."""
    broken = []
    for module, targets in GRAPH.items():
        part = part_of(module)
        for target in targets:
            other = part_of(target)
            if other != part and not any(
                other == ok or other.startswith(ok + ".") for ok in ALLOWED[part]
            ):
                broken.append(f"{module} imports {target}")
    assert not broken, "imports against the layers:\n" + "\n".join(sorted(broken))


def test_no_import_cycles():
    """No module reaches itself through imports, however lazy or TYPE_CHECKING-only."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_scan_sees_lazy_and_type_checking_imports():
    """The scan is not blind: it finds the imports it must (a lazy one inside a function,
    and the public API's TYPE_CHECKING ones)."""
    assert "zmqchat._cli.terminal" in GRAPH["zmqchat._cli.chat"]  # imported in a function
    assert {"zmqchat._bot", "zmqchat._client.library"} <= GRAPH["zmqchat"]
    assert "zmqchat._core.state" in GRAPH["zmqchat._core.base"]
