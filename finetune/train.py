"""`phi3flow finetune`: LoRA/QLoRA fine-tuning of a chat model with transformers' Trainer and peft.

A thin layer over library calls: the Trainer already does the optimizer, schedule, evaluation,
checkpoints and resume; this module supplies what it cannot know: assistant-only labels from the chat
template, a pad token distinct from end-of-turn, padding-free packing, LoRA targets checked against the
architecture, and an output folder that the scoring script loads as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProgressCallback,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from phi3flow.data.schema import DataError, Row, read_jsonl
from phi3flow.embedded import embedded_model_dir
from phi3flow.errors import Phi3flowError
from phi3flow.finetune import config
from phi3flow.finetune.chat import (
    IGNORE_INDEX,
    ChatTemplateError,
    end_of_turn_id,
    ensure_distinct_pad,
    tokenize_conversation,
)
from phi3flow.finetune.config import EMBEDDED, ConfigError, FinetuneArguments, FinetuneConfig

log = logging.getLogger("phi3flow.finetune")

METADATA_FILE = "phi3flow_metadata.json"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoints"


class TrainError(Phi3flowError, RuntimeError):
    """A run that cannot start: missing dependency, unusable model or LoRA targets."""


@dataclass
class Prepared:
    """A ready Trainer plus what the output folder must record about how it was built."""

    cfg: FinetuneConfig
    trainer: Trainer
    tokenizer: PreTrainedTokenizerBase
    base_model_path: str
    end_of_turn: int
    quantized: bool


def resolve_model(name: str) -> str:
    """The `embedded` sentinel becomes the converted local folder; anything else passes through."""
    return str(embedded_model_dir()) if name == EMBEDDED else name


def compute_dtype(training: TrainingArguments) -> torch.dtype:
    """The weights' dtype: the Trainer's mixed precision (bf16 already replaced where the hardware lacks it,
    config.resolve_precision), else fp32."""
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


def load_model(cfg: FinetuneConfig, path: str) -> tuple[PreTrainedModel, bool]:
    """Load the base model: 4-bit nf4 with bf16 compute when CUDA allows, else full precision on CPU."""
    cuda = torch.cuda.is_available()
    if cfg.finetune.load_in_4bit and not cuda:
        log.warning("QLoRA needs CUDA (bitsandbytes 4-bit); no GPU here, so this trains plain LoRA in fp32.")
    dtype = compute_dtype(cfg.training)
    kwargs: dict[str, Any] = {"dtype": dtype}
    quantized = cfg.finetune.load_in_4bit and cuda
    if quantized:
        try:
            import bitsandbytes  # noqa: F401  (only checks that QLoRA can run)
        except ImportError as exc:
            raise TrainError("QLoRA needs bitsandbytes: pip install bitsandbytes (or set load_in_4bit: false)") from exc
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float16,
        )
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.activation_checkpointing)
    return model, quantized


def configure_for_training(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Settings the base model needs before training.

    With a KV cache enabled, transformers skips the packed-sequence mask, so packed conversations would
    attend to each other; a cache is useless in training anyway.
    """
    model.config.use_cache = False
    model.config.pad_token_id = tokenizer.pad_token_id


def check_target_modules(model: PreTrainedModel, targets: list[str]) -> None:
    """Fail when a named LoRA target matches no layer: peft adapts the rest silently (Phi-3's fused qkv)."""
    if targets == ["all-linear"]:
        return
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in targets if target not in leaf_names]
    if missing:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
            - {"lm_head"}
        )
        raise TrainError(
            f"LoRA target(s) {', '.join(missing)} match no layer of {type(model).__name__}; "
            f"its linear layers are: {', '.join(linear)} (or use all-linear)"
        )


