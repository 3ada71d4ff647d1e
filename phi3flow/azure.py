"""`phi3flow azure`: fine-tune, register and deploy on Azure Machine Learning from each stage's specs.

The data assets' specs live in data/azureml/, the fine-tuning specs (compute, training environment, job) in
finetune/azureml/, the serving specs (model, inference environment, endpoint, deployment) in deploy/azureml/, beside
the code each runs.

The YAML specs are the source of truth (they work with `az ml ... --file` too); this module only loads
them with azure-ai-ml's own loaders, fills in what is known at run time (model, job name, data files, SKU) and
sends them. `--dry-run` stops before anything needs credentials, so CI validates every spec offline.

There is no route through the azureml registry's `chat_completion_pipeline` component: the catalog no longer
fine-tunes any of these models (azureml-assets: Phi-3-mini-4k and Phi-3.5-mini archived, fine-tuning retired
2025-08-30; no registry model for Phi-4-mini-instruct, only Foundry Local builds).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi3flow.errors import Phi3flowError
from phi3flow.finetune.config import read_config
from phi3serve.contract import MAX_CONTEXT_ENV as CONTEXT_ENV

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential

# Each stage's specs, found where the package is installed: in a checkout, the stage folder itself (resolved through
# the package's links, so a spec's relative paths, such as the job's `code: ../..`, start from the real folder).
SPEC_DIRS = [
    (Path(importlib.util.find_spec(stage).submodule_search_locations[0]) / "azureml").resolve()
    for stage in ("phi3flow.data", "phi3flow.finetune", "phi3flow.deploy")
]
# spec file -> the azure.ai.ml loader that validates it
SPECS: dict[str, str] = {
    "compute.yml": "load_compute",
    "train-environment.yml": "load_environment",
    "data-train.yml": "load_data",
    "data-test.yml": "load_data",
    "finetune-job.yml": "load_job",
    "model.yml": "load_model",
    "inference-environment.yml": "load_environment",
    "endpoint.yml": "load_online_endpoint",
    "deployment.yml": "load_online_deployment",
}


@dataclass(frozen=True)
class ModelChoice:
    """What `--model` selects: the shipped training config (its `model` is the hub id) and the serving context cap."""

    config: str
    # PHI3FLOW_MAX_CONTEXT of the deployment (read by deploy/phi3serve/model.py): the tokens whose bf16 KV cache
    # (layers x 2 x key-value heads x head dim x 2 bytes per token) is a full 4,096-token Phi-3-mini request's,
    # 1.5 GiB, the per-request load deployment.yml's batch and queue sizes were set for. Derived, not measured.
    max_context: int


MODELS = {
    "phi3-mini": ModelChoice("phi3-mini-qlora", 4096),  # 384 KiB/token (32 key-value heads x 96): its own 4k
    "phi35-mini": ModelChoice("phi35-mini-qlora", 4096),  # Phi-3-mini's layers, 384 KiB/token: 4k of its 128k
    "phi4-mini": ModelChoice("phi4-mini-qlora", 12288),  # 8 key-value heads x 128, 128 KiB/token: 12k of its 128k
}
DEFAULT_MODEL = "phi3-mini"  # what the specs in azureml/ hold as they are
WORKSPACE_ENV = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME")
JOB_PLACEHOLDER = "JOB_NAME"  # stands for the job's name until `register --job-name` gives it
ARM_SCOPE = "https://management.azure.com/.default"
INSTALL_HINT = "pip install 'phi3flow[azure]'"

# An action: where the entity comes from (for messages) and the entity to create or update.
Action = tuple[str, Any]


class SetupError(Phi3flowError):
    """Something the user must install, configure or fix in a spec: a message, no traceback, exit code 2."""


def _azure_ml() -> Any:
    """Import azure-ai-ml only when a command runs, so `phi3flow --help` works on a light install."""
    try:
        import azure.ai.ml
        import azure.identity  # noqa: F401  (the same extra; fail here rather than after uploading)
    except ImportError as exc:
        raise SetupError(f"{exc.name} is not installed: {INSTALL_HINT}") from None
    # Its own schema classes announce themselves as experimental on every load: noise, not about our specs.
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    return azure.ai.ml


def load_spec(name: str, overrides: list[dict[str, Any]] | None = None) -> Any:
    """Load and validate one spec with azure-ai-ml's loader; jobs also get the SDK's own offline checks."""
    ml = _azure_ml()
    from azure.ai.ml.exceptions import MlException
    from marshmallow import ValidationError  # what the loaders raise for a field of the wrong shape

    path = spec_path(name)
    try:
        entity = getattr(ml, SPECS[name])(path, params_override=overrides or [])
        if SPECS[name] == "load_job":  # the SDK's offline job checks, e.g. every ${{inputs.x}} is declared
            entity._validate(raise_error=True)
            entity.component._validate(raise_error=True)
    except (MlException, ValidationError) as exc:
        raise SetupError(f"{path} is not valid: {exc}") from None
    return entity


def spec_path(name: str) -> Path:
    """The spec file `name` in the stage folder that holds it."""
    for folder in SPEC_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise SetupError(f"no spec {name} in {' or '.join(str(folder) for folder in SPEC_DIRS)}")


def _require_file(entity: Any, folder: str, file: str, why: str) -> None:
    """Check a file under a spec's local folder, resolved as the SDK uploads it: from the spec's folder."""
    path = (Path(entity.base_path) / folder / file).resolve()
    if not path.is_file():
        raise SetupError(f"{path} not found: {why}")


def registered_name(model: str) -> str:
    """The name a model's fine-tuned adapter is registered under (model.yml holds the default model's)."""
    return f"{model}-ultrachat"


def plan_finetune(args: argparse.Namespace) -> list[Action]:
    """Cluster, training environment, the two data assets, then the job that reads them."""
    name = MODELS[args.model].config
    job = load_spec(
        "finetune-job.yml",
        [
            {"inputs.config": name},
            {"display_name": f"{name}-ultrachat"},
            {"description": f"QLoRA fine-tune of {read_config(name)['model']} on ultrachat_200k (finetune/configs/{name}.yaml)."},
        ],
    )
    _require_file(job, job.code, "pyproject.toml", "the job's code must be a phi3flow source checkout")
    if args.max_steps is not None:
        job.command = f"{job.command} --max-steps {args.max_steps}"
    data = [
        (spec, load_spec(spec, [{"path": str(Path(path).resolve())}] if path else []))
        for spec, path in (("data-train.yml", args.train_file), ("data-test.yml", args.test_file))
    ]
    return [
        ("compute.yml", load_spec("compute.yml")),
        ("train-environment.yml", load_spec("train-environment.yml")),
        *data,
        ("finetune-job.yml", job),
    ]


def plan_register(args: argparse.Namespace) -> list[Action]:
    """The job's single output folder as a model of that output's type, named for the model it tunes."""
    ((output, port),) = load_spec("finetune-job.yml").outputs.items()
    path = f"azureml://jobs/{args.job_name or JOB_PLACEHOLDER}/outputs/{output}"
    hub = read_config(MODELS[args.model].config)["model"]
    model = load_spec(
        "model.yml",
        [
            {"path": path},
            {"type": port.type},
            {"name": registered_name(args.model)},
            {"description": f"{hub} fine-tuned on ultrachat_200k by phi3flow: a LoRA adapter."},
        ],
    )
    return [(f"model.yml, output '{output}' of finetune-job.yml", model)]


def plan_deploy(args: argparse.Namespace) -> list[Action]:
    """Inference environment, endpoint, deployment of the model's adapter with its context cap, then 100% of the
    endpoint's traffic to it."""
    version = f":{args.model_version}" if args.model_version else "@latest"
    overrides: list[dict[str, Any]] = [
        {"model": f"azureml:{registered_name(args.model)}{version}"},
        {f"environment_variables.{CONTEXT_ENV}": str(MODELS[args.model].max_context)},
    ]
    if args.endpoint_name:
        overrides.append({"endpoint_name": args.endpoint_name})
    if args.instance_type:
        overrides.append({"instance_type": args.instance_type})
    deployment = load_spec("deployment.yml", overrides)
    code = deployment.code_configuration
    _require_file(deployment, code.code, code.scoring_script, "the deployment's scoring script")
    endpoint = {"name": deployment.endpoint_name}
    return [
        ("inference-environment.yml", load_spec("inference-environment.yml")),
        ("endpoint.yml", load_spec("endpoint.yml", [endpoint])),
        ("deployment.yml", deployment),
        (
            f"endpoint.yml, 100% traffic to '{deployment.name}'",
            load_spec("endpoint.yml", [endpoint, {"traffic": {deployment.name: 100}}]),
        ),
    ]


