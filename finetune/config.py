"""The fine-tuning configuration, as TRL's sft.py builds it: phi3flow's own dataclass for what only phi3flow knows
(model, data files, sequence length, packing, LoRA, 4-bit loading) plus transformers' own `TrainingArguments` for
everything the Trainer owns, both filled by `HfArgumentParser`.

A YAML file holds the settings under their dataclass names (upstream names for the Trainer's); flags override it
under the same names (`--max_steps` or `--max-steps`). transformers is imported only when a config is parsed, so
`phi3flow azure` can read a shipped config's model on a light install.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from phi3flow.errors import Phi3flowError

if TYPE_CHECKING:
    from transformers import HfArgumentParser, TrainingArguments

log = logging.getLogger("phi3flow.finetune")

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "embedded-lora-cpu"
EMBEDDED = "embedded"  # sentinel for `model`: the kit's embedded model, see phi3flow.embedded
# Settings whose transformers 4 names configs may still carry: what to write instead.
RENAMED = {
    "warmup_ratio": "warmup_steps: below 1 it is a fraction of the steps",
    "group_by_length": "train_sampling_strategy: group_by_length",
}


class ConfigError(Phi3flowError, ValueError):
    """A configuration file or override that cannot be used."""


@dataclass
class FinetuneArguments:
    """What phi3flow adds to the Trainer's arguments; field docs are the `--help` text of their flags."""

    _argument_group_name = "phi3flow: model, data, LoRA"

    model: str = field(default=EMBEDDED, metadata={"help": f"hub id, local folder, or '{EMBEDDED}'"})
    train_file: str = field(default="data/train_data.jsonl", metadata={"help": "training JSONL"})
    test_file: str = field(default="data/test_data.jsonl", metadata={"help": "held-out JSONL for eval loss"})
    max_seq_length: int = field(default=1024, metadata={"help": "longer conversations are truncated"})
    packing: bool = field(default=True, metadata={"help": "padding-free packing of each batch"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA nf4 (needs CUDA + bitsandbytes)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "module names (space- or comma-separated), or all-linear"},
    )

    def __post_init__(self) -> None:
        names = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        self.target_modules = [name.strip() for item in names for name in item.split(",") if name.strip()]
        if not self.target_modules:
            raise ConfigError("target_modules is empty")
        for name in ("max_seq_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class FinetuneConfig:
    """One run's settings: phi3flow's and the Trainer's."""

    finetune: FinetuneArguments
    training: TrainingArguments

    @property
    def output_dir(self) -> str:
        """The run's folder: adapter, tokenizer and metadata, with the Trainer's checkpoints in checkpoints/."""
        return self.training.output_dir

    def to_dict(self) -> dict[str, Any]:
        """Both parts as plain data (the Trainer's with its token fields masked), for the metadata file."""
        return {"finetune": dataclasses.asdict(self.finetune), "training": self.training.to_dict()}


def trainer_defaults() -> dict[str, Any]:
    """Where phi3flow's runs need other defaults than the Trainer's (a config or flag can still set them)."""
    import torch

    return {
        "remove_unused_columns": False,  # the collators read input_ids/labels from the tokenized rows
        "disable_tqdm": False,  # the loss progress bar (train.LossProgressCallback)
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning without a GPU only warns
    }


def build_parser(**kwargs: Any) -> HfArgumentParser:
    """Flags for both dataclasses plus `--config`; errors raise (ConfigError from parse_config) instead of exiting."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((FinetuneArguments, TrainingArguments), exit_on_error=False, **kwargs)
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"YAML file or shipped config name: {DEFAULT_CONFIG} (CPU), phi3-mini-qlora (GPU)",
    )
    parser.set_defaults(**trainer_defaults())
    return parser


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


def read_config(name_or_path: str | Path) -> dict[str, Any]:
    """The settings a config file holds, as written (no defaults, nothing resolved)."""
    path = resolve_config_path(name_or_path)
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return values


def _check_names(parser: HfArgumentParser, values: dict[str, Any], source: Path) -> None:
    known = {f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [
            f"{name} (now {RENAMED[name]})"
            if name in RENAMED
            else f"{name} (did you mean {', '.join(close)}?)"
            if (close := difflib.get_close_matches(name, known))
            else name
            for name in unknown
        ]
        raise ConfigError(
            f"{source}: unknown setting(s) {'; '.join(hints)}: neither phi3flow's "
            "(FinetuneArguments) nor transformers' TrainingArguments (see `phi3flow finetune --help`)"
        )


def resolve_precision(values: dict[str, Any]) -> None:
    """`bf16: true` asks for half precision on CUDA: bf16 where the GPU computes it (Ampere and newer), else fp16
    (T4, V100 refuse bf16: TrainingArguments would raise). On a CPU, fp32: bf16 training there is slow and loses
    precision for no memory gain."""
    if not values.get("bf16"):
        return
    import torch

    if not torch.cuda.is_available():
        log.warning("bf16 is for CUDA here; training in fp32 on CPU.")
        values["bf16"] = False
    elif not torch.cuda.is_bf16_supported():
        log.warning("%s has no bf16: training with fp16 mixed precision instead.", torch.cuda.get_device_name())
        values.update(bf16=False, fp16=True)


def parse_config(
    parser: HfArgumentParser, argv: Sequence[str], overrides: dict[str, Any] | None = None
) -> tuple[FinetuneConfig, argparse.Namespace]:
    """The YAML named by `--config`, then non-None overrides, then the flags in argv (TRL's TrlParser order).

    Returns the config and the parser's other arguments (`config`, and any a caller added)."""
    argv = list(argv)
    try:
        path = resolve_config_path(parser.parse_known_args(argv)[0].config)
    except argparse.ArgumentError as exc:  # a flag's value of the wrong type
        raise ConfigError(str(exc)) from exc
    values = {**read_config(path), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    _check_names(parser, values, path)
    parser.set_defaults(**values)  # the file's values become defaults: a flag given in argv wins
    try:
        merged = vars(parser.parse_args(argv))
        resolve_precision(merged)
        finetune, training = parser.parse_dict(merged, allow_extra_keys=True)
    except (argparse.ArgumentError, TypeError, ValueError) as exc:  # TrainingArguments checks its own values
        raise ConfigError(f"{path}: {exc}") from exc
    fields = {f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype)}
    rest = argparse.Namespace(**{k: v for k, v in merged.items() if k not in fields})
    return FinetuneConfig(finetune, training), rest


def load_config(name_or_path: str | Path = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """A config file with non-None overrides under the same names (for benches and tests: no command line)."""
    return parse_config(build_parser(), ["--config", str(name_or_path)], overrides)[0]
