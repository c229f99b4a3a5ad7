"""The docs site builds with warnings as errors, and its references are generated from the code.

``mkdocs build --strict`` fails on a broken link or anchor, a page left out of the nav, and a
docstring whose parameters do not match its signature (mkdocstrings' griffe). The reference
pages are checked for what the code has, so a reference that stopped being generated (an
empty page builds too) fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

import brokerexec
from brokerexec.cli.app import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


@pytest.mark.timeout(150)
def test_python_reference_documents_every_exported_class(site: Path) -> None:
    anchors = set(re.findall(r'id="(brokerexec[.\w]*)"', page(site, "reference/python")))
    missing = {name for name in brokerexec.__all__ if not name.startswith("__")
               and not {f"brokerexec.{name}", f"brokerexec.errors.{name}"} & anchors}
    assert not missing
    # methods too, with their docstrings
    assert {"brokerexec.Client.launch_many", "brokerexec.Job.set",
            "brokerexec.ServiceHandler.ready"} <= anchors


@pytest.mark.timeout(150)
def test_cli_reference_lists_every_verb_and_option(site: Path) -> None:
    html = page(site, "reference/cli")
    context = click.Context(cli)
    for verb in cli.list_commands(context):
        command = cli.get_command(context, verb)
        assert command is not None and f"brokerexec {verb}" in html, verb
        for parameter in command.params:
            for option in getattr(parameter, "opts", []):
                if option.startswith("--"):
                    assert option in html, (verb, option)


def test_every_page_is_in_the_nav() -> None:
    # strict mode warns about omitted pages too; this says which, without a build
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(entries: list[object]) -> set[str]:
        found: set[str] = set()
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            found |= pages(value) if isinstance(value, list) else {str(value)}
        return found

    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk == pages(config["nav"])
