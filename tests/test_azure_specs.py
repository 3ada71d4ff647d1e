"""Azure specs and `phi3flow azure`: what would be sent to Azure ML, checked offline.

Every spec loads with azure-ai-ml's own loaders (they reject invalid specs without credentials); beyond
that, the entities are checked for what breaks deployments in practice (retired SKU, 5 s timeout, probes
that give up before a large model loads, a code path that misses the scoring script) and for the specs
naming each other consistently. `--dry-run` must work with no network, no credentials, no workspace.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

pytest.importorskip("azure.ai.ml", reason="needs the azure extra: pip install -e '.[azure]'")

from azure.ai.ml.entities import (  # noqa: E402
    AmlCompute,
    Command,
    Data,
    Environment,
    ManagedOnlineDeployment,
    ManagedOnlineEndpoint,
    Model,
)
from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402

from phi3flow import azure  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPEC_DIRS = [REPO / stage / "azureml" for stage in ("data", "finetune", "deploy")]  # each stage holds its own specs
ENTITY_TYPES: dict[str, type] = {
    "compute.yml": AmlCompute,
    "train-environment.yml": Environment,
    "data-train.yml": Data,
    "data-test.yml": Data,
    "finetune-job.yml": Command,
    "model.yml": Model,
    "inference-environment.yml": Environment,
    "endpoint.yml": ManagedOnlineEndpoint,
    "deployment.yml": ManagedOnlineDeployment,
}
GPU_SKU = re.compile(r"^Standard_N\w*(A100|H100)\w*$")
AZURE_ENV = (*azure.WORKSPACE_ENV, "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET")
# azure-ai-ml's schemas use marshmallow's soon-deprecated `context`: not ours to fix, and it buries real warnings.
pytestmark = pytest.mark.filterwarnings("ignore:The `context` parameter is deprecated")


def spec(name: str) -> Any:
    return azure.load_spec(name)


def ref_name(reference: str) -> str:
    """`azureml:name@label` or `azureml:name:version` -> name."""
    return re.split(r"[@:]", reference.removeprefix("azureml:"))[0]


def args(*argv: str) -> Any:
    return azure.build_parser().parse_args(list(argv))


def pip_names(conda_file: Any) -> set[str]:
    pip = next(dep["pip"] for dep in conda_file["dependencies"] if isinstance(dep, dict))
    return {Requirement(line).name.lower() for line in pip}


def extra_names(extra: str) -> set[str]:
    """An optional-dependency group of pyproject.toml, with phi3flow[...] self-references expanded."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names: set[str] = set()
    for line in extras[extra]:
        req = Requirement(line)
        names |= set().union(*(extra_names(e) for e in req.extras)) if req.name == "phi3flow" else {req.name.lower()}
    return names


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Azure settings, no network, a working folder without config.json."""
    for name in AZURE_ENV:
        monkeypatch.delenv(name, raising=False)

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- the specs themselves ------------------------------------------------------------------------


def test_every_spec_file_is_known_and_declares_its_schema() -> None:
    assert azure.SPEC_DIRS == SPEC_DIRS
    paths = {p.name: p for folder in SPEC_DIRS for p in folder.glob("*.y*ml") if not p.stem.endswith("-conda")}
    assert set(paths) == set(azure.SPECS) == set(ENTITY_TYPES)
    for name, path in paths.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("$schema: https://azuremlschemas.azureedge.net/latest/"), name


@pytest.mark.parametrize("name", sorted(ENTITY_TYPES))
def test_spec_loads_with_its_azure_ml_loader(name: str) -> None:
    assert isinstance(spec(name), ENTITY_TYPES[name])


def test_loaders_reject_an_invalid_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above mean something: a wrong type and an unbound job input are both refused."""
    for folder in SPEC_DIRS:
        shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(azure, "SPEC_DIRS", [tmp_path])
    deployment = tmp_path / "deployment.yml"
    deployment.write_text(deployment.read_text().replace("instance_count: 1", "instance_count: many"))
    with pytest.raises(azure.SetupError, match="deployment.yml is not valid"):
        azure.load_spec("deployment.yml")
    job = tmp_path / "finetune-job.yml"
    job.write_text(job.read_text().replace("${{inputs.test_data}}", "${{inputs.validation_data}}"))
    with pytest.raises(azure.SetupError, match="finetune-job.yml is not valid"):
        azure.load_spec("finetune-job.yml")


