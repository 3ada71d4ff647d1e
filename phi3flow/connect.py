"""`phi3flow connect`: create (or update) the Prompt Flow CustomConnection the chat flow uses.

Same result as `pf connection create -f connections/phi3_endpoint.yaml --set ...`, through the SDK.
The key can come from --key, the PHI3FLOW_ENDPOINT_KEY environment variable, or a hidden prompt.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

KEY_ENV = "PHI3FLOW_ENDPOINT_KEY"
DEFAULT_NAME = "phi3_endpoint"


def endpoint_and_key(connection: Any, name: str = "the connection") -> tuple[str, str]:
    """configs.endpoint and secrets.key of a CustomConnection, or a ValueError naming the one missing."""
    configs, secrets = dict(connection.configs or {}), dict(connection.secrets or {})
    if not configs.get("endpoint"):
        raise ValueError(f"{name} has no configs.endpoint: set it to the endpoint's scoring URL (ending in /score)")
    if not secrets.get("key"):
        raise ValueError(f"{name} has no secrets.key: set it to the endpoint's primary key")
    return configs["endpoint"], secrets["key"]


def read_connection(name: str) -> tuple[str, str]:
    """The scoring URL and key of a connection in the local Prompt Flow store (the key decrypted, never printed)."""
    from promptflow.client import PFClient

    try:
        connection = PFClient().connections.get(name, with_secrets=True)
    except Exception as exc:  # promptflow raises its own not-found error types, which vary by version
        raise ValueError(f"cannot read connection '{name}' ({type(exc).__name__}): create it with 'phi3flow connect --name {name} ...'") from None
    return endpoint_and_key(connection, f"connection '{name}'")


def create_connection(endpoint: str, key: str, name: str = DEFAULT_NAME) -> None:
    """Store the connection in the local Prompt Flow connection store (secret encrypted there)."""
    from promptflow.client import PFClient
    from promptflow.entities import CustomConnection

    from phi3flow.client import EndpointClient

    EndpointClient(endpoint, key).close()  # validates URL and key format before anything is stored
    connection = CustomConnection(name=name, configs={"endpoint": endpoint}, secrets={"key": key})
    PFClient().connections.create_or_update(connection)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phi3flow connect", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="scoring URL, e.g. https://<endpoint>.<region>.inference.ml.azure.com/score")
    parser.add_argument("--key", help=f"endpoint key (default: ${KEY_ENV}, else asked for without echo)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"connection name (default {DEFAULT_NAME}, what flows/chat uses)")
    args = parser.parse_args(argv)
    key = args.key or os.environ.get(KEY_ENV)
    if not key and sys.stdin.isatty():
        key = getpass.getpass("Endpoint key: ")
    if not key:
        parser.error(f"no key: pass --key, set {KEY_ENV}, or run interactively to be asked")
    from phi3flow.client import EndpointError
    from phi3flow.offline import use_offline_defaults

    use_offline_defaults()
    try:
        create_connection(args.endpoint, key, args.name)
    except EndpointError as exc:
        parser.error(str(exc))
    print(f"Connection '{args.name}' now points at {args.endpoint}")
    return 0
