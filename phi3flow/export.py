"""`phi3flow export onnx`: a Hugging Face folder or a LoRA adapter -> an ONNX Runtime GenAI model folder.

The AI Toolkit's convert step, through the same exporter it uses underneath: onnxruntime-genai's model
builder. A LoRA adapter is merged onto its base first by the scoring script's own loader
(phi3serve.model.ChatModel), so the exported model answers like the served one. The output folder
holds genai_config.json, which is how `phi3flow serve` and the Azure deployment know to answer with the
ONNX engine (phi3serve.onnx_engine); it also carries the tokenizer, chat template and stop tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from phi3flow.errors import Phi3flowError

if TYPE_CHECKING:
    from phi3serve.model import ChatModel

PRECISIONS = ("int4", "int8", "fp16", "fp32")
# Weights per scale in the int4/int8 MatMulNBits kernels; 32 is the builder's default. 128 decodes the embedded model
# 1.45x faster on this project's 2-core CPU but answers significantly worse (README, "AI Toolkit parity: ONNX").
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
TARGETS = ("cpu", "cuda")
INSTALL_HINT = "pip install 'phi3flow[onnx]' (onnxruntime-genai with onnx, onnx-ir and onnxscript, which its builder needs)"


class ExportError(Phi3flowError, RuntimeError):
    """The model cannot be exported; the message says why and what to do."""


def _check_combination(precision: str, target: str) -> None:
    """The builder's CPU kernels have no fp16: say so before loading anything."""
    if precision == "fp16" and target == "cpu":
        raise ExportError("fp16 runs on a GPU only: use --precision fp16 --target cuda, or int4/int8/fp32 for a CPU")


def _builder_available() -> None:
    try:
        import onnx_ir  # noqa: F401 - the builder imports these without declaring them
        import onnxruntime_genai  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"exporting to ONNX needs {exc.name}: {INSTALL_HINT}") from None


