"""`phi3flow connect`: create (or update) the Prompt Flow CustomConnection the chat flow uses.

Same result as `pf connection create -f connections/phi3_endpoint.yaml --set ...`, through the SDK.
The key comes from the PHI3FLOW_ENDPOINT_KEY environment variable, a file (--key-file), or a hidden prompt,
never from the command line, where every user of the machine can read it (`ps`) and the shell history keeps it.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from phi3serve.contract import KEY_ENV  # the key variable's one home (clients and the local server share it)

DEFAULT_NAME = "phi3_endpoint"
KEY_ON_COMMAND_LINE = (
    "warning: --key puts the key where every user of this machine can read it (`ps`, /proc) and in "
    f"your shell history; use ${KEY_ENV} or --key-file instead"
)


def add_key_options(parser: argparse.ArgumentParser, otherwise: str) -> None:
    """--key-file, and --key kept for old scripts with a warning; the same in every command that takes a key."""
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--key-file",
        metavar="FILE",
        help=f"read the endpoint key from FILE ('-': standard input, asked for without echo on a terminal); "
        f"without it the key comes from ${KEY_ENV}, else {otherwise}",
    )
    keys.add_argument("--key", help="the key itself: discouraged, anyone on this machine can read it in `ps`")


def key_from(args: argparse.Namespace, parser: argparse.ArgumentParser, ask: bool) -> str | None:
    """The key from --key-file, --key (with a warning) or $PHI3FLOW_ENDPOINT_KEY; else, when `ask`, a hidden prompt
    on a terminal; else None. A key with surrounding whitespace is refused: clients send it trimmed, so a server
    holding it would refuse every request, and a connection holding it is a copy-paste slip."""
    if args.key_file is not None:
        source, key = f"--key-file {args.key_file}", _read_key_file(args.key_file, parser)
    elif args.key is not None:
        print(KEY_ON_COMMAND_LINE, file=sys.stderr)
        source, key = "--key", args.key
    elif os.environ.get(KEY_ENV) is not None:
        source, key = f"${KEY_ENV}", os.environ[KEY_ENV]
    elif ask and sys.stdin.isatty():
        source, key = "the prompt", getpass.getpass("Endpoint key: ")
    else:
        return None
    if not key.strip():
        parser.error(f"the key from {source} is empty")
    if key != key.strip():
        parser.error(
            f"the key from {source} starts or ends with whitespace (a space, tab or line break): remove it; "
            "clients send the key trimmed, so it would never match"
        )
    return key


def _read_key_file(name: str, parser: argparse.ArgumentParser) -> str:
    """The key in a file or on standard input ('-'), less the line break that ends it."""
    if name == "-":
        text = getpass.getpass("Endpoint key: ") if sys.stdin.isatty() else sys.stdin.readline()
    else:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"cannot read --key-file {name}: {exc.strerror if isinstance(exc, OSError) else 'not UTF-8 text'}")
    return text.removesuffix("\n").removesuffix("\r")


# Optional configs of a connection, passed to the endpoint client: the dialect (auto: OpenAI's for a URL ending in /v1)
# and the model an OpenAI-compatible endpoint serves (Foundry and vLLM need it; phi3flow serve takes any).
CLIENT_OPTIONS = ("api_format", "model")


def endpoint_and_key(connection: Any, name: str = "the connection") -> tuple[str, str]:
    """configs.endpoint and secrets.key of a CustomConnection, or a ValueError naming the one missing."""
    configs, secrets = dict(connection.configs or {}), dict(connection.secrets or {})
    if not configs.get("endpoint"):
        raise ValueError(
            f"{name} has no configs.endpoint: set it to the endpoint's scoring URL (ending in /score) "
            "or an OpenAI-compatible base URL (ending in /v1)"
        )
    if not secrets.get("key"):
        raise ValueError(f"{name} has no secrets.key: set it to the endpoint's primary key")
    return configs["endpoint"], secrets["key"]


def client_options(connection: Any) -> dict[str, str]:
    """The connection's endpoint-client options (configs.api_format, configs.model) that are set."""
    configs = dict(connection.configs or {})
    return {name: configs[name] for name in CLIENT_OPTIONS if configs.get(name)}


def read_connection(name: str) -> tuple[str, str, dict[str, str]]:
    """The URL, key and client options of a connection in the local Prompt Flow store (the key decrypted, never printed)."""
    from promptflow.client import PFClient

    try:
        connection = PFClient().connections.get(name, with_secrets=True)
    except Exception as exc:  # promptflow raises its own not-found error types, which vary by version
        raise ValueError(
            f"cannot read connection '{name}' ({type(exc).__name__}): create it with 'phi3flow connect --name {name} ...'"
        ) from None
    return (*endpoint_and_key(connection, f"connection '{name}'"), client_options(connection))


def create_connection(endpoint: str, key: str, name: str = DEFAULT_NAME, **options: str) -> None:
    """Store the connection in the local Prompt Flow connection store (secret encrypted there); `options`: CLIENT_OPTIONS."""
    from promptflow.client import PFClient
    from promptflow.entities import CustomConnection

    from phi3flow.client import EndpointClient

    options = {k: v for k, v in options.items() if v}
    EndpointClient(endpoint, key, **options).close()  # validates URL, key format and options before anything is stored
    connection = CustomConnection(name=name, configs={"endpoint": endpoint, **options}, secrets={"key": key})
    PFClient().connections.create_or_update(connection)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phi3flow connect", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--endpoint",
        required=True,
        help="scoring URL, e.g. https://<endpoint>.<region>.inference.ml.azure.com/score, "
        "or an OpenAI-compatible base URL ending in /v1 (Foundry Models, Foundry Local, vLLM, phi3flow serve)",
    )
    parser.add_argument(
        "--api-format",
        choices=["auto", "azureml", "openai"],
        default="auto",
        help="how to speak to it (default auto: OpenAI's Chat Completions when the URL ends in /v1)",
    )
    parser.add_argument("--model", help="model (deployment) name an OpenAI-compatible endpoint serves, sent as 'model'")
    add_key_options(parser, "asked for without echo on a terminal")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"connection name (default {DEFAULT_NAME}, what flows/chat uses)")
    args = parser.parse_args(argv)
    key = key_from(args, parser, ask=True)
    if key is None:
        parser.error(
            f"no key: set {KEY_ENV}, pass --key-file FILE (or --key-file - to pipe it in), or run on a terminal to be asked"
        )
    from phi3flow.client import EndpointError
    from phi3flow.offline import use_offline_defaults

    use_offline_defaults()
    try:
        options = {"api_format": args.api_format if args.api_format != "auto" else None, "model": args.model}
        create_connection(args.endpoint, key, args.name, **{name: value for name, value in options.items() if value})
    except EndpointError as exc:
        parser.error(str(exc))
    print(f"Connection '{args.name}' now points at {args.endpoint}")
    return 0
