"""The upload path: each uploadable flow folder works from its own requirements.txt alone.

What an Azure AI Foundry / AzureML compute session does with an uploaded flow folder, done here: build the tool
wheel (as `make flow-wheel` does), copy the folder to an empty place with the wheel in it, create a fresh virtual
environment, `pip install -r requirements.txt` there and nothing else, then run the folder's own `pf`. Also the
VS Code case: the bare wheel installed into a fresh environment. Each environment is built once for this module
(pip's cache keeps it to about half a minute each).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SECRET, PromptFlowHome, Reply, ScriptedEndpoint
from phi3flow.evaluation.metrics import first_turn, line_metrics

pytestmark = pytest.mark.e2e
TOOL = "phi3flow.tools.chat_endpoint.chat"


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def fresh_environment(path: Path, *requirements: str, cwd: Path) -> Path:
    """A new virtual environment with only `pip install <requirements>` (run in `cwd`) in it; its bin folder."""
    checked(subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True, text=True))
    checked(
        subprocess.run(
            [str(path / "bin/python"), "-m", "pip", "install", "--quiet", *requirements],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=900,
        )
    )
    return path / "bin"


def lacks(bin_dir: Path, module: str) -> bool:
    """True when `module` cannot be imported in that environment."""
    return subprocess.run([str(bin_dir / "python"), "-c", f"import {module}"], capture_output=True).returncode != 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The light tool wheel, built from this checkout the way `make flow-wheel` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    shutil.rmtree(REPO / "build", ignore_errors=True)  # as make flow-wheel: setuptools would ship stale copies from it
    checked(
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(REPO)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    return next(out.glob("phi3flow-*.whl"))


def uploaded(folder: str, wheel: Path, tmp_path_factory) -> Path:
    """`folder` as it would be uploaded: its committed files plus the wheel its requirements.txt names, in an empty place."""
    copy = tmp_path_factory.mktemp("upload") / Path(folder).name
    shutil.copytree(REPO / folder, copy, ignore=shutil.ignore_patterns(".promptflow", "__pycache__", "*.whl"))
    shutil.copy(wheel, copy)
    assert f"./{wheel.name}" in (copy / "requirements.txt").read_text().split()  # the file names the wheel it is built with
    return copy


def uploaded_with_environment(flow: str, name: str, wheel, tmp_path_factory):
    """A flow folder in its own environment (its requirements.txt only) and a private PF home, closed after."""
    folder = uploaded(flow, wheel, tmp_path_factory)
    bin_dir = fresh_environment(tmp_path_factory.mktemp("env") / name, "-r", "requirements.txt", cwd=folder)
    home = PromptFlowHome(tmp_path_factory.mktemp("pf-home"), bin_dir)
    yield folder, home
    home.close()


@pytest.fixture(scope="module")
def chat_upload(wheel, tmp_path_factory):
    yield from uploaded_with_environment("flows/chat", "chat", wheel, tmp_path_factory)


@pytest.fixture(scope="module")
def eval_upload(wheel, tmp_path_factory):
    yield from uploaded_with_environment("evaluation/flow", "eval", wheel, tmp_path_factory)


def test_chat_folder_environment_lists_the_tool(chat_upload):
    folder, home = chat_upload
    assert lacks(home.bin, "yaml") and lacks(home.bin, "torch")  # what a compute session has: no PyYAML, no extras
    listed = checked(home.run("pf", "tool", "list", cwd=folder)).stdout
    assert f'"{TOOL}"' in listed and '"name": "Phi-3 Endpoint Chat"' in listed
    filelock = checked(home.run("python", "-c", "import importlib.metadata as m; print(m.version('filelock'))")).stdout.split(".")
    assert (3, 20, 3) <= tuple(map(int, filelock)) < (3, 30)  # the package's constraint reaches the session (chat UI, CVE fixes)


def test_chat_flow_answers_in_its_own_environment(chat_upload):
    """`pf flow test` of the uploaded folder, through the `phi3_endpoint` connection, to a scripted endpoint.

    Only for the local connection store: keyrings.alt (a keyring backend to encrypt the key with; this machine has no
    system keyring). A compute session reads connections from the workspace instead, so it is no requirement of the flow."""
    folder, home = chat_upload
    keyring_pin = re.search(r"^keyrings\.alt==\S+$", (REPO / "requirements.txt").read_text(), flags=re.M).group(0)
    checked(
        subprocess.run(
            [str(home.bin / "python"), "-m", "pip", "install", "--quiet", keyring_pin],
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    assert lacks(home.bin, "yaml")
    endpoint = ScriptedEndpoint()
    endpoint.script = [Reply(body={"output": "In 1975, with Paul Allen."})]
    try:
        home.connect(endpoint.url)
        history = [{"inputs": {"input_data": "Who founded Microsoft?"}, "outputs": {"answer": "Bill Gates and Paul Allen."}}]
        checked(
            home.run(
                "pf",
                "flow",
                "test",
                "--flow",
                ".",
                "--inputs",
                "input_data=When did Bill Gates found it?",
                f"chat_history={json.dumps(history)}",
                cwd=folder,
            )
        )
    finally:
        endpoint.close()
    assert json.loads((folder / ".promptflow/flow.output.json").read_text()) == {"answer": "In 1975, with Paul Allen."}
    request = endpoint.requests[-1]
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert [turn["content"] for turn in request["body"]["input_data"]["input_string"]] == [
        "Who founded Microsoft?",
        "Bill Gates and Paul Allen.",
        "When did Bill Gates found it?",
    ]


def test_evaluation_flow_scores_a_line_in_its_own_environment(eval_upload):
    folder, home = eval_upload
    assert lacks(home.bin, "yaml") and lacks(home.bin, "torch")
    answer = "Oslo is the capital of Norway."
    messages = [
        {"role": "user", "content": "Which city is the capital of Norway?"},
        {"role": "assistant", "content": "The capital of Norway is Oslo."},
    ]
    checked(
        home.run(
            "pf", "flow", "test", "--flow", ".", "--inputs", f"answer={answer}", f"messages={json.dumps(messages)}", cwd=folder
        )
    )
    scores = json.loads((folder / ".promptflow/flow.output.json").read_text())
    expected = line_metrics(answer, first_turn(messages, "assistant"), first_turn(messages, "user"))
    assert scores == pytest.approx({name: float(value) for name, value in expected.items()})
    assert scores["contains_fact"] == 1.0 and 0 < scores["rouge_l"] < 1


@pytest.fixture(scope="module")
def bare_wheel(wheel, tmp_path_factory) -> Path:
    """The bin folder of a fresh environment with the wheel alone installed (the VS Code extension's case)."""
    return fresh_environment(tmp_path_factory.mktemp("env") / "bare", str(wheel), cwd=wheel.parent)


def test_bare_wheel_lists_the_tool(wheel, bare_wheel, tmp_path_factory):
    """The VS Code case: `pip install` of the wheel alone into the environment the extension uses."""
    bin_dir = bare_wheel
    home = PromptFlowHome(tmp_path_factory.mktemp("pf-home"), bin_dir)
    try:
        assert lacks(bin_dir, "yaml")
        listed = checked(home.run("pf", "tool", "list", cwd=wheel.parent)).stdout
        assert f'"{TOOL}"' in listed
    finally:
        home.close()


def test_bare_wheel_runs_what_needs_no_extra_and_names_the_extra_otherwise(bare_wheel, tmp_path_factory):
    """The wheel alone: the data stage works from it; a command whose extra is missing says which, in one line."""
    bin_dir = bare_wheel
    work = tmp_path_factory.mktemp("work")
    checked(
        subprocess.run(
            [str(bin_dir / "phi3flow"), "data", "--sample", "--output-dir", "data"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
        )
    )
    assert len((work / "data" / "test_data.jsonl").read_text().splitlines()) == 80
    assert lacks(bin_dir, "torch")
    for command, extra in (["finetune", "--help"], "train"), (["azure", "--help"], "azure"):
        done = subprocess.run([str(bin_dir / "phi3flow"), *command], cwd=work, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.strip().count("\n") == 0 and f"pip install 'phi3flow[{extra}]'" in done.stderr, done.stderr


def test_the_wheel_holds_the_checkouts_files_and_nothing_else(wheel):
    """Every file the wheel ships is a tracked file of this checkout (a stale build/ folder once leaked deleted modules)."""
    import zipfile

    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split())
    shipped = [name for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name]
    homes = {
        "phi3serve/": "deploy/phi3serve/",
        **{f"phi3flow/{stage}/": f"{stage}/" for stage in ("data", "deploy", "evaluation", "finetune", "tools")},
    }
    for name in shipped:
        source = next((home + name[len(prefix) :] for prefix, home in homes.items() if name.startswith(prefix)), name)
        assert source in tracked, name
    assert {"phi3flow/data/prepare.py", "phi3flow/finetune/train.py", "phi3serve/engine.py", "phi3agents/__init__.py"} <= set(
        shipped
    )
