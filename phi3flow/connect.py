"""`phi3flow connect`: create (or update) the Prompt Flow CustomConnection the chat flow uses.

Same result as `pf connection create -f connections/phi3_endpoint.yaml --set ...`, through the SDK.
The key can come from --key, the PHI3FLOW_ENDPOINT_KEY environment variable, or a hidden prompt.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

KEY_ENV = "PHI3FLOW_ENDPOINT_KEY"
DEFAULT_NAME = "phi3_endpoint"


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