def test_no_retired_or_cpu_sku() -> None:
    for path in (p for folder in SPEC_DIRS for p in folder.iterdir()):
        assert "Standard_NC6s_v3" not in path.read_text(), path.name
    assert GPU_SKU.match(spec("compute.yml").size)
    assert GPU_SKU.match(spec("deployment.yml").instance_type)


def test_compute_scales_to_zero() -> None:
    compute = spec("compute.yml")
    assert (compute.size, compute.min_instances, compute.max_instances, compute.idle_time_before_scale_down) == (
        "Standard_NC24ads_A100_v4",
        0,
        1,
        120,
    )


@pytest.mark.parametrize(("env_spec", "extra"), [("train-environment.yml", "train"), ("inference-environment.yml", "serve")])
def test_environment_is_a_cuda_image_with_the_project_extra(env_spec: str, extra: str) -> None:
    env = spec(env_spec)
    assert env.image.startswith("mcr.microsoft.com/azureml/") and "cuda12" in env.image
    missing = extra_names(extra) - pip_names(env.conda_file)
    assert not missing, f"{env_spec} lacks pyproject's [{extra}] packages {missing}"


def pinned(lines: list[str]) -> dict[str, str]:
    """name -> exact version of `name==version` requirement lines (comments and markers ignored)."""
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = str(req.specifier)
    return pins


@pytest.mark.parametrize("env_spec", ["train-environment.yml", "inference-environment.yml"])
def test_environment_pins_what_requirements_txt_pins(env_spec: str) -> None:
    """The cloud image gets exactly the versions the tests ran with, from a fixed base image tag."""
    env = spec(env_spec)
    assert re.search(r":\d{8}\.v\d+$", env.image), f"{env.image} must name a fixed tag, not :latest"
    pip = next(dep["pip"] for dep in env.conda_file["dependencies"] if isinstance(dep, dict))
    cloud, local = pinned(pip), pinned((REPO / "requirements.txt").read_text().splitlines())
    assert all(version.startswith("==") for version in cloud.values()), cloud
    disagree = {name: (version, local.get(name)) for name, version in cloud.items() if local.get(name) != version}
    assert not disagree, f"{env_spec} and requirements.txt disagree (cloud, local): {disagree}"


def test_deployment_capacity_matches_the_gateway() -> None:
    """AzureML lets 2 x max_concurrent_requests_per_instance requests reach an instance (429 beyond): each gets a
    server thread and a batch or queue slot; generation stops when the gateway has given up (request_timeout_ms)."""
    deployment = spec("deployment.yml")
    variables = deployment.environment_variables
    reaching = 2 * deployment.request_settings.max_concurrent_requests_per_instance
    threads = int(re.search(r"--threads (\d+)", variables["GUNICORN_CMD_ARGS"]).group(1))
    assert variables["WORKER_COUNT"] == "1"  # one model copy per GPU
    assert threads >= reaching
    assert int(variables["PHI3FLOW_MAX_BATCH"]) + int(variables["PHI3FLOW_MAX_QUEUE"]) >= reaching
    assert int(variables["PHI3FLOW_REQUEST_TIMEOUT_S"]) * 1000 == deployment.request_settings.request_timeout_ms


def test_training_environment_can_run_qlora() -> None:
    assert "bitsandbytes" in pip_names(spec("train-environment.yml").conda_file)


def test_inference_environment_has_the_inference_server() -> None:
    assert "azureml-inference-server-http" in pip_names(spec("inference-environment.yml").conda_file)


def test_inference_environment_can_serve_an_onnx_export() -> None:
    """score.py picks the ONNX engine for a `phi3flow export onnx` folder: the cloud image must be able to run it."""
    assert {"onnxruntime-genai", "onnxruntime"} <= pip_names(spec("inference-environment.yml").conda_file)


def test_deployment_survives_a_slow_start_and_slow_generation() -> None:
    deployment = spec("deployment.yml")
    assert deployment.request_settings.request_timeout_ms >= 60_000  # the default 5000 ms cuts generation off
    for probe in (deployment.liveness_probe, deployment.readiness_probe):
        assert probe.initial_delay >= 600  # model download + load; less ends in "ResourceNotReady"
        assert probe.timeout >= 5 and probe.failure_threshold >= 10


def test_deployment_serves_the_repo_scoring_script() -> None:
    deployment = spec("deployment.yml")
    code = (Path(deployment.base_path) / deployment.code_configuration.code).resolve()
    assert code == REPO / "deploy"
    assert deployment.code_configuration.scoring_script == "score.py"
    assert (code / "score.py").is_file()


