"""Loading a chat model for serving: the folder, dtype, LoRA adapter, stop tokens, and prompt encoding."""

from __future__ import annotations

import json
import logging
import os
import re
from bisect import bisect_left
from pathlib import Path
from typing import Any

import torch

from phi3serve.contract import MAX_CONTEXT_ENV, BadRequest
from phi3serve.settings import ENV, Settings

log = logging.getLogger("azmlinfsrv.score")  # a child of the server's logger, so it reaches its log handler

METADATA_FILE = "phi3flow_metadata.json"  # written by `phi3flow finetune` beside the adapter
ONNX_CONFIG = "genai_config.json"  # an ONNX Runtime GenAI folder (`phi3flow export onnx`): served by phi3serve.onnx_engine
_SENTINEL = "phi3flow-sentinel-answer"
# Private-use characters that wrap control-token text found in a message while the template renders it
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"


def find_model_folder(root: Path) -> Path:
    """The folder holding the model: AZUREML_MODEL_DIR itself, a registered model's subfolder, or an MLflow one."""
    markers = ("adapter_config.json", "config.json", ONNX_CONFIG)
    candidates = [root] + sorted(p.parent for marker in markers for p in root.rglob(marker))
    for folder in candidates:
        if any((folder / marker).is_file() for marker in markers):
            return folder
    raise FileNotFoundError(
        f"No model found under {root}: expected a Hugging Face folder (config.json), a LoRA adapter "
        f"(adapter_config.json) or an ONNX Runtime GenAI folder ({ONNX_CONFIG})"
    )


def choose_dtype(cuda: bool, name: str = "auto") -> torch.dtype:
    """`name` ($PHI3FLOW_DTYPE), else bf16 where the hardware computes it natively (most GPUs; CPUs with AVX512-BF16 or
    AMX), else fp16 on older GPUs and fp32 on other CPUs."""
    if name != "auto":
        return getattr(torch, name)
    if cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token, including added control tokens not listed among all_special_ids."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The first special token the chat template writes after an assistant message (else EOS; None without either)."""
    if not tokenizer.chat_template:
        return tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
    )
    suffix = text[text.rindex(_SENTINEL) + len(_SENTINEL) :]
    special = special_token_ids(tokenizer)
    for token_id in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id
    return tokenizer.eos_token_id


