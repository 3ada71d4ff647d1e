"""`phi3flow demo`: the whole chain on the embedded model, offline.

chat flow -> tool -> CustomConnection -> HTTP (AzureML contract) -> score.py under azmlinfsrv -> model.
Starts the local endpoint, creates the connection, runs `pf flow test`, prints the answer, stops all it started.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from phi3flow.connect import DEFAULT_NAME, create_connection
from phi3flow.offline import pf_executable, stop_pf_service, use_offline_defaults
from phi3flow.serve import LocalEndpoint, resolve_model_dir

REPO_FLOW = Path(__file__).resolve().parent.parent / "flows" / "chat"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phi3flow demo", description=__doc__.splitlines()[0])
    parser.add_argument("--question", default="Who founded Microsoft?", help="what to ask (default: the flow's default question)")
    parser.add_argument("--model-dir", help="model folder to serve (default: the embedded model)")
    parser.add_argument("--flow", default=str(REPO_FLOW), help="chat flow folder (default: flows/chat of this checkout)")
    args = parser.parse_args(argv)
    use_offline_defaults()
    flow = Path(args.flow)
    if not (flow / "flow.dag.yaml").is_file():
        parser.error(f"{flow} has no flow.dag.yaml: pass --flow with the chat flow folder")

    print("1/3 Starting the local endpoint (azmlinfsrv + deploy/score.py)...", flush=True)
    log_file = Path(tempfile.gettempdir()) / "phi3flow-demo-server.log"
    log_file.unlink(missing_ok=True)
    endpoint = LocalEndpoint(resolve_model_dir(args.model_dir), log_file=log_file)
    try:
        with endpoint:
            print(f"    ready at {endpoint.url} (server log: {log_file})", flush=True)
            print(f"2/3 Creating the Prompt Flow connection '{DEFAULT_NAME}'...", flush=True)
            create_connection(endpoint.url, endpoint.key, DEFAULT_NAME)
            print(f"3/3 pf flow test --flow {flow} --inputs input_data=...", flush=True)
            command = [pf_executable(), "flow", "test", "--flow", str(flow), "--inputs", f"input_data={args.question}"]
            result = subprocess.run(command, capture_output=True, text=True)  # inherits the offline defaults set above
            if result.returncode != 0:
                print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
                print("phi3flow demo: pf flow test failed (output above)", file=sys.stderr)
                return 1
            answer = json.loads((flow / ".promptflow" / "flow.output.json").read_text())["answer"]
    except (RuntimeError, TimeoutError) as exc:
        print(f"phi3flow demo: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_pf_service()
    print(f"\nQ: {args.question}\nA: {answer}")
    return 0
