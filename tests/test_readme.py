"""The `phi3flow ...` commands in the README and the docs name real subcommands and options (parsed, not run), and
the README links every docs page, so the docs cannot rot."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex

import pytest

from conftest import REPO
from phi3flow import cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands() -> list[str]:
    """Every `phi3flow` command line inside the bash blocks of the README and the docs."""
    blocks = [block for page in DOCS for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)]
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines() if "bin/phi3flow " in line]


class Parsed(Exception):
    """Raised instead of running the command once its arguments have parsed."""


@pytest.mark.parametrize("line", documented_commands())
def test_documented_command_parses(line, monkeypatch):
    words = shlex.split(re.sub(r'"\$\(.*?\)"', "KEY", line))
    words = words[next(i for i, w in enumerate(words) if w.endswith("bin/phi3flow")) + 1 :]
    words = words[: next((i for i, w in enumerate(words) if w in {">", "&", "2>&1"} or w.startswith(">")), len(words))]
    needs = "agent_framework" if words[0] == "agent" else "promptflow"  # .venv-agents has one, .venv the other
    if importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not in this environment")
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        cli.main(words)


def test_the_docs_document_every_command():
    documented = {shlex.split(line.split("bin/phi3flow ", 1)[1])[0] for line in documented_commands()}
    assert documented >= set(cli.COMMANDS) - {"demo"}  # demo is `make demo`


def test_the_readme_links_every_docs_page_and_every_link_resolves():
    readme = (REPO / "README.md").read_text()
    assert {page.name for page in DOCS[1:]} <= set(re.findall(r"\(docs/([\w-]+\.md)\)", readme))
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_readme_stays_a_landing_page():
    assert len((REPO / "README.md").read_text().splitlines()) < 150
