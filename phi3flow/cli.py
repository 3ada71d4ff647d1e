"""The `phi3flow` command: wires each stage's own entry point, importing only the one asked for.

Stages import heavy libraries (torch, azure-ai-ml); a light tool install must still run `--help`.
"""

from __future__ import annotations

import importlib
import sys

from phi3flow.errors import Phi3flowError

# command -> (module with main(argv) -> int, the extra it needs beyond the light tool install, one-line help);
# in pipeline order.
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "data": ("phi3flow.data.prepare", None, "prepare train/test JSONL (ultrachat_200k, offline sample, or your file)"),
    "finetune": ("phi3flow.finetune.train", "train", "LoRA/QLoRA fine-tune a chat model"),
    "azure": ("phi3flow.azure", "azure", "submit fine-tuning, register and deploy on Azure Machine Learning"),
    "export": ("phi3flow.export", "onnx", "export a model or LoRA adapter to an ONNX Runtime GenAI folder (int4 by default)"),
    "serve": ("phi3flow.serve", "serve", "serve a model locally under azmlinfsrv with the AzureML endpoint contract"),
    "connect": ("phi3flow.connect", None, "create the Prompt Flow CustomConnection for an endpoint"),
    "demo": ("phi3flow.demo", "serve", "end to end: local endpoint on the embedded model -> connection -> pf flow test"),
    "eval": ("phi3flow.evaluation.compare", "eval", "evaluate endpoints over test data and compare them"),
    "agent": (
        "phi3agents",
        "agents",
        "ask a Microsoft Agent Framework agent backed by the endpoint (needs agent-framework-core)",
    ),
}


def _usage() -> str:
    lines = ["usage: phi3flow <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'phi3flow <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if args[0] == "--version":
        from phi3flow import __version__

        print(__version__)
        return 0
    if args[0] not in COMMANDS:
        print(f"phi3flow: unknown command '{args[0]}'.\n\n{_usage()}", file=sys.stderr)
        return 2
    name, extra, _ = COMMANDS[args[0]]
    try:
        return int(importlib.import_module(name).main(args[1:]) or 0)
    except Phi3flowError as exc:  # the one place errors meet the user: a message, no traceback
        print(f"phi3flow {args[0]}: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # a light install running a command of an extra it does not have
        if extra is None or exc.name is None or exc.name.split(".")[0] in {"phi3flow", "phi3serve", "phi3agents"}:
            raise
        print(f"phi3flow {args[0]}: needs {exc.name}, which is not installed: pip install 'phi3flow[{extra}]'", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
