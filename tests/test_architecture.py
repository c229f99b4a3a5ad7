"""docs/architecture.md holds: its tree is the package's, every file its "where to change
what" table names exists, and the files that must change to add an intent, an event kind,
a setting, a transport or a CLI verb are among those the table lists. Every module path the
docs name exists."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from brokerexec.protocol.events import EVENT_KINDS
from brokerexec.protocol.intents import INTENTS, Answered, Intent
from brokerexec.settings import KEYS
from brokerexec.transport.schemes import SCHEMES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "brokerexec"
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
SOURCES = {path.relative_to(PACKAGE).as_posix(): path.read_text(encoding="utf-8")
           for path in PACKAGE.rglob("*.py")}


def _tree_files() -> set[str]:
    """The modules the page's tree lists, as paths under brokerexec/."""
    block = PAGE.split("<!-- the tree: every module of the package, by layer -->", 1)[1]
    block = block.split("```text\n", 1)[1].split("```", 1)[0]
    files: set[str] = set()
    folders: list[tuple[int, str]] = []  # (indent, folder) of the lines above
    for line in block.splitlines()[1:]:  # below "brokerexec/"
        indent = len(line) - len(line.lstrip())
        folders = [(i, f) for i, f in folders if i < indent]
        first = line.split()[0]
        if first.endswith("/"):
            folders.append((indent, first))
        where = "".join(folder for _, folder in folders)
        for name in re.findall(r"(?<![\w/])([a-z_]+\.py)\b", line):
            if line.lstrip().startswith(name) or "·" in line or first.endswith("/") or indent > 4:
                files.add(where + name)
    return files


def test_the_tree_lists_every_module_of_the_package_and_no_other() -> None:
    listed = _tree_files()
    packages = {name for name in SOURCES if name.endswith("/__init__.py")}  # may be left out
    assert set(SOURCES) - packages - listed == set(), "modules the tree does not list"
    assert listed - set(SOURCES) == set(), "files the tree lists that do not exist"


def _rows() -> dict[str, set[str]]:
    """Each row of "Where to change what": its first cell, and the files it names."""
    table = PAGE.split("## Where to change what", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = line.split("|")[1:-1]
        if len(cells) != 3 or cells[0].strip() in ("to", "---"):
            continue
        named = re.findall(r"`([\w/.<>]+\.(?:py|md))`|`([\w/]+/)`", "|".join(cells[1:]))
        rows[cells[0].strip()] = {file or folder for file, folder in named}
    return rows


def _exists(name: str) -> bool:
    return (ROOT / name).exists() or (PACKAGE / name).exists() or name.endswith("<flag>")


def test_every_file_the_table_names_exists() -> None:
    rows = _rows()
    assert len(rows) >= 12
    missing = {row: sorted(n for n in names if not _exists(n)) for row, names in rows.items()}
    assert {row: names for row, names in missing.items() if names} == {}


def _literals(source: str) -> set[str]:
    """The string constants of a module's code (its docstrings left out)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings}


def _mentions_all(names: list[str]) -> Callable[[str], bool]:
    return lambda source: all(re.search(rf"\bIntent\.{name}\b", source) for name in names)


#: For each row, how to find the modules that enumerate what it adds (each must change).
CENSUS: dict[str, list[Callable[[str], bool]]] = {
    "add an intent": [
        _mentions_all([intent.name for intent in Intent]),
        _mentions_all([i.name for i in Intent if INTENTS[i].answered is Answered.AT_READY]),
        _mentions_all([i.name for i in Intent if INTENTS[i].answered is not Answered.AT_READY]),
    ],
    "add an event kind": [lambda source: set(EVENT_KINDS) <= _literals(source)],
    "add a setting": [lambda source: all(re.search(rf"\b{key.path[-1]}\b", source) for key in KEYS)],
    "add a transport": [lambda source: sum(
        any(text in (name, f"{name}://") for text in _literals(source))
        for name in SCHEMES) >= 2],
    "add a CLI verb": [lambda source: "add_command(" in source or "COMMANDS = " in source],
}


@pytest.mark.parametrize("row", sorted(CENSUS))
def test_what_must_change_to_add_one_is_in_its_row(row: str) -> None:
    listed = _rows()[row]
    needed = {name for name, source in SOURCES.items() if any(test(source) for test in CENSUS[row])}
    assert needed, f"the census of {row!r} found nothing: it no longer bites"
    assert needed - listed - {"cli/app.py"} == set(), f"{row}: modules to change that the row omits"


def test_every_module_path_the_docs_name_exists() -> None:
    # `brokerexec/x/y.py` and brokerexec.x.y (a module, or a name in one) in every page
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    wrong = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for path in re.findall(r"brokerexec/[\w/]+\.py", text):
            if not (ROOT / path).exists():
                wrong.append(f"{page.name}: {path}")
        for dotted in re.findall(r"\bbrokerexec(?:\.[a-z_]+)+", text):
            parts = dotted.split(".")
            if not any((PACKAGE.joinpath(*parts[1:i]).with_suffix(".py")).exists()
                       or (PACKAGE.joinpath(*parts[1:i]) / "__init__.py").exists()
                       for i in range(len(parts), 1, -1)) and len(parts) > 1 and parts[1] in {
                           path.stem for path in PACKAGE.iterdir()}:
                wrong.append(f"{page.name}: {dotted}")
    assert wrong == []