def missing_data(actions: list[Action]) -> list[str]:
    """Local data files that do not exist: the dry run notes them, a real run refuses to start."""
    from azure.ai.ml.entities import Data

    return [entity.path for _, entity in actions if isinstance(entity, Data) and not Path(entity.path).is_file()]


def _describe(entity: Any) -> str:
    """The entity as the SDK serialises it, in the specs' YAML shape (`dump` ignores its stream for endpoints)."""
    import yaml

    as_data = json.loads(json.dumps(entity._to_dict(), default=str))  # OrderedDicts -> plain data
    return yaml.safe_dump(as_data, sort_keys=False, width=110)


def _name(entity: Any) -> str:
    return getattr(entity, "name", None) or getattr(entity, "display_name", None) or ""


def print_plan(actions: list[Action]) -> None:
    for source, entity in actions:
        print(f"would create {type(entity).__name__} '{_name(entity)}' (from {source}):")
        print("  " + _describe(entity).rstrip().replace("\n", "\n  "))


def _credential(client_id: str | None) -> TokenCredential:
    """A managed identity when its client id is given, else DefaultAzureCredential (az login, env vars, ...)."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    return ManagedIdentityCredential(client_id=client_id) if client_id else DefaultAzureCredential()


def _check_credential(credential: TokenCredential, client_id: str | None) -> None:
    """Ask for a token now, so missing credentials are one clear line before anything is uploaded."""
    from azure.core.exceptions import ClientAuthenticationError

    logging.getLogger("azure.identity").setLevel(logging.CRITICAL)  # our one line replaces its long report
    try:
        credential.get_token(ARM_SCOPE)
    except ClientAuthenticationError:
        if client_id:
            raise SetupError(
                f"managed identity {client_id} gave no token: run this on an Azure resource that has that "
                "user-assigned identity, or leave out --client-id to use `az login` or a service principal"
            ) from None
        raise SetupError(
            "no Azure credentials found: run `az login`, or set AZURE_TENANT_ID, AZURE_CLIENT_ID and "
            "AZURE_CLIENT_SECRET for a service principal, or pass --client-id for a user-assigned managed identity"
        ) from None


def _workspace_from_env() -> tuple[str, str, str] | None:
    """The workspace from env vars, or None when none of them is set (then config.json is looked for)."""
    values = [os.environ.get(name, "") for name in WORKSPACE_ENV]
    missing = [name for name, value in zip(WORKSPACE_ENV, values) if not value]
    if len(missing) == len(WORKSPACE_ENV):
        return None
    if missing:
        raise SetupError(f"workspace settings incomplete: set {', '.join(missing)} too")
    return values[0], values[1], values[2]


def connect_client(client_id: str | None) -> MLClient:
    """MLClient for the workspace named by env vars or config.json, checked before credentials are."""
    ml = _azure_ml()
    from azure.ai.ml.exceptions import ValidationException

    credential = _credential(client_id)
    workspace = _workspace_from_env()
    if workspace is not None:
        client = ml.MLClient(credential, *workspace)
    else:
        try:
            client = ml.MLClient.from_config(credential)  # reads the file only; no token yet
        except ValidationException:
            raise SetupError(
                f"no Azure ML workspace configured: set {', '.join(WORKSPACE_ENV)}, or put the workspace's "
                "config.json (Azure portal > workspace > Download config.json) in this folder or a parent"
            ) from None
    _check_credential(credential, client_id)
    return client


def _send(client: MLClient, entity: Any) -> Any:
    """Create or update one entity with the operation its type needs, waiting for long-running ones."""
    from azure.ai.ml.entities import Compute, Data, OnlineDeployment, OnlineEndpoint
    from azure.core.exceptions import ResourceNotFoundError

    if isinstance(entity, OnlineEndpoint) and not entity.traffic:
        try:  # an existing endpoint stays as it is: a PUT without traffic would cut off the live deployment
            return client.online_endpoints.get(entity.name)
        except ResourceNotFoundError:
            pass
    if isinstance(entity, Data):
        return client.data.create_or_update(entity)
    if isinstance(entity, (Compute, OnlineEndpoint, OnlineDeployment)):
        return client.begin_create_or_update(entity).result()
    return client.create_or_update(entity)


def report_finetune(client: MLClient, created: Any, args: argparse.Namespace) -> None:
    print(f"submitted job {created.name}: {created.studio_url}")
    print(f"when it has completed: phi3flow azure register --model {args.model} --job-name {created.name}")


def report_register(client: MLClient, created: Any, args: argparse.Namespace) -> None:
    print(f"registered model {created.name}:{created.version}")
    print(f"next: phi3flow azure deploy --model {args.model} --model-version {created.version}")


def report_deploy(client: MLClient, created: Any, args: argparse.Namespace) -> None:
    """Scoring URI and the connect command; the key is fetched by the user's shell, never printed here."""
    uri = client.online_endpoints.get(created.name).scoring_uri
    key = (
        f"az ml online-endpoint get-credentials --name {created.name} --resource-group "
        f"{client.resource_group_name} --workspace-name {client.workspace_name} --query primaryKey --output tsv"
    )
    print(f"scoring URI: {uri}")
    print(f'connect Prompt Flow to it:\n  phi3flow connect --endpoint {uri} --key "$({key})"')
    # score.py serves OpenAI's Chat Completions beside /score (docs/openai.md): the openai SDK takes this base URL
    print(f"OpenAI-compatible base URL (openai SDK, Agent Framework, any OpenAI client): {uri.removesuffix('/score')}/v1")


