"""Prompt Flow tool: chat with a Phi-3 AzureML endpoint, or any OpenAI-compatible one, through a CustomConnection
(configs.endpoint, secrets.key; optional configs.api_format and configs.model, see phi3flow.connect)."""

from __future__ import annotations

from collections.abc import Iterator

from promptflow.connections import CustomConnection
from promptflow.core import tool

from phi3flow.client import get_client, to_messages
from phi3flow.connect import client_options, endpoint_and_key
from phi3serve.contract import DEFAULTS


@tool
def chat(
    connection: CustomConnection,
    input_data: str,
    chat_history: list = None,
    system_prompt: str = "",
    temperature: float = DEFAULTS.temperature,
    top_p: float = DEFAULTS.top_p,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    stream: bool = False,
) -> str | Iterator[str]:
    """Send the question and the chat history to the endpoint and return the model's answer.

    With `stream`, return a generator of text pieces instead: Prompt Flow streams it to the chat UI
    (`pf flow test --interactive`, VS Code, Foundry) and joins it elsewhere.
    """
    client = get_client(*endpoint_and_key(connection), **client_options(connection))
    messages = to_messages(input_data, chat_history, system_prompt)
    ask = client.chat_stream if stream else client.chat
    return ask(messages, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
