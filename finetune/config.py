"""The fine-tuning configuration: one dataclass, filled from a YAML file and then from CLI flags.

Flags are generated from the fields, so a new setting is one line here and works in YAML and on the
command line alike (`max_steps` <-> `--max-steps`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "embedded-lora-cpu"
EMBEDDED = "embedded"  # sentinel for `model`: the kit's embedded model, see phi3flow.embedded


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


@dataclass
class TrainConfig:
    """Everything one fine-tuning run needs; field docs are the `--help` text of their flags."""

    model: str = field(default=EMBEDDED, metadata={"help": f"hub id, local folder, or '{EMBEDDED}'"})
    train_file: str = field(default="data/train_data.jsonl", metadata={"help": "training JSONL"})
    test_file: str = field(default="data/test_data.jsonl", metadata={"help": "held-out JSONL for eval loss"})
    output_dir: str = field(default="out/finetune", metadata={"help": "adapter + checkpoints/ folder"})
    max_seq_length: int = field(default=1024, metadata={"help": "longer conversations are truncated"})
    packing: bool = field(default=True, metadata={"help": "padding-free packing of each batch"})
    group_by_length: bool = field(default=False, metadata={"help": "batch similar lengths (without packing)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA nf4 (needs CUDA + bitsandbytes)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 weights/compute (CUDA only)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "comma-separated module names, or all-linear"},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps to warm up"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use epochs"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "conversations per step"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "conversations per eval step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "steps per optimizer update"})
    logging_steps: int = field(default=10, metadata={"help": "loss logging interval"})
    eval_steps: int = field(default=100, metadata={"help": "eval interval; 0 = only at the end"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint interval (what --resume can lose)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    seed: int = field(default=42, metadata={"help": "training seed"})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        if not self.target_modules:
            raise ConfigError("target_modules is empty")
        for name in ("max_seq_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "save_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given, or the name of a shipped config (`phi3-mini-qlora` -> configs/phi3-mini-qlora.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a shipped config ({names})")


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config, apply non-None overrides, and reject keys the dataclass does not know."""
    path = resolve_config_path(name_or_path)
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _flag_type(annotation: str) -> Any:
    """argparse type for a field annotation (annotations are strings under `from __future__`)."""
    return {"int": int, "float": float, "str": str, "list[str]": str}[annotation]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One override flag per config field; None means 'keep the YAML value'."""
    group = parser.add_argument_group("config overrides (default: the config file's value)")
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        if spec.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=spec.metadata["help"])
        else:
            group.add_argument(flag, type=_flag_type(str(spec.type)), default=None, help=spec.metadata["help"])


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(TrainConfig)}