def test_deployment_serves_openai_chat_completions() -> None:
    """The deployment speaks OpenAI's Chat Completions too (docs/openai.md): its code folder carries phi3serve.openai,
    and its environment runs the azmlinfsrv that tests/test_openai.py serves /v1 and the OpenAI body on /score with
    (score.init() adds the /v1 routes to that version's blueprint; another version gets the body on /score only)."""
    deployment = spec("deployment.yml")
    code = (Path(deployment.base_path) / deployment.code_configuration.code).resolve()
    assert (code / "phi3serve" / "openai.py").is_file()
    pip = next(dep["pip"] for dep in spec("inference-environment.yml").conda_file["dependencies"] if isinstance(dep, dict))
    server = pinned(pip)["azureml-inference-server-http"]
    assert server == pinned((REPO / "requirements.txt").read_text().splitlines())["azureml-inference-server-http"]
    from importlib.metadata import version

    assert server == f"=={version('azureml-inference-server-http')}"  # the version the OpenAI route tests run


def test_specs_name_each_other_consistently() -> None:
    job, deployment = spec("finetune-job.yml"), spec("deployment.yml")
    assert ref_name(job.compute) == spec("compute.yml").name
    assert ref_name(job.environment) == spec("train-environment.yml").name
    assert ref_name(job.inputs["train_data"].path) == spec("data-train.yml").name
    assert ref_name(job.inputs["test_data"].path) == spec("data-test.yml").name
    assert ref_name(deployment.environment) == spec("inference-environment.yml").name
    assert ref_name(deployment.model) == spec("model.yml").name
    assert deployment.endpoint_name == spec("endpoint.yml").name


def test_endpoint_uses_key_auth() -> None:
    assert spec("endpoint.yml").auth_mode == "key"


def test_data_assets_are_the_files_phi3flow_data_writes() -> None:
    config = yaml.safe_load((REPO / "finetune" / "configs" / "phi3-mini-qlora.yaml").read_text())
    assert Path(spec("data-train.yml").path) == REPO / config["train_file"]
    assert Path(spec("data-test.yml").path) == REPO / config["test_file"]


def test_job_runs_phi3flow_finetune_on_the_data_assets() -> None:
    job = spec("finetune-job.yml")
    assert (Path(job.base_path) / job.code).resolve() == REPO
    assert job.outputs["model"].type == "custom_model"
    command = shlex.split(job.command.split("&&")[-1])
    assert command[:2] == ["phi3flow", "finetune"]
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags == {
        "--config": "${{inputs.config}}",
        "--train-file": "${{inputs.train_data}}",
        "--test-file": "${{inputs.test_data}}",
        "--output-dir": "${{outputs.model}}",
    }
    assert (REPO / "finetune" / "configs" / f"{job.inputs['config']._data}.yaml").is_file()


def test_job_command_parses_with_phi3flow_finetune() -> None:
    """The flags the job passes are ones the trainer accepts (its CLI is another module's)."""
    pytest.importorskip("transformers")
    from phi3flow.finetune.train import build_parser

    job = azure.plan_finetune(args("finetune", "--model", "phi4-mini", "--max-steps", "3"))[-1][1]
    command = job.command.split("&&")[-1].replace("${{inputs.config}}", job.inputs["config"]._data)
    parsed = build_parser().parse_args(shlex.split(re.sub(r"\$\{\{[^}]*\}\}", "X", command))[2:])
    assert parsed.config == "phi4-mini-qlora"
    assert (str(parsed.output_dir), parsed.max_steps) == ("X", 3)


def test_model_registers_the_job_output() -> None:
    model, job = spec("model.yml"), spec("finetune-job.yml")
    assert model.type == "custom_model"
    ((output, _),) = job.outputs.items()
    assert model.path == f"azureml://jobs/{azure.JOB_PLACEHOLDER}/outputs/{output}"


def test_specs_as_written_are_the_default_models() -> None:
    """The specs work as they are (`az ml ... --file`) for the default model; --model only overrides them."""
    default = azure.MODELS[azure.DEFAULT_MODEL]
    assert spec("finetune-job.yml").inputs["config"]._data == default.config
    assert spec("model.yml").name == azure.registered_name(azure.DEFAULT_MODEL)
    assert spec("deployment.yml").environment_variables[azure.CONTEXT_ENV] == str(default.max_context)
    assert not any(
        (folder / "chat-completion-pipeline.yml").exists() for folder in SPEC_DIRS
    )  # the catalog fine-tunes none of the models


