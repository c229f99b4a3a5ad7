"""The package keeps its shape: layers, no import cycles, AMQP libraries in ``transport/``.

Read from the source with ``ast`` (nothing is imported): module-level imports only, the
ones a module makes when it is loaded. Imports inside functions (the CLI's, to stay fast)
and under ``if TYPE_CHECKING:`` (annotations only) are not edges of the graph.
"""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "brokerexec"
AMQP_LIBRARIES = {"pika", "aio_pika", "aiormq", "pamqp"}
#: The core: what runs a job, knowing nothing of how messages travel.
CORE = {"service", "ports", "states", "crossing", "signal_desk", "computation", "handler",
        "runner", "pool", "registry", "errors", "constants", "codec", "codec_yaml",
        "back_channel", "child_runner", "child_computation", "child_main"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _parse(source: str) -> ast.Module:
    # With the garbage collector off: CPython 3.11 raises "SystemError: AST constructor
    # recursion depth mismatch" when a collection during ast.parse runs finalizers (left by
    # earlier tests: aio-pika's and asyncio's objects) that change the thread's recursion
    # depth (after the transport tests, every time).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


def module_level_imports(path: Path) -> set[str]:
    """Absolute names of what ``path`` imports when it is loaded."""
    tree = _parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    stem = ".".join([*base, node.module] if node.module else base)
                else:
                    stem = node.module or ""
                found.add(stem)
                found.update(f"{stem}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def internal_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at load time."""
    return {name: {target for target in module_level_imports(path) if target in MODULES and target != name}
            for name, path in MODULES.items()}


def test_no_import_cycle() -> None:
    graph = internal_graph()
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target):], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(f"brokerexec.{m}" for m in CORE))
def test_the_core_imports_no_transport_and_no_amqp_library(name: str) -> None:
    imports = module_level_imports(MODULES[name])
    assert not {i for i in imports if i.split(".")[0] in AMQP_LIBRARIES}
    assert not {i for i in imports if i.startswith("brokerexec.transport")}
    # nor anything that does, indirectly
    graph = internal_graph()
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        for target in graph[current] - seen:
            seen.add(target)
            todo.append(target)
    assert not {m for m in seen if m.startswith("brokerexec.transport")}, seen


def test_amqp_libraries_are_imported_only_under_transport() -> None:
    offenders = {name: sorted(i for i in module_level_imports(path) if i.split(".")[0] in AMQP_LIBRARIES)
                 for name, path in MODULES.items() if not name.startswith("brokerexec.transport.")}
    assert {name: found for name, found in offenders.items() if found} == {}
    # Inside functions too: the CLI and the clients import a transport, never a library.
    for name, path in MODULES.items():
        if name.startswith("brokerexec.transport."):
            continue
        for node in ast.walk(_parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""])
                assert not {m.split(".")[0] for m in modules} & AMQP_LIBRARIES, (name, modules)


def test_the_protocol_does_no_io() -> None:
    for name, path in MODULES.items():
        if name.startswith("brokerexec.protocol"):
            imports = {i.split(".")[0] for i in module_level_imports(path)}
            assert not imports & (AMQP_LIBRARIES | {"socket", "asyncio", "threading", "select"}), name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_is_at_most_400_lines(name: str) -> None:
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_library_internals_are_used_in_one_adapter_each() -> None:
    """aiormq's and pika's private members appear only in their adapter modules."""
    markers = {"write_queue": "aiormq_internals", "confirmations": "aiormq_internals",
               "_output_marshaled_frames": "pika_internals", "._impl": "pika_internals"}
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        for marker, home in markers.items():
            if marker in text and not name.endswith(home):
                code = [line for line in text.splitlines()
                        if marker in line and not line.lstrip().startswith(("#", "*", "``"))]
                assert not code, f"{name} uses {marker}: {code}"
