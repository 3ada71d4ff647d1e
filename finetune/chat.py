"""Chat-template facts derived from the tokenizer itself, so no model's special tokens are hard-coded.

- The end-of-turn token is whatever the template writes right after an assistant message.
- The pad token must differ from it: collators and users that mask pad ids in the labels would
  otherwise hide the end of every turn, and the model would learn never to stop.
- Assistant spans are found by rendering growing prefixes of the conversation, so the loss can cover
  exactly the assistant's tokens (content + end-of-turn) in any template that renders turn by turn.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from phi3flow.errors import Phi3flowError
from phi3serve.model import end_of_turn_id as template_end_of_turn
from phi3serve.model import render_chat, special_token_ids

IGNORE_INDEX = -100  # label value the loss skips


class ChatTemplateError(Phi3flowError, ValueError):
    """The tokenizer's chat template cannot be used for assistant-only training."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], prompt: bool = False) -> str:
    if not tokenizer.chat_template:
        raise ChatTemplateError(f"tokenizer of {tokenizer.name_or_path!r} has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The end-of-turn token by the serving side's own rule (phi3serve.model), so training and serving agree;
    here a tokenizer without a chat template, or without any such token, is an error."""
    if not tokenizer.chat_template:
        raise ChatTemplateError(f"tokenizer of {tokenizer.name_or_path!r} has no chat template")
    end = template_end_of_turn(tokenizer)
    if end is None:
        raise ChatTemplateError(f"cannot tell the end-of-turn token of {tokenizer.name_or_path!r}")
    return end


def ensure_distinct_pad(tokenizer: PreTrainedTokenizerBase, end_of_turn: int) -> None:
    """Make pad != end-of-turn, reusing an existing token (unk first) so the vocabulary never grows."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != end_of_turn:
        return
    for candidate in (tokenizer.unk_token_id, tokenizer.eos_token_id, *sorted(special_token_ids(tokenizer))):
        if candidate is not None and candidate not in (end_of_turn, tokenizer.bos_token_id):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(candidate)
            return
    raise ChatTemplateError(f"no token other than end-of-turn can serve as pad for {tokenizer.name_or_path!r}")


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int, end_of_turn: int
) -> dict[str, Any]:
    """input_ids and labels for one conversation; labels are IGNORE_INDEX outside assistant turns.

    A token is labelled when it overlaps an assistant span, which runs from the end of the generation
    prompt before it to the end-of-turn token after it, found by rendering the conversation up to that
    turn. Truncates to max_length tokens.
    """
    text, ids, offsets = render_chat(tokenizer, messages, generation_prompt=False)  # content's control-token text stays text
    end_text = tokenizer.convert_ids_to_tokens(end_of_turn)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        end = upto.find(end_text, len(before) + len(message["content"].strip()))  # after any such text in the content
        end = len(upto.rstrip()) if end < 0 else end + len(end_text)
        if not upto.startswith(before) or not text.startswith(upto[:end]):
            raise ChatTemplateError(
                f"the chat template of {tokenizer.name_or_path!r} does not render turn by turn; "
                "assistant tokens cannot be located"
            )
        spans.append((len(before), end))
    ids, offsets = ids[:max_length], offsets[:max_length]
    labels = [
        token if any(start < stop and start < hi and stop > lo for lo, hi in spans) else IGNORE_INDEX
        for token, (start, stop) in zip(ids, offsets)
    ]
    return {"input_ids": ids, "labels": labels}