def test_context_cap_is_the_variable_the_server_reads() -> None:
    pytest.importorskip("torch")
    from phi3serve.model import MAX_CONTEXT_ENV

    assert azure.CONTEXT_ENV == MAX_CONTEXT_ENV


# --- the plans: entities as the commands would send them --------------------------------------------


def test_finetune_plan_with_overrides(tmp_path: Path) -> None:
    train = tmp_path / "mine.jsonl"
    actions = azure.plan_finetune(args("finetune", "--train-file", str(train), "--max-steps", "5"))
    assert [type(entity) for _, entity in actions] == [AmlCompute, Environment, Data, Data, Command]
    assert Path(actions[2][1].path) == train
    assert Path(actions[3][1].path) == REPO / "data" / "test_data.jsonl"
    assert actions[-1][1].command.endswith("--output-dir ${{outputs.model}} --max-steps 5")


@pytest.mark.parametrize(
    ("model", "hub"),
    [("phi3-mini", "Phi-3-mini-4k-instruct"), ("phi35-mini", "Phi-3.5-mini-instruct"), ("phi4-mini", "Phi-4-mini-instruct")],
)
def test_each_model_has_its_job_name_and_context_cap(model: str, hub: str) -> None:
    job = azure.plan_finetune(args("finetune", "--model", model))[-1][1]
    assert job.inputs["config"]._data == f"{model}-qlora" and f"microsoft/{hub} " in job.description
    ((_, registered),) = azure.plan_register(args("register", "--model", model, "--job-name", "brave_lemon_42"))
    assert (registered.name, registered.type) == (f"{model}-ultrachat", "custom_model")
    assert registered.path == "azureml://jobs/brave_lemon_42/outputs/model" and hub in registered.description
    deployment = azure.plan_deploy(args("deploy", "--model", model))[2][1]
    assert ref_name(deployment.model) == f"{model}-ultrachat" and deployment.model.endswith("@latest")
    assert deployment.environment_variables[azure.CONTEXT_ENV] == str(azure.MODELS[model].max_context)
    assert deployment.environment_variables["PHI3FLOW_MAX_BATCH"] == "64"  # the rest of the spec is kept