def stop_ids(tokenizer: Any, recorded: str | None, eos: int | list[int] | None = None) -> list[int]:
    """The tokens that end a turn: what training recorded, the chat template's end-of-turn token, the model's own
    EOS setting (`eos`: its generation config's, or an ONNX folder's), then the tokenizer's EOS."""
    ids: list[int | None] = []
    if recorded is not None:
        ids.append(tokenizer.convert_tokens_to_ids(recorded))
    ids.append(end_of_turn_id(tokenizer))
    ids += eos if isinstance(eos, list) else [eos]
    ids.append(tokenizer.eos_token_id)
    stop = list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))
    if not stop:
        raise RuntimeError("the model has no end-of-turn or EOS token: generation could never stop")
    return stop


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool
) -> tuple[str, list[int], list[tuple[int, int]]]:
    """The chat template's text for `messages`, its token ids and each token's character span in that text.

    Only the template's own markers become control tokens: control-token text inside a message's content (a user
    writing `<|im_end|>` to forge a system turn) is tokenized as text. Each such occurrence is wrapped in private
    markers before rendering, so it can be found in the rendered text; a tokenization without those markers is the
    tokenizer's usual one, token for token. Serving (ChatModel) and training (finetune.chat) encode through here.
    The ids are those of transformers' `apply_chat_template(..., sanitize_control_tokens=True)`, which gives no offsets.
    """
    controls = sorted({tokenizer.convert_ids_to_tokens(i) for i in special_token_ids(tokenizer)}, key=len, reverse=True)
    found = re.compile("|".join(map(re.escape, controls)) or "(?!)")
    marked = [
        {
            **message,
            "content": found.sub(
                lambda m: f"{_OPEN}{m.group()}{_CLOSE}", message["content"].replace(_OPEN, "").replace(_CLOSE, "")
            ),
        }
        for message in messages
    ]
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=generation_prompt)
    pieces, spans, length, at = [], [], 0, 0  # the text without markers; the spans of the marked control tokens in it
    for match in re.finditer(f"{_OPEN}({found.pattern}){_CLOSE}|[{_OPEN}{_CLOSE}]", rendered):  # a lone marker: dropped
        kept = rendered[at : match.start()] + (match.group(1) or "")
        pieces.append(kept)
        if match.group(1):
            spans.append((length + len(kept) - len(match.group(1)), length + len(kept)))
        length += len(kept)
        at = match.end()
    text = "".join(pieces) + rendered[at:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if not spans:
        return text, ids, offsets
    special = special_token_ids(tokenizer)
    out_ids, out_offsets = [], []
    for token, (lo, hi) in zip(ids, offsets):
        if token in special and any(lo < end and start < hi for start, end in spans):  # forged: its text, as text
            plain = tokenizer(text[lo:hi], add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            out_ids += plain["input_ids"]
            out_offsets += [(lo + a, lo + b) for a, b in plain["offset_mapping"]]
        else:
            out_ids.append(token)
            out_offsets.append((lo, hi))
    return text, out_ids, out_offsets


class ChatModel:
    """A causal LM with its tokenizer and chat template: encodes conversations, knows its stop tokens."""

    onnx = False  # True for an ONNX Runtime GenAI model (phi3serve.onnx_engine.OnnxChatModel)

    def __init__(self, model: Any, tokenizer: Any, end_of_turn: str | None = None, max_context: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context = capped(int(getattr(model.config, "max_position_embeddings", 0) or 4096), max_context)
        self.stop_ids = stop_ids(tokenizer, end_of_turn, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def load(cls, model_dir: str | os.PathLike, settings: Settings | None = None) -> ChatModel:
        """A Hugging Face folder, or a LoRA adapter merged onto its base at load (serving then costs no adapter math).

        `settings` (the server's, read once at start-up; else this process's environment) give the device, dtype,
        context cap and base-model override."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        settings = settings or Settings.from_env()
        folder = find_model_folder(Path(model_dir))
        if (folder / ONNX_CONFIG).is_file():
            from phi3serve.onnx_engine import OnnxChatModel

            return OnnxChatModel.load(folder, settings)
        cuda = use_cuda(settings.device)
        metadata = read_json(folder / METADATA_FILE) or {}
        adapter = read_json(folder / "adapter_config.json")
        base: str | Path = folder
        if adapter is not None:
            base = settings.base_model or metadata.get("base_model_name_or_path") or adapter["base_model_name_or_path"]
        model: Any = AutoModelForCausalLM.from_pretrained(
            base, dtype=choose_dtype(cuda, settings.dtype), attn_implementation="sdpa"
        )
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder).merge_and_unload()
            log.info("Merged LoRA adapter %s onto base %s", folder, base)
        has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else base)
        if cuda:
            model = model.to("cuda")
        return cls(model, tokenizer, metadata.get("end_of_turn_token"), settings.max_context)

    def encode(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of the prompt, dropping the oldest turns (after the system prompt) if needed: (ids, turns dropped).

        The prompt shrinks as turns are dropped, so a binary search over the user turns a window may
        start at finds the fewest drops in O(log n) template renderings (not one per turn).
        """
        budget = self.context - max_new_tokens
        if budget <= 0:
            raise BadRequest(f"parameters.max_new_tokens must be below the context this server accepts, {self.context} tokens")
        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system) :]
        starts = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
        cache: dict[int, list[int]] = {}

        def ids_from(start: int) -> list[int]:
            if start not in cache:
                cache[start] = self._render(system + turns[start:])
            return cache[start]

        if len(ids_from(starts[0])) <= budget:
            return ids_from(starts[0]), starts[0]
        first_fit = bisect_left(range(len(starts)), True, key=lambda k: len(ids_from(starts[k])) <= budget)
        if first_fit == len(starts):
            room = f"{budget} tokens (context {self.context} minus max_new_tokens {max_new_tokens})"
            if system and len(self._render(turns[starts[-1] :])) <= budget:  # the last turn fits without the system prompt
                raise BadRequest(
                    f"the system prompt leaves no room for the last user turn within {room}; "
                    "shorten the system prompt or lower parameters.max_new_tokens"
                )
            raise BadRequest(f"the last user turn needs more than {room}; shorten it or lower parameters.max_new_tokens")
        return ids_from(starts[first_fit]), starts[first_fit]

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return render_chat(self.tokenizer, messages, generation_prompt=True)[1]
        except Exception as exc:  # jinja errors: the template rejects this conversation shape
            raise BadRequest(f"input_data.input_string was rejected by the model's chat template: {str(exc)[:200]}") from None

    def text(self, tokens: list[int]) -> str:
        """The answer text of generated tokens (stop tokens and other special tokens left out), whole characters only:
        an answer cut inside a character (by max_new_tokens, or a stream so far) ends before it, not in U+FFFD."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for cut in range(1, min(4, len(tokens) + 1)):  # a character's 4 bytes at most: up to 3 trailing tokens hold part of it
            if not text.endswith("\ufffd"):
                break
            text = self.tokenizer.decode(tokens[:-cut], skip_special_tokens=True)
        return text.strip()


def capped(model_context: int, cap: int | None) -> int:
    """The model's context, capped by $PHI3FLOW_MAX_CONTEXT (`cap`) when that is set."""
    if cap is None:
        return model_context
    if cap < model_context:
        log.info("Context capped at %d tokens by %s (the model's own: %d)", cap, MAX_CONTEXT_ENV, model_context)
    return min(model_context, cap)


def use_cuda(device: str) -> bool:
    """Whether to generate on CUDA: where available (auto), never (cpu), or required (cuda: a GPU deployment whose
    driver or CUDA build does not match must fail at start-up, not serve on the CPU at a hundredth of the speed)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{ENV['device']}=cuda but CUDA is not available to torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda or 'none: a CPU build'}); check the GPU driver and the image, or unset {ENV['device']}"
        )
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def read_json(path: Path) -> dict | None:
    """A JSON file's object, None when the file is absent (metadata and adapter configs are optional)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