def apply_lora(model: PreTrainedModel, args: FinetuneArguments) -> PeftModel:
    check_target_modules(model, args.target_modules)
    targets: str | list[str] = "all-linear" if args.target_modules == ["all-linear"] else args.target_modules
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def tokenize_rows(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int, end_of_turn: int, name: str
) -> list[dict[str, Any]]:
    """Tokenize conversations; rows whose assistant tokens all fall past max_length are dropped, loudly."""
    examples = [tokenize_conversation(tokenizer, row["messages"], max_length, end_of_turn) for row in rows]
    kept = [ex for ex in examples if any(label != IGNORE_INDEX for label in ex["labels"])]
    truncated = sum(len(ex["input_ids"]) >= max_length for ex in examples)
    if truncated:
        log.warning("%s: %d of %d conversations truncated to max_seq_length %d", name, truncated, len(rows), max_length)
    if len(kept) < len(examples):
        log.warning(
            "%s: %d conversation(s) have no assistant token within max_seq_length and are skipped",
            name,
            len(examples) - len(kept),
        )
    if not kept:
        raise DataError(f"{name}: no conversation has an assistant token within max_seq_length {max_length}")
    return kept


class LossProgressCallback(ProgressCallback):
    """The default bar shows steps and ETA; this puts the latest loss on it instead of a dict line per log."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if self.training_bar is None or not logs:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if "eval_loss" in logs:
            self.training_bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Load data, tokenizer and model, wrap with LoRA, and build the Trainer (nothing trained yet)."""
    args, training = cfg.finetune, cfg.training
    train_rows, test_rows = read_jsonl(args.train_file), read_jsonl(args.test_file)
    base = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    end_of_turn = end_of_turn_id(tokenizer)
    ensure_distinct_pad(tokenizer, end_of_turn)
    train_set = tokenize_rows(train_rows, tokenizer, args.max_seq_length, end_of_turn, args.train_file)
    test_set = tokenize_rows(test_rows, tokenizer, args.max_seq_length, end_of_turn, args.test_file)

    transformers.set_seed(training.seed)  # LoRA weights are initialised before the Trainer seeds anything
    model, quantized = load_model(cfg, base)
    configure_for_training(model, tokenizer)
    model = apply_lora(model, args)
    # Packing concatenates a batch into one row; position ids restart per conversation and the attention
    # mask is rebuilt from them, so conversations never see each other and no pad token is computed.
    collator = (
        DataCollatorWithFlattening()
        if args.packing
        else DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    )
    trainer = Trainer(
        model=model,
        # Checkpoints in their own subfolder: output_dir itself is the adapter folder the scoring script loads.
        # Tokens seen count real tokens (train_tokens_per_second in the metadata and benches); not a config setting:
        # HfArgumentParser reads the field as a bool and cannot take "non_padding".
        args=dataclasses.replace(
            training, output_dir=str(Path(cfg.output_dir) / CHECKPOINT_DIR), include_num_input_tokens_seen="non_padding"
        ),
        train_dataset=train_set,
        eval_dataset=test_set,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgressCallback)
    return Prepared(cfg, trainer, tokenizer, base, end_of_turn, quantized)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def merge_adapter(adapter_dir: Path, base: str, bf16: bool, end_of_turn: int) -> Path:
    """Write base + adapter as one plain model; reloads the base unquantised so QLoRA runs merge too."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if bf16 else torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    eos = merged.generation_config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if end_of_turn not in eos_ids:  # generation must stop at the end of the assistant's turn
        merged.generation_config.eos_token_id = [*eos_ids, end_of_turn]
    target = adapter_dir / MERGED_DIR
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(target)
    return target


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a run killed while saving it), or None when it is whole.

    The Trainer writes trainer_state.json last; a cut-off file fails to parse (JSON), to match the size its
    header announces (safetensors), or to end with a zip directory (torch.save's .pt/.pth/.bin files)."""
    if not (checkpoint / "trainer_state.json").is_file():
        return "no trainer_state.json"
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                safe_open(path, "pt").keys()
            elif path.suffix in {".pt", ".pth", ".bin"} and not zipfile.is_zipfile(path):
                return f"{path.name} is cut off"
        except (OSError, ValueError, SafetensorError):
            return f"{path.name} is cut off"
    return None


