"""`phi3flow agent`: the AzureML endpoint as a Microsoft Agent Framework chat client, so users can leave Prompt Flow.

Prompt Flow is in maintenance; Agent Framework is its successor. `EndpointChatClient` speaks the same
endpoint contract through `phi3flow.client.get_client` (one implementation of HTTP, retries, errors and
key handling for the tool, evaluation and agents). This module needs only `requests` and
`agent-framework-core`; promptflow is imported only by `from_connection`. A package beside `phi3flow`, not in
it: Agent Framework and promptflow cannot share an environment (OpenTelemetry pins), and `pf tool validate
--source phi3flow` imports every module of the tool package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any

from agent_framework import (
    Agent,
    BaseChatClient,
    ChatResponse,
    ChatResponseUpdate,
    Content,
    Message,
    ResponseStream,
    prepend_instructions_to_messages,
)

from phi3flow.client import EndpointClient, EndpointError, get_client, to_messages
from phi3flow.connect import read_connection
from phi3serve.contract import DEFAULTS, KEY_ENV

DEFAULT_INSTRUCTIONS = "You are a helpful assistant. Answer briefly and factually."
# Agent Framework option -> endpoint contract parameter. Anything else the endpoint cannot honour.
PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_new_tokens"}
# Options the Agent fills in itself that carry nothing for a tool-less endpoint.
IGNORED_OPTIONS = frozenset(
    {"instructions", "model", "tool_choice", "allow_multiple_tool_calls", "store", "additional_properties"}
)


class EndpointChatClient(BaseChatClient):
    """Agent Framework chat client for an AzureML endpoint (the `{"input_data": ...}` -> `{"output": ...}` contract).

    Non-streaming answers are one HTTP call; streaming yields an update per piece the endpoint streams
    (`EndpointClient.chat_stream`), or one with the whole answer from an endpoint that does not stream.
    Tools are refused: the endpoint returns text only.
    """

    OTEL_PROVIDER_NAME = "azureml"

    def __init__(self, endpoint: str, key: str, **client_options: Any):
        super().__init__()
        self._client: EndpointClient = get_client(endpoint, key, **client_options)

    @classmethod
    def from_connection(cls, name: str, **client_options: Any) -> EndpointChatClient:
        """From the Prompt Flow CustomConnection a user already has (configs.endpoint, secrets.key)."""
        from phi3flow.offline import use_offline_defaults

        use_offline_defaults()
        try:
            endpoint, key, options = read_connection(name)
        except ValueError:
            raise
        except Exception:  # promptflow absent, or broken by agent-framework's newer OpenTelemetry (it re-raises a bare Exception)
            raise RuntimeError(
                "--connection needs promptflow in this environment; promptflow 1.18 cannot be installed beside "
                "agent-framework-core 1.x (OpenTelemetry pins), so pass --endpoint and the key instead"
            ) from None
        return cls(endpoint, key, **options, **client_options)

    def __repr__(self) -> str:
        return f"EndpointChatClient({self._client.endpoint!r})"

    def service_url(self) -> str:
        return self._client.endpoint

    def _inner_get_response(
        self, *, messages: Sequence[Message], stream: bool, options: Mapping[str, Any], **kwargs: Any
    ) -> Awaitable[ChatResponse] | ResponseStream[ChatResponseUpdate, ChatResponse]:
        if stream:
            return self._build_response_stream(self._stream(messages, options))
        return self._respond(messages, options)

    async def _respond(self, messages: Sequence[Message], options: Mapping[str, Any]) -> ChatResponse:
        text = await self._call(messages, options)
        return ChatResponse(messages=[Message(role="assistant", contents=[text])], finish_reason="stop")

    async def _stream(self, messages: Sequence[Message], options: Mapping[str, Any]) -> AsyncIterator[ChatResponseUpdate]:
        """The blocking piece generator read off the event loop, one piece per thread hop."""
        turns, parameters = await self._request(messages, options)
        pieces = self._client.chat_stream(turns, **parameters)
        try:
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                yield ChatResponseUpdate(role="assistant", contents=[Content.from_text(piece)])
            yield ChatResponseUpdate(role="assistant", finish_reason="stop")
        finally:
            # Drops the connection when the caller stops early. After a cancel the thread may still be inside
            # next(): the generator is then closed when it is garbage collected, once that piece has arrived.
            with contextlib.suppress(ValueError):
                pieces.close()

    async def _call(self, messages: Sequence[Message], options: Mapping[str, Any]) -> str:
        """One endpoint call off the event loop (the shared client is blocking `requests`)."""
        turns, parameters = await self._request(messages, options)
        return await asyncio.to_thread(self._client.chat, turns, **parameters)

    async def _request(
        self, messages: Sequence[Message], options: Mapping[str, Any]
    ) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """Contract turns and parameters for a call (ValueError for what the endpoint cannot honour)."""
        options = await self._validate_options(options)
        turns = to_turns(prepend_instructions_to_messages(list(messages), options.get("instructions"), role="system"))
        return turns, to_parameters(options)

    def answer(self, question: str, history: list[dict] | None = None, instructions: str = "", **options: Any) -> str:
        """Blocking single answer for evaluation; `history` is the chat flow's chat_history, so one dataset serves both paths."""
        messages = [Message(role=turn["role"], contents=[turn["content"]]) for turn in to_messages(question, history)]
        response = asyncio.run(self.get_response(messages, options={"instructions": instructions or None, **options}))
        return response.text


