"""Prompt Flow tool: chat with a Phi-3 AzureML endpoint through a CustomConnection (configs.endpoint, secrets.key)."""

from __future__ import annotations

from promptflow.connections import CustomConnection
from promptflow.core import tool

from phi3flow.client import get_client, to_messages
from phi3flow.connect import endpoint_and_key


@tool
def chat(
    connection: CustomConnection,
    input_data: str,
    chat_history: list = None,
    system_prompt: str = "",
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
) -> str:
    """Send the question and the chat history to the endpoint and return the model's answer."""
    client = get_client(*endpoint_and_key(connection))
    messages = to_messages(input_data, chat_history, system_prompt)
    return client.chat(messages, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
