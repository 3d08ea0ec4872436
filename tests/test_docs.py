"""The documentation against the code: what can rot when one changes without the other.

Links between the pages and to repository files must lead somewhere (and a
``#section`` of a page to one of its headings); every
``--option`` the operator's page mentions must be one that some pmk command (or
one of the scripts it tells people to run) accepts; every ``PMK_*`` variable the
pages mention must be one that pmk or a script reads.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from pmk.cli import build_parser
from pmk.config import OPTIONS
from pmk.config_layers import CONFIG_ENV

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OPERATORS = REPO / "docs" / "operators.md"
SCRIPTS = sorted((REPO / "scripts").iterdir())

# [text](target): the target up to a space or ")"; images and inline links alike.
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A long option as written in prose or a command: --word or --word-word.
LONG_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
ENV_VARIABLE = re.compile(r"\bPMK_[A-Z][A-Z0-9_]*\b")


def _relative_links(page: Path) -> list[str]:
    """Link targets that are files of the repository, with their ``#section`` if any."""
    return [
        target
        for target in LINK.findall(page.read_text(encoding="utf-8"))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # not a URL
    ]


def _anchors(page: Path) -> set[str]:
    """The ``#section`` names of a Markdown page's headings, as GitHub spells them."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def _command_options() -> set[str]:
    """Every option string of every ``pmk`` subcommand (serve's from the option table)."""
    found: set[str] = set()
    parser = build_parser()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                for sub_action in subparser._actions:
                    found.update(sub_action.option_strings)
    return found


def _script_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in SCRIPTS if path.is_file())


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_relative_links_lead_to_files(page: Path) -> None:
    missing = [target for target in _relative_links(page) if not _leads_somewhere(page, target)]
    assert not missing, f"{page.relative_to(REPO)} links to missing files or sections: {missing}"


def _leads_somewhere(page: Path, target: str) -> bool:
    path, _, section = target.partition("#")
    linked = (page.parent / path) if path else page
    if not linked.exists():
        return False
    return not section or linked.suffix != ".md" or section in _anchors(linked)


def test_the_link_pattern_finds_links() -> None:
    """The check above is only worth something if it sees the links."""
    readme = set(_relative_links(REPO / "README.md"))
    assert {"docs/deciders.md", "docs/operators.md", "docs/contributors.md"} <= readme
    assert {"security-model", "the-fallback-policy", "windows"} <= _anchors(REPO / "docs" / "operators.md")


def test_operator_options_exist() -> None:
    serve = {option.flag for option in OPTIONS}
    known = serve | _command_options()
    scripts = _script_text()
    mentioned = set(LONG_OPTION.findall(OPERATORS.read_text(encoding="utf-8")))
    unknown = sorted(option for option in mentioned if option not in known and option not in scripts)
    assert not unknown, f"docs/operators.md mentions options no pmk command or script has: {unknown}"
    assert serve <= mentioned, f"serve options missing from docs/operators.md: {sorted(serve - mentioned)}"


def test_environment_variables_exist() -> None:
    known = {option.env for option in OPTIONS} | {CONFIG_ENV}
    known |= set(re.findall(r"\$\{?(PMK_[A-Z0-9_]+)", _script_text()))
    for page in PAGES:
        mentioned = set(ENV_VARIABLE.findall(page.read_text(encoding="utf-8")))
        unknown = sorted(mentioned - known)
        assert not unknown, f"{page.relative_to(REPO)} mentions variables pmk does not read: {unknown}"