def to_turns(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Agent Framework messages -> contract turns; all system text merged into the one leading system turn the endpoint allows."""
    system = [m.text for m in messages if m.role == "system" and m.text]
    turns = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    for message in messages:
        if message.role == "system":
            continue
        if message.role not in ("user", "assistant"):
            raise ValueError(f"the endpoint takes user/assistant turns only, not {message.role!r} (no tools)")
        if not message.text:
            raise ValueError(f"a {message.role} message has no text: the endpoint takes text only")
        turns.append({"role": message.role, "content": message.text})
    return turns


def to_parameters(options: Mapping[str, Any]) -> dict[str, Any]:
    """Agent Framework chat options -> contract parameters; options the endpoint cannot honour are refused, not dropped."""
    if options.get("tools"):
        raise ValueError("the endpoint cannot call tools: create the agent without tools")
    unsupported = sorted(
        k for k, v in options.items() if v is not None and k not in PARAMETERS and k not in IGNORED_OPTIONS and k != "tools"
    )
    if unsupported:
        raise ValueError(
            f"the endpoint does not support the option(s) {', '.join(unsupported)}; it takes {', '.join(PARAMETERS)}"
        )
    return {PARAMETERS[k]: v for k, v in options.items() if k in PARAMETERS and v is not None}


async def ask(
    client: EndpointChatClient, instructions: str, questions: Sequence[str], temperature: float, max_tokens: int
) -> list[str]:
    """Run an agent over the questions in one session, so each answer sees the turns before it."""
    agent = Agent(client, instructions, default_options={"temperature": temperature, "max_tokens": max_tokens})
    session = agent.create_session()
    return [(await agent.run(question, session=session)).text for question in questions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phi3flow agent", description=__doc__.splitlines()[0])
    parser.add_argument("--question", action="append", required=True, help="a user turn; repeat for a multi-turn conversation")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", help="scoring URL, e.g. https://<endpoint>.<region>.inference.ml.azure.com/score")
    target.add_argument("--connection", help="name of an existing Prompt Flow CustomConnection (needs promptflow installed)")
    target.add_argument(
        "--local", action="store_true", help="serve the embedded model locally for the run (needs phi3flow[serve])"
    )
    parser.add_argument(
        "--key-env", default=KEY_ENV, help=f"environment variable holding the key for --endpoint (default {KEY_ENV})"
    )
    parser.add_argument("--instructions", default=DEFAULT_INSTRUCTIONS, help="the agent's instructions (sent as the system turn)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="answer length limit (default %(default)s)"
    )
    args = parser.parse_args(argv)

    def run(client: EndpointChatClient) -> int:
        answers = asyncio.run(ask(client, args.instructions, args.question, args.temperature, args.max_new_tokens))
        for question, answer in zip(args.question, answers):
            print(f"Q: {question}\nA: {answer}", flush=True)
        return 0

    try:
        if args.local:
            from phi3flow.embedded import embedded_model_dir
            from phi3flow.serve import LocalEndpoint

            with LocalEndpoint(embedded_model_dir()) as local:
                return run(EndpointChatClient(local.url, local.key))
        if args.connection:
            return run(EndpointChatClient.from_connection(args.connection))
        key = os.environ.get(args.key_env)
        if not key:
            parser.error(f"--endpoint needs the key in ${args.key_env} (or name another variable with --key-env)")
        return run(EndpointChatClient(args.endpoint, key))
    except (EndpointError, ValueError, RuntimeError) as exc:
        print(f"phi3flow agent: {exc}", file=sys.stderr)
        return 1
