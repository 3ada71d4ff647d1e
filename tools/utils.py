"""`package_tools` entry point: the tool metadata shipped as YAML beside the code.

Read with ruamel.yaml, which the package declares (promptflow-core depends on it too), never PyYAML: a flow
runtime that installs only this wheel has no PyYAML, and an import error here hides the tool from `pf tool list`.
"""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML

YAMLS = Path(__file__).parent / "yamls"


def list_package_tools() -> dict:
    """Tool id -> tool metadata, for `pf tool list`, VS Code and flow runtimes."""
    loader = YAML(typ="safe", pure=True)
    tools: dict = {}
    for path in sorted(YAMLS.glob("*.yaml")):
        tools.update(loader.load(path.read_text(encoding="utf-8")))
    return tools
