"""One home for the endpoint contract: the scoring script, the tool (code, YAML, flow), the client side and
`pf tool validate` all agree with deploy/phi3serve/contract.py."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from phi3flow.offline import pf_executable
from phi3serve import contract

TOOL_YAML = REPO / "tools" / "yamls" / "chat_endpoint.yaml"


def tool_inputs() -> dict:
    return yaml.safe_load(TOOL_YAML.read_text())["phi3flow.tools.chat_endpoint.chat"]["inputs"]


def test_the_tool_yaml_matches_its_function_and_the_contract():
    from phi3flow.tools.chat_endpoint import chat

    signature = inspect.signature(chat.__wrapped__ if hasattr(chat, "__wrapped__") else chat).parameters
    inputs = tool_inputs()
    assert set(inputs) == set(signature)
    for name, spec in inputs.items():
        if "default" in spec:
            default = signature[name].default
            assert spec["default"] == ([] if default is None else default), name
    for name in ("temperature", "top_p", "max_new_tokens"):
        assert inputs[name]["default"] == getattr(contract.DEFAULTS, name)
        low, high = contract.PARAMS[name].low, contract.PARAMS[name].high
        assert low <= inputs[name]["default"] <= high


def test_the_chat_flow_sends_parameters_the_contract_accepts():
    flow = yaml.safe_load((REPO / "flows" / "chat" / "flow.dag.yaml").read_text())
    node = next(node for node in flow["nodes"] if node["name"] == "chat")
    for name in ("temperature", "top_p", "max_new_tokens"):
        contract.PARAMS[name].check(name, node["inputs"][name])
    assert node["inputs"]["max_new_tokens"] == contract.DEFAULTS.max_new_tokens


def test_the_scoring_script_and_the_clients_share_the_key_variable():
    from phi3flow import connect
    from phi3serve.settings import ENV

    assert connect.KEY_ENV is contract.KEY_ENV is ENV["key"]


@pytest.mark.parametrize(
    ("authorization", "api_key", "expected"),
    [
        ("Bearer k3y", None, True),
        ("bearer k3y", None, True),
        (b"Bearer  k3y ", None, True),
        (None, "k3y", True),
        (None, b"k3y", True),
        ("Bearer wrong", "k3y", True),
        ("Basic k3y", None, False),
        ("k3y", None, False),
        ("Bearer k3y-longer", None, False),
        (None, None, False),
        ("Bearer", "", False),
        ("Bearer \u00e9", None, False),
    ],
)
def test_one_key_check_for_the_scoring_script_and_the_worker(authorization, api_key, expected):
    """Header values as WSGI (text) or the worker (bytes) gives them; an open endpoint lets everything through."""
    assert contract.authorized(b"k3y", authorization, api_key) is expected
    assert contract.authorized(None, authorization, api_key) is True


def test_pf_tool_validate_accepts_the_tool_package(tmp_path: Path):
    """`pf tool validate` on the package, as the tool-package quickstart does: it checks the `package_tools` entry
    point, imports every module of `phi3flow` (so each must import without the Agent Framework) and parses each tool."""
    env = {**os.environ, "PF_DISABLE_TRACING": "true"}
    done = subprocess.run(
        [pf_executable(), "tool", "validate", "--source", "phi3flow"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result == {"result": "Succeeded", "total_count": 1, "invalid_count": 0}