def newest_intact_checkpoint(folder: str) -> str | None:
    """The newest checkpoint that can be resumed from; newer half-written ones are skipped with a warning."""
    for checkpoint in reversed(sort_checkpoints(folder)):
        problem = checkpoint_problem(Path(checkpoint))
        if problem is None:
            return checkpoint
        log.warning("--resume: skipping %s, written only in part (%s)", checkpoint, problem)
    return None


def train(prepared: Prepared, resume: bool = False) -> dict[str, float]:
    """Run the Trainer, from the newest intact checkpoint when resuming; returns its train metrics."""
    trainer = prepared.trainer
    folder = trainer.args.output_dir
    checkpoint = (newest_intact_checkpoint if resume else get_last_checkpoint)(folder) if Path(folder).is_dir() else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s; starting from the beginning", folder)
    elif checkpoint and not resume:
        log.warning("%s holds checkpoints from an earlier run; starting over (pass --resume to continue)", folder)
    return trainer.train(resume_from_checkpoint=checkpoint if resume else None).metrics


def save_outputs(prepared: Prepared, train_metrics: dict[str, float], merge: bool = False) -> dict[str, Any]:
    """Evaluate, then write the adapter, tokenizer, metadata (and merged model); returns the metadata."""
    cfg, trainer, tokenizer = prepared.cfg, prepared.trainer, prepared.tokenizer
    eval_metrics = trainer.evaluate()
    out = Path(cfg.output_dir)
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metadata = {
        "base_model": cfg.finetune.model,
        "base_model_name_or_path": prepared.base_model_path,
        "data": {
            name: {"path": path, "sha256": sha256_file(path)}
            for name, path in (("train", cfg.finetune.train_file), ("test", cfg.finetune.test_file))
        },
        "config": cfg.to_dict(),
        "quantized_4bit": prepared.quantized,
        "end_of_turn_token": tokenizer.convert_ids_to_tokens(prepared.end_of_turn),
        "pad_token": tokenizer.pad_token,
        "metrics": {
            "train_loss": train_metrics.get("train_loss"),
            "eval_loss": eval_metrics.get("eval_loss"),
            "global_step": trainer.state.global_step,
            "train_tokens_per_second": train_metrics.get("train_tokens_per_second"),
        },
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__},
        "merged": None,
    }
    if merge:
        merged = merge_adapter(out, prepared.base_model_path, trainer.args.bf16, prepared.end_of_turn)
        metadata["merged"] = str(merged)
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return metadata


def run(cfg: FinetuneConfig, resume: bool = False, merge: bool = False) -> dict[str, Any]:
    """Prepare, train, evaluate and save; returns the metadata written to the output folder."""
    prepared = prepare(cfg)
    return save_outputs(prepared, train(prepared, resume), merge)


def build_parser() -> argparse.ArgumentParser:
    """The config's flags (config.build_parser) plus what one run does with it."""
    parser = config.build_parser(
        prog="phi3flow finetune",
        description="LoRA/QLoRA fine-tune a chat model on train/test JSONL (see 'phi3flow data'). Settings come "
        "from --config, and any of them from a flag of the same name (phi3flow's, then transformers' "
        "TrainingArguments).",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest intact checkpoint in output_dir/checkpoints"
    )
    parser.add_argument("--merge", action="store_true", help=f"also write base + adapter merged in {MERGED_DIR}/")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    try:
        cfg, args = config.parse_config(build_parser(), argv)
        metadata = run(cfg, resume=args.resume, merge=args.merge)
    except (ConfigError, DataError, ChatTemplateError, TrainError) as exc:
        print(f"phi3flow finetune: {exc}", file=sys.stderr)
        return 1
    metrics = metadata["metrics"]
    print(
        f"Adapter written to {cfg.output_dir} after {metrics['global_step']} steps "
        f"(train loss {metrics['train_loss']:.4f}, eval loss {metrics['eval_loss']:.4f})."
    )
    if metadata["merged"]:
        print(f"Merged model written to {metadata['merged']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
