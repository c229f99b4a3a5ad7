"""The examples in README.md and docs/ hold: Python blocks run as written, every brokerexec
command in a shell block parses with the real CLI, TOML blocks parse (a doc that lies is a bug)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import tomllib
from cli_lines import brokerexec_commands, parse_command

from brokerexec.core.registry import ENTRY_POINT_GROUP

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
SHELL = re.compile(r"```sh\n(.*?)```", re.DOTALL)
TOML = re.compile(r"```toml\n(.*?)```", re.DOTALL)


def _python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [p for p in DOCS if _python_blocks(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path: Path) -> None:
    # Blocks of one page share a namespace, as a reader would paste them one after another.
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for number, block in enumerate(_python_blocks(path), 1):
        if block.lstrip().startswith("# not run"):
            continue
        code = compile(block, f"{path.name}[block {number}]", "exec")
        exec(code, namespace)


def _brokerexec_lines(path: Path) -> list[str]:
    # A line ending in a backslash goes on in the next, as in the shell.
    return [line for block in SHELL.findall(path.read_text(encoding="utf-8"))
            for line in block.replace("\\\n", " ").splitlines() if brokerexec_commands(line)]


@pytest.mark.parametrize("path", [p for p in DOCS if _brokerexec_lines(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_examples_are_commands_the_cli_accepts(path: Path) -> None:
    # Not run (they need workers, a broker, a service file of the reader's), but parsed by the
    # real click group: a renamed or removed option in a doc fails here.
    for line in _brokerexec_lines(path):
        for argv in brokerexec_commands(line):
            try:
                parse_command(argv)
            except click.UsageError as exc:
                pytest.fail(f"{path.name}: {line!r}: {exc.format_message()}")


@pytest.mark.parametrize("path", [p for p in DOCS if TOML.findall(p.read_text(encoding="utf-8"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_toml_examples_parse_and_name_the_real_entry_point_group(path: Path) -> None:
    for block in TOML.findall(path.read_text(encoding="utf-8")):
        groups = tomllib.loads(block).get("project", {}).get("entry-points", {})
        for group, points in groups.items():
            assert group == ENTRY_POINT_GROUP, group
            assert all(":" in target for target in points.values())


def test_readme_commands_are_the_ones_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in readme and "<!-- main-command -->" in readme
    assert "<!-- test-command -->" in ci
    test_command = readme.split("<!-- test-command -->")[1].split("```sh\n")[1].split("\n")[0]
    assert "pytest" in test_command and "pip install" in test_command
