"""`package_tools` entry point: the tool metadata shipped as YAML beside the code, read without importing promptflow devkit."""

from __future__ import annotations

from pathlib import Path

import yaml

YAMLS = Path(__file__).parent / "yamls"


def list_package_tools() -> dict:
    """Tool id -> tool metadata, for `pf tool list`, VS Code and flow runtimes."""
    tools: dict = {}
    for path in sorted(YAMLS.glob("*.yaml")):
        tools.update(yaml.safe_load(path.read_text(encoding="utf-8")))
    return tools