Plan = Callable[[argparse.Namespace], list[Action]]
Report = Callable[[Any, Any, argparse.Namespace], None]
COMMANDS: dict[str, tuple[Plan, Report, str]] = {
    "finetune": (plan_finetune, report_finetune, "create the GPU cluster, upload the data, submit the fine-tuning job"),
    "register": (plan_register, report_register, "register a completed job's output as a model"),
    "deploy": (plan_deploy, report_deploy, "deploy the registered model to a managed online endpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi3flow azure",
        description=f"Fine-tune, register and deploy on Azure Machine Learning from the specs in {' and '.join(str(folder) for folder in SPEC_DIRS)}. "
        f"Workspace: env vars {', '.join(WORKSPACE_ENV)}, or config.json in this folder or a parent. "
        "Credentials: DefaultAzureCredential (az login; service principal env vars; a managed identity, "
        "AZURE_CLIENT_ID picking a user-assigned one), or --client-id for a managed identity.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_, description=help_)
        sub.add_argument(
            "--dry-run", action="store_true", help="validate the specs and print what would be created; needs no credentials"
        )
        sub.add_argument("--client-id", help="client id of a user-assigned managed identity to authenticate with")
        sub.add_argument(
            "--model",
            choices=sorted(MODELS),
            default=DEFAULT_MODEL,
            help=f"which Phi model (default {DEFAULT_MODEL}): its shipped config finetune/configs/"
            "<model>-qlora.yaml, its registered name <model>-ultrachat, its deployment's context cap",
        )
        if name == "finetune":
            sub.add_argument("--train-file", help="training JSONL to upload (default: data/train_data.jsonl)")
            sub.add_argument("--test-file", help="test JSONL to upload (default: data/test_data.jsonl)")
            sub.add_argument("--max-steps", type=int, help="stop training after this many steps (a cheap smoke run)")
        elif name == "register":
            sub.add_argument("--job-name", help="the completed job, as printed by `phi3flow azure finetune`")
        else:
            sub.add_argument("--endpoint-name", help="endpoint name, unique in its region (default: endpoint.yml)")
            sub.add_argument("--instance-type", help="GPU SKU, e.g. Standard_NC40ads_H100_v5 (default: deployment.yml)")
            sub.add_argument("--model-version", help="registered model version to deploy (default: latest)")
    return parser


def run(args: argparse.Namespace) -> int:
    plan, report, _ = COMMANDS[args.command]
    actions = plan(args)
    missing = missing_data(actions)
    if args.dry_run:
        print_plan(actions)
        for path in missing:
            print(f"note: {path} does not exist yet: run `phi3flow data` first, or pass --train-file/--test-file")
        if args.command == "register" and not args.job_name:
            print(f"note: --job-name replaces {JOB_PLACEHOLDER}")
        print("dry run: every spec is valid; nothing was sent")
        return 0
    if missing:
        raise SetupError(f"{missing[0]} not found: run `phi3flow data` first, or pass --train-file/--test-file")
    if args.command == "register" and not args.job_name:
        raise SetupError("--job-name is required: the job printed by `phi3flow azure finetune`")
    client = connect_client(args.client_id)
    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import AzureError

    created = None
    for source, entity in actions:
        print(f"creating {type(entity).__name__} '{_name(entity)}' from {source} ...", flush=True)
        try:
            created = _send(client, entity)
        except (AzureError, MlException) as exc:  # the service's own message says what to fix
            print(f"phi3flow azure: {source}: {exc}", file=sys.stderr)
            return 1
    report(client, created, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SetupError as exc:
        print(f"phi3flow azure: {exc}", file=sys.stderr)
        return 2