def _architecture(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return (config.get("architectures") or [config.get("model_type", "unknown")])[0]


def _merged_copy(adapter_dir: Path, staging: Path) -> ChatModel:
    """Merge the adapter onto its base with the scoring script's loader and save it as a plain HF folder."""
    from phi3serve.model import ChatModel

    chat = ChatModel.load(adapter_dir)
    chat.model.save_pretrained(staging)
    chat.tokenizer.save_pretrained(staging)
    return chat


def _builder_folder(folder: Path, staging: Path) -> Path:
    """`folder`, or a copy of it (links to its files) whose config.json spells LongRoPE the way the builder reads it.

    onnxruntime-genai 0.18's Phi-3 builder reads `config.rope_parameters["type"]` (the hub's `rope_scaling.type`,
    which transformers keeps); transformers 5 writes `rope_parameters` with `rope_type` only, for a model it saved
    itself (a merged adapter, a model built in code), and the builder fails with KeyError: 'type'.
    """
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    spelled = [
        key
        for key in ("rope_parameters", "rope_scaling")
        if isinstance(config.get(key), dict) and config[key].get("rope_type") == "longrope" and "type" not in config[key]
    ]
    if not spelled:
        return folder
    for key in spelled:
        config[key] = {**config[key], "type": "longrope"}
    if folder != staging:
        staging.mkdir(exist_ok=True)
        for entry in folder.iterdir():
            if entry.name != "config.json":
                (staging / entry.name).symlink_to(entry.resolve())
    (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return staging


def _run_builder(source: Path, output: Path, precision: str, target: str, block_size: int, log_path: Path, layers: int) -> None:
    """Run the model builder in a child process, its chatter in a log file, one progress bar on stderr."""
    from tqdm import tqdm

    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(source),
        "-o",
        str(output),
        "-p",
        precision,
        "-e",
        target,
        "-c",
        str(output / ".cache"),
        "--extra_options",
        "prune_lm_head=true",
    ]
    if precision in ("int4", "int8"):
        command.append(f"block_size={block_size}")
    steps = layers + 4  # embedding, layers, final norm, LM head, saving
    with (
        open(log_path, "w", encoding="utf-8") as log,
        tqdm(total=steps, desc=f"ONNX {precision} ({target})", unit="step", file=sys.stderr) as bar,
    ):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in process.stdout:
            log.write(line)
            if re.match(r"Reading (embedding|layer \d+|final norm|LM head)", line) or line.startswith("Saving GenAI config"):
                bar.update(1)
        code = process.wait()
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if code != 0:
        if "is not currently supported" in text or "NotImplementedError" in text:
            raise ExportError(
                f"the {_architecture(source)} architecture cannot be converted by onnxruntime-genai's model "
                f"builder; see {log_path} (Phi-3/3.5/4-mini, Llama, Mistral, Qwen and Gemma are supported)"
            )
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise ExportError(f"the model builder failed (exit {code}); last lines of {log_path}:\n{tail}")


def _gather_each_rows_last_token(model_path: Path) -> None:
    """Logits for each row's own last token only.

    The builder's prune_lm_head skips the LM head for all but the last column of the prompt (a fifth of a
    prefill's work with the embedded model); in a batch of right-padded prompts a shorter row's last token
    sits before that column, so its Gather becomes a per-row GatherND at (real tokens - padding columns - 1):
    the last column in a decode step, the last real token in a prefill (the attention mask marks padding 0).
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    nodes = list(model.graph.node)
    gather = next((n for n in nodes if n.op_type == "Gather" and n.name.endswith("/prune/Gather")), None)
    if gather is None:
        raise ExportError(f"the model builder's graph in {model_path} has no pruned LM head (/lm_head/prune/Gather)")
    name = gather.name.removesuffix("Gather") + "last_token/"
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), name + "one"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), name + "zero"),
        ]
    )
    index = [
        helper.make_node("Shape", ["input_ids"], [name + "columns"], start=1, end=2),
        helper.make_node("Shape", ["attention_mask"], [name + "width"], start=1, end=2),
        helper.make_node("ReduceSum", ["attention_mask", name + "one"], [name + "real"], keepdims=1),
        helper.make_node("Sub", [name + "width", name + "real"], [name + "padding"]),
        helper.make_node("Sub", [name + "columns", name + "padding"], [name + "count"]),
        helper.make_node("Sub", [name + "count", name + "one"], [name + "last"]),
        helper.make_node("Max", [name + "last", name + "zero"], [name + "index"]),  # [batch, 1]
        helper.make_node(
            "GatherND", [gather.input[0], name + "index"], list(gather.output), name=gather.name + "ND", batch_dims=1
        ),
    ]
    position = nodes.index(gather)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes[:position] + index + nodes[position + 1 :])
    onnx.save(model, str(model_path))  # the weights stay where the builder wrote them (model.onnx.data)


def _finish_config(output: Path, stop_ids: list[int]) -> None:
    """Every stop token of the served model ends generation."""
    from phi3serve.model import ONNX_CONFIG

    path = output / ONNX_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    eos = config["model"].get("eos_token_id")
    known = eos if isinstance(eos, list) else [eos]
    config["model"]["eos_token_id"] = list(dict.fromkeys([*stop_ids, *(i for i in known if i is not None)]))
    path.write_text(json.dumps(config, indent=4), encoding="utf-8")


def export_onnx(
    model_dir: str | Path,
    output_dir: str | Path,
    precision: str = "int4",
    target: str = "cpu",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Path:
    """Export a HF folder or a LoRA adapter folder to an ONNX Runtime GenAI folder; returns the folder."""
    from phi3serve.model import METADATA_FILE, ONNX_CONFIG, find_model_folder, read_json, stop_ids

    if precision not in PRECISIONS or target not in TARGETS or block_size not in BLOCK_SIZES:
        raise ExportError(
            f"precision must be one of {', '.join(PRECISIONS)}, target one of {', '.join(TARGETS)} "
            f"and block size one of {', '.join(map(str, BLOCK_SIZES))}"
        )
    _check_combination(precision, target)
    _builder_available()
    try:
        source = find_model_folder(Path(model_dir))
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    output = Path(output_dir)
    if (output / ONNX_CONFIG).exists():
        raise ExportError(f"{output} already holds an ONNX model: choose an empty --output-dir")
    output.mkdir(parents=True, exist_ok=True)
    metadata = read_json(source / METADATA_FILE) or {}
    with tempfile.TemporaryDirectory(prefix="phi3flow-merge-", dir=output) as staging:
        if (source / "adapter_config.json").is_file():
            print(f"Merging the LoRA adapter {source} onto its base", file=sys.stderr)
            chat = _merged_copy(source, Path(staging))
            stop, builder_input = chat.stop_ids, Path(staging)
        else:
            from transformers import AutoTokenizer

            if not (source / "config.json").is_file():
                raise ExportError(f"{source} has no config.json: export a Hugging Face model folder or a LoRA adapter")
            stop = stop_ids(AutoTokenizer.from_pretrained(source), metadata.get("end_of_turn_token"))
            builder_input = source
        builder_input = _builder_folder(builder_input, Path(staging))
        layers = int(json.loads((builder_input / "config.json").read_text(encoding="utf-8")).get("num_hidden_layers", 0))
        _run_builder(builder_input, output, precision, target, block_size, output / "export.log", layers)
    shutil.rmtree(output / ".cache", ignore_errors=True)
    _gather_each_rows_last_token(output / "model.onnx")
    _finish_config(output, stop)
    metadata["onnx"] = {"precision": precision, "target": target, "source": str(source)}
    if precision in ("int4", "int8"):
        metadata["onnx"]["block_size"] = block_size
    (output / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phi3flow export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="format", required=True)
    onnx = sub.add_parser("onnx", help="ONNX Runtime GenAI folder (what the AI Toolkit runs), via onnxruntime-genai's builder")
    onnx.add_argument("--model-dir", help="Hugging Face folder or LoRA adapter folder; default: the embedded model")
    onnx.add_argument(
        "--output-dir", required=True, help="new folder for the ONNX model (serve it with phi3flow serve --model-dir)"
    )
    onnx.add_argument("--precision", choices=PRECISIONS, default="int4", help="weights (default int4; fp16 needs --target cuda)")
    onnx.add_argument("--target", choices=TARGETS, default="cpu", help="execution provider the model is built for (default cpu)")
    onnx.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=DEFAULT_BLOCK_SIZE,
        help=f"int4/int8 weights per scale (default {DEFAULT_BLOCK_SIZE}; smaller: closer to the original, slower)",
    )
    args = parser.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        from phi3flow.embedded import embedded_model_dir

        model_dir = embedded_model_dir()
    out = export_onnx(
        model_dir, args.output_dir, args.precision, args.target, args.block_size
    )  # ExportError: cli.main reports it
    print(f"ONNX model written to {out}; serve it with: phi3flow serve --model-dir {out}")
    return 0
