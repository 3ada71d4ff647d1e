"""The serving settings: one object read from the environment, and the documented table is exactly its variables."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from phi3serve.settings import ENV, Settings


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert (settings.engine, settings.max_batch, settings.max_queue, settings.request_timeout_s) == ("auto", 16, 16, 90)
    assert settings.key is None and settings.max_context is None and settings.batch_wait_s == 0.05
    assert settings.drain_s == 10.0 and Settings.from_env({"PHI3FLOW_DRAIN_S": "2.5"}).drain_s == 2.5


def test_values_are_read_and_converted():
    settings = Settings.from_env(
        {
            "PHI3FLOW_MAX_BATCH": "64",
            "PHI3FLOW_ENGINE": "loop",
            "PHI3FLOW_MAX_CONTEXT": "4096",
            "PHI3FLOW_ENDPOINT_KEY": "k",
            "PHI3FLOW_DEVICE": "cuda",
        }
    )
    assert (settings.max_batch, settings.engine, settings.max_context, settings.key, settings.device) == (
        64,
        "loop",
        4096,
        "k",
        "cuda",
    )


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("PHI3FLOW_MAX_BATCH", "0", "whole number >= 1"),
        ("PHI3FLOW_REQUEST_TIMEOUT_S", "1.5", "whole number >= 1"),
        ("PHI3FLOW_ENGINE", "vllm", "one of auto, loop, continuous"),
        ("PHI3FLOW_DEVICE", "tpu", "one of auto, cpu, cuda"),
        ("PHI3FLOW_DTYPE", "fp8", "one of auto, float32"),
        ("PHI3FLOW_ENDPOINT_KEY", " key ", "surrounding whitespace"),
        ("PHI3FLOW_DRAIN_S", "-1", "seconds from 0 to 3600"),
        ("PHI3FLOW_DRAIN_S", "nan", "seconds from 0 to 3600"),
        ("PHI3FLOW_DRAIN_S", "soon", "seconds from 0 to 3600"),
        ("PHI3FLOW_DRAIN_S", "99999", "seconds from 0 to 3600"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(name, value, says):
    with pytest.raises(RuntimeError, match=re.escape(name)) as raised:
        Settings.from_env({name: value})
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_the_documented_table_lists_every_setting_and_no_other():
    page = (REPO / "docs" / "serving.md").read_text()
    table = page[page.index("## Settings") :]
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", table, flags=re.M))
    assert documented == set(ENV.values())


def test_nothing_else_in_the_serving_package_reads_the_environment():
    readers = [
        path.relative_to(REPO)
        for path in (REPO / "deploy").rglob("*.py")
        if re.search(r"os\.environ|getenv", path.read_text()) and path.name != "settings.py"
    ]
    assert readers == []


def test_cuda_required_without_cuda_fails_in_one_line(monkeypatch):
    """PHI3FLOW_DEVICE=cuda (the GPU deployment) on a machine where torch sees no GPU: start-up fails, naming it."""
    import torch

    from phi3serve.model import use_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="PHI3FLOW_DEVICE=cuda but CUDA is not available") as raised:
        use_cuda("cuda")
    assert "\n" not in str(raised.value)
    assert use_cuda("auto") is False and use_cuda("cpu") is False
