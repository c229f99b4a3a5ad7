"""The package keeps its shape: layers that import only the layers below them, no import
circle, AMQP libraries only in their transports, no I/O in the protocol.

Read from the source with ``ast`` (nothing is imported). Every import counts: at module
level, inside functions (the CLI's, made late to start fast) and under ``if TYPE_CHECKING:``
(annotations only), since each is a dependency a reader must follow.
"""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "brokerexec"

#: Each layer, from the bottom, and the layers it may import (besides itself).
LAYERS: dict[str, set[str]] = {
    "base": set(),  # errors, constants, logs, urls, codec/, settings/
    "protocol": {"base"},
    "core": {"base", "protocol"},
    "transport": {"base", "protocol"},
    "history": {"base", "protocol", "transport"},  # the store, fed by the journal
    "operations": {"base", "protocol"},  # an operation's items and their registry, sans-I/O
    "child": {"base", "protocol", "core"},
    "worker": {"base", "protocol", "core", "child", "transport"},
    "client": {"base", "protocol", "core", "transport", "worker", "history", "operations"},
    "web": {"base", "protocol", "client", "history", "operations"},  # over a Client and the store
    "cli": {"base", "protocol", "core", "transport", "child", "worker", "client", "history", "operations",
            "web"},
    "face": {"base", "protocol", "core", "transport", "child", "worker", "client", "cli", "history",
             "operations", "web"},
}
BASE = {"errors", "constants", "logs", "urls", "codec", "settings"}
#: brokerexec/__init__.py (the public face), __main__ and the old paths' table.
FACE = {"brokerexec", "brokerexec.__main__", "brokerexec._moved"}
#: The AMQP libraries, and the one transport each may be imported in.
AMQP_LIBRARIES = {"aio_pika": "brokerexec.transport.rabbitmq", "aiormq": "brokerexec.transport.rabbitmq",
                  "pamqp": "brokerexec.transport.rabbitmq", "pika": "brokerexec.transport.pika"}
#: What the protocol, written once and free of I/O, never imports.
IO_MODULES = {*AMQP_LIBRARIES, "socket", "asyncio", "threading", "select", "ssl", "subprocess"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Absolute names of everything module ``name`` imports, wherever it imports it: a
    package's module when ``from package import module``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(_parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            for alias in node.names:  # a module of the package, or a name of module ``stem``
                found.add(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in MODULES else stem)
    return found


GRAPH = {name: {target for target in imports_of(name) if target in MODULES and target != name}
         for name in MODULES}


def layer_of(name: str) -> str:
    if name in FACE:
        return "face"
    second = name.split(".")[1]
    return "base" if second in BASE else second


def test_every_module_is_in_a_layer_of_the_table() -> None:
    assert {layer_of(name) for name in MODULES} <= set(LAYERS)


def test_no_import_circle_counting_lazy_and_type_only_imports() -> None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                circle = [*stack[stack.index(target):], target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_imports_only_its_layer_and_the_layers_below(name: str) -> None:
    layer = layer_of(name)
    allowed = LAYERS[layer] | {layer}
    upward = {target: layer_of(target) for target in GRAPH[name] if layer_of(target) not in allowed}
    assert upward == {}, f"{name} ({layer}) imports from layers above it"


def test_the_face_of_an_empty_package_is_a_docstring() -> None:
    # Packages that group modules say what they hold; their code lives in the modules.
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "brokerexec":
            assert ast.get_docstring(_parse(path.read_text(encoding="utf-8"))), name


def test_amqp_libraries_are_imported_only_in_their_transport() -> None:
    offenders = {}
    for name in MODULES:
        for library, home in AMQP_LIBRARIES.items():
            used = {i for i in imports_of(name) if i.split(".")[0] == library}
            if used and not name.startswith(home + "."):
                offenders[name] = sorted(used)
    assert offenders == {}


def test_the_protocol_does_no_io() -> None:
    for name in MODULES:
        if name.startswith("brokerexec.protocol"):
            assert not {i.split(".")[0] for i in imports_of(name)} & IO_MODULES, name


def test_library_internals_are_used_in_one_adapter_each() -> None:
    """aiormq's and pika's private members appear only in their adapter modules."""
    markers = {"write_queue": "rabbitmq.aiormq_internals", "confirmations": "rabbitmq.aiormq_internals",
               "_output_marshaled_frames": "pika.internals", "._impl": "pika.internals"}
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        for marker, home in markers.items():
            if marker in text and not name.endswith(home):
                code = [line for line in text.splitlines()
                        if marker in line and not line.lstrip().startswith(("#", "*", "``"))]
                assert not code, f"{name} uses {marker}: {code}"