def test_dry_run_shows_what_the_model_changes(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = {}
    for model in ("phi3-mini", "phi4-mini"):
        for command in ("finetune", "register", "deploy"):
            assert azure.main([command, "--model", model, "--dry-run"]) == 0
        outputs[model] = capsys.readouterr().out
    changed = set(outputs["phi4-mini"].splitlines()) - set(outputs["phi3-mini"].splitlines())
    text = "\n".join(changed)
    for expected in (
        "config: phi4-mini-qlora",
        "microsoft/Phi-4-mini-instruct",
        "phi4-mini-ultrachat",
        "PHI3FLOW_MAX_CONTEXT: '12288'",
    ):
        assert expected in text, (expected, text)


def test_deploy_plan_routes_all_traffic_to_the_deployment() -> None:
    argv = ("deploy", "--endpoint-name", "my-chat", "--instance-type", "Standard_NC40ads_H100_v5", "--model-version", "3")
    env, endpoint, deployment, traffic = (entity for _, entity in azure.plan_deploy(args(*argv)))
    assert isinstance(env, Environment) and env.name == ref_name(deployment.environment)
    assert (endpoint.name, endpoint.traffic) == ("my-chat", {})
    assert (deployment.endpoint_name, deployment.instance_type) == ("my-chat", "Standard_NC40ads_H100_v5")
    assert deployment.model.removeprefix("azureml:") == f"{spec('model.yml').name}:3"
    assert (traffic.name, traffic.traffic) == ("my-chat", {deployment.name: 100})


# --- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["finetune"], ["finetune", "--model", "phi4-mini"], ["register"], ["deploy"]])
def test_dry_run_is_offline(argv: list[str], offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert azure.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("would create ") == len(getattr(azure, f"plan_{argv[0]}")(args(*argv)))
    assert "nothing was sent" in out


def test_dry_run_notes_missing_data(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert azure.main(["finetune", "--dry-run", "--train-file", "absent.jsonl"]) == 0
    assert f"note: {offline / 'absent.jsonl'} does not exist yet" in capsys.readouterr().out


def phi3flow_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script, with no Azure settings in its environment."""
    env = {k: v for k, v in os.environ.items() if k not in AZURE_ENV}
    exe = Path(sys.executable).with_name("phi3flow")
    return subprocess.run([str(exe), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_console_script_deploy_dry_run(tmp_path: Path) -> None:
    result = phi3flow_cli("azure", "deploy", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "would create ManagedOnlineDeployment 'blue'" in result.stdout
    assert "Traceback" not in result.stderr


def test_console_script_without_workspace_says_what_to_set(tmp_path: Path) -> None:
    result = phi3flow_cli("azure", "deploy", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert all(name in message for name in azure.WORKSPACE_ENV) and "config.json" in message


def test_partial_workspace_settings_name_the_missing_ones(
    offline: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "00000000-0000-0000-0000-000000000000")
    assert azure.main(["register", "--job-name", "j"]) == 2
    err = capsys.readouterr().err
    assert "set AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME too" in err


class NoCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")


def test_missing_credentials_say_how_to_log_in(
    offline: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in azure.WORKSPACE_ENV:
        monkeypatch.setenv(name, "x")
    monkeypatch.setattr(azure, "_credential", lambda client_id: NoCredential())
    assert azure.main(["deploy"]) == 2
    err = capsys.readouterr().err
    assert "no Azure credentials found" in err and "az login" in err and "--client-id" in err


def test_without_azure_ai_ml_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "azure.ai.ml", None)
    assert azure.main(["deploy", "--dry-run"]) == 2
    assert "pip install 'phi3flow[azure]'" in capsys.readouterr().err


class FakeClient:
    """Records what would be sent; answers like the service for the report."""

    resource_group_name, workspace_name = "my-group", "my-workspace"

    def __init__(self, *existing_endpoints: str) -> None:
        self.sent: list[Any] = []
        self.endpoints = set(existing_endpoints)
        self.data = SimpleNamespace(create_or_update=self._record)
        self.online_endpoints = SimpleNamespace(get=self._get_endpoint)

    def _get_endpoint(self, name: str) -> Any:
        if name not in self.endpoints:
            raise ResourceNotFoundError(f"endpoint {name} not found")
        return SimpleNamespace(name=name, scoring_uri=f"https://{name}.eastus.inference.ml.azure.com/score")

    def _record(self, entity: Any) -> Any:
        self.sent.append(entity)
        if isinstance(entity, ManagedOnlineEndpoint):
            self.endpoints.add(entity.name)
        return entity

    def create_or_update(self, entity: Any) -> Any:
        return self._record(entity)

    def begin_create_or_update(self, entity: Any) -> Any:
        return SimpleNamespace(result=lambda: self._record(entity))


def test_deploy_sends_the_plan_and_prints_the_connect_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = FakeClient()
    monkeypatch.setattr(azure, "connect_client", lambda client_id: client)
    assert azure.main(["deploy"]) == 0
    assert [type(e) for e in client.sent] == [Environment, ManagedOnlineEndpoint, ManagedOnlineDeployment, ManagedOnlineEndpoint]
    assert client.sent[-1].traffic == {"blue": 100}
    out = capsys.readouterr().out
    uri = "https://phi3flow-chat.eastus.inference.ml.azure.com/score"
    assert f"scoring URI: {uri}" in out
    assert (
        f'phi3flow connect --endpoint {uri} --key "$(az ml online-endpoint get-credentials --name phi3flow-chat '
        '--resource-group my-group --workspace-name my-workspace --query primaryKey --output tsv)"'
    ) in out
    assert (
        "OpenAI-compatible base URL (openai SDK, Agent Framework, any OpenAI client): "
        "https://phi3flow-chat.eastus.inference.ml.azure.com/v1" in out
    )


def test_redeploy_keeps_traffic_on_the_live_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing endpoint is not re-sent without traffic while its deployment is being updated."""
    client = FakeClient("phi3flow-chat")
    monkeypatch.setattr(azure, "connect_client", lambda client_id: client)
    assert azure.main(["deploy"]) == 0
    assert [type(e) for e in client.sent] == [Environment, ManagedOnlineDeployment, ManagedOnlineEndpoint]
    assert client.sent[-1].traffic == {"blue": 100}


def test_finetune_refuses_to_start_without_data(
    offline: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(azure, "connect_client", lambda client_id: pytest.fail("connected before checking data"))
    assert azure.main(["finetune", "--train-file", "absent.jsonl"]) == 2
    assert "run `phi3flow data` first" in capsys.readouterr().err
