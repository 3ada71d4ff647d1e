"""The Agent Framework chat client: the endpoint contract through phi3flow.client, and an agent on the embedded model.

agent-framework-core 1.x cannot share an environment with promptflow 1.18 (OpenTelemetry pins), so these
tests skip in the main venv and run in .venv-agents.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest

pytest.importorskip("agent_framework")

from agent_framework import Agent, Message  # noqa: E402

from conftest import SECRET, Reply  # noqa: E402
from phi3agents import EndpointChatClient, ask  # noqa: E402
from phi3flow.client import EndpointError  # noqa: E402

FAST = {"backoff_factor": 0.01, "max_backoff": 0.5}


def client(endpoint, **options) -> EndpointChatClient:
    return EndpointChatClient(endpoint.url, SECRET, **{**FAST, **options})


def run_agent(chat_client: EndpointChatClient, question: str, **options) -> str:
    agent = Agent(chat_client, "Be brief.", default_options=options)
    return asyncio.run(agent.run(question)).text


def test_agent_speaks_the_contract(endpoint):
    endpoint.script = [Reply(body={"output": "Bill Gates and Paul Allen."})]
    answer = run_agent(client(endpoint), "Who founded Microsoft?", temperature=0.2, top_p=0.9, max_tokens=64)
    assert answer == "Bill Gates and Paul Allen."
    sent = endpoint.requests[0]
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert sent["body"] == {
        "input_data": {
            "input_string": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who founded Microsoft?"}],
            "parameters": {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 64},
        }
    }


def test_session_history_is_sent_as_role_content_turns(endpoint):
    endpoint.script = [Reply(body={"output": "Bill Gates."}), Reply(body={"output": "1975."})]
    answers = asyncio.run(ask(client(endpoint), "Be brief.", ["Who founded Microsoft?", "In which year?"], 0.0, 16))
    assert answers == ["Bill Gates.", "1975."]
    assert endpoint.requests[1]["body"]["input_data"]["input_string"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": "Bill Gates."},
        {"role": "user", "content": "In which year?"},
    ]


def test_answer_takes_the_chat_flows_history(endpoint):
    endpoint.script = [Reply(body={"output": "1975."})]
    history = [{"inputs": {"question": "Who founded Microsoft?"}, "outputs": {"answer": "Bill Gates."}}]
    assert client(endpoint).answer("In which year?", history, "Be brief.", temperature=0.0) == "1975."
    body = endpoint.requests[0]["body"]["input_data"]
    assert [turn["role"] for turn in body["input_string"]] == ["system", "user", "assistant", "user"]
    assert body["parameters"] == {"temperature": 0.0}


def test_system_messages_merge_into_one_leading_turn(endpoint):
    messages = [Message(role="system", contents=["Use French."]), Message(role="user", contents=["Bonjour"])]
    asyncio.run(client(endpoint).get_response(messages, options={"instructions": "Be brief."}))
    turns = endpoint.requests[0]["body"]["input_data"]["input_string"]
    assert turns == [{"role": "system", "content": "Be brief.\n\nUse French."}, {"role": "user", "content": "Bonjour"}]


def stream_texts(chat_client: EndpointChatClient, question: str = "Who?", stop_after: int | None = None) -> list[str]:
    """The text of each update of a streamed answer (the last one only says it is finished), or of the first `stop_after`."""

    async def collect() -> list[str]:
        texts = []
        async for update in chat_client.get_response([Message(role="user", contents=[question])], stream=True):
            texts.append(update.text)
            if len(texts) == stop_after:
                break
        return texts

    return asyncio.run(collect())


def sse(*pieces: str, done: bool = True) -> list[str]:
    """A server-sent events body in the contract's format (phi3serve.contract)."""
    events = [f"event: delta\ndata: {json.dumps({'text': piece})}\n\n" for piece in pieces]
    return events + ([f"event: done\ndata: {json.dumps({'output': ''.join(pieces)})}\n\n"] if done else [])


SSE = {"Content-Type": "text/event-stream"}


def test_streaming_from_a_json_endpoint_yields_the_whole_answer_once(endpoint):
    endpoint.script = [Reply(body={"output": "Bill Gates."})]
    assert stream_texts(client(endpoint)) == ["Bill Gates.", ""]
    assert endpoint.requests[0]["headers"]["Accept"] == "text/event-stream"


def test_streaming_yields_an_update_per_piece(endpoint):
    endpoint.script = [Reply(body=sse("Bill", " Gates", "."), headers=SSE)]
    assert stream_texts(client(endpoint)) == ["Bill", " Gates", ".", ""]

    async def final() -> tuple[str, str]:
        agent = Agent(client(endpoint), "Be brief.")
        stream = agent.run("Who founded Microsoft?", stream=True)
        texts = [update.text async for update in stream]
        return "".join(texts), (await stream.get_final_response()).text

    assert asyncio.run(final()) == ("Bill Gates.", "Bill Gates.")


def test_stream_cut_mid_answer_raises(endpoint):
    endpoint.script = [Reply(body=sse("Bill", done=False), headers=SSE)]
    with pytest.raises(EndpointError, match="without its final 'done' event: the answer is incomplete"):
        stream_texts(client(endpoint))
    endpoint.script = [
        Reply(
            body=[*sse("Bill", done=False), 'event: error\ndata: {"message": "engine stopped", "status": 503}\n\n'], headers=SSE
        )
    ]
    with pytest.raises(EndpointError, match="failed after streaming 4 characters \\(HTTP 503\\): engine stopped") as info:
        stream_texts(client(endpoint))
    assert info.value.status == 503 and SECRET not in str(info.value)


def test_stopping_a_stream_early_drops_the_connection(endpoint):
    endpoint.script = [Reply(body=sse(*[f" w{i}" for i in range(40)]), headers=SSE, gap=0.05)]
    assert stream_texts(client(endpoint), stop_after=1) == [" w0"]
    deadline = time.monotonic() + 10
    while not endpoint.disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert endpoint.disconnects == 1


@pytest.mark.parametrize(
    ("options", "expected"), [({"seed": 1}, "does not support the option.*seed"), ({"tools": [lambda: 1]}, "cannot call tools")]
)
def test_options_the_endpoint_cannot_honour_are_refused(endpoint, options, expected):
    with pytest.raises(ValueError, match=expected):
        asyncio.run(client(endpoint).get_response([Message(role="user", contents=["hi"])], options=options))
    assert not endpoint.requests


@pytest.mark.parametrize("busy", [429, 503])
def test_busy_endpoint_is_retried(endpoint, busy):
    endpoint.script = [Reply(busy, {"message": "busy"}), Reply(busy), Reply(body={"output": "recovered"})]
    assert run_agent(client(endpoint), "hi") == "recovered"
    assert len(endpoint.requests) == 3


def test_refused_key_is_explained(endpoint):
    endpoint.script = [Reply(401, {"message": "invalid key"})]
    with pytest.raises(EndpointError, match="refused the key.*check the connection's key") as info:
        run_agent(client(endpoint), "hi")
    assert info.value.status == 401
    assert len(endpoint.requests) == 1


def test_unreachable_endpoint_is_explained():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        unreachable = EndpointChatClient(f"http://127.0.0.1:{port}/score", SECRET, retries=1, **FAST)
        with pytest.raises(EndpointError, match=f"cannot reach 127.0.0.1:{port} \\(connection refused\\)"):
            run_agent(unreachable, "hi")


def test_key_never_shown(endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    shown = [repr(client(endpoint)), str(client(endpoint).to_dict())]
    for reply in [Reply(401), Reply(503), Reply(body={"nope": 1})]:
        endpoint.script, endpoint.requests = [reply], []
        with pytest.raises(EndpointError) as info:
            run_agent(client(endpoint, retries=1), "hi")
        shown += [str(info.value), repr(info.value)]
    assert all(SECRET not in text for text in shown)
    assert caplog.records and all(SECRET not in record.getMessage() for record in caplog.records)


@pytest.fixture(scope="module")
def local(embedded_dir):
    from phi3flow.serve import LocalEndpoint

    with LocalEndpoint(embedded_dir) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def local_client(local):
    return EndpointChatClient(local.url, local.key)


@pytest.mark.model
def test_agent_answers_on_the_embedded_model(local_client):
    assert "Gates" in run_agent(local_client, "Who founded Microsoft?", temperature=0.0, max_tokens=48)


@pytest.mark.model
def test_agent_keeps_the_conversation_on_the_embedded_model(local_client):
    agent = Agent(
        local_client, "You are a helpful assistant. Answer briefly.", default_options={"temperature": 0.0, "max_tokens": 32}
    )
    session = agent.create_session()
    history = [
        Message(role="user", contents=["Let's talk about Paris."]),
        Message(role="assistant", contents=["Sure, Paris is the capital of France."]),
        Message(role="user", contents=["Which country is it the capital of?"]),
    ]
    assert "France" in asyncio.run(agent.run(history, session=session)).text


@pytest.mark.model
def test_agent_streams_the_answer_it_gives_whole_on_the_embedded_model(local_client):
    options = {"temperature": 0.0, "max_tokens": 48}

    async def streamed() -> list[str]:
        return [
            update.text
            async for update in Agent(local_client, "Be brief.", default_options=options).run(
                "Who founded Microsoft?", stream=True
            )
        ]

    pieces = [text for text in asyncio.run(streamed()) if text]
    assert len(pieces) > 1
    assert "".join(pieces) == run_agent(local_client, "Who founded Microsoft?", **options)


def test_evaluation_via_agent_matches_the_direct_path(endpoint, tmp_path, monkeypatch):
    """`phi3flow eval --via agent` sends what the Prompt Flow tool's client sends, and scores it the same."""
    import json

    from phi3flow.evaluation.compare import main as evaluate

    rows = [
        {
            "prompt": q,
            "prompt_id": str(i),
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Paris."}],
        }
        for i, q in enumerate(["Capital of France?", "Largest city in France?"])
    ]
    data = tmp_path / "test_data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    endpoint.script = [Reply(body={"output": "Paris."})]
    monkeypatch.setenv("PHI3FLOW_ENDPOINT_KEY", SECRET)
    for via in ("client", "agent"):
        assert (
            evaluate(
                [
                    "--candidate",
                    endpoint.url,
                    "--data",
                    str(data),
                    "--output-dir",
                    str(tmp_path / via),
                    "--via",
                    via,
                    "--concurrency",
                    "1",
                ]
            )
            == 0
        )
    bodies = [request["body"] for request in endpoint.requests]
    assert bodies[:2] == bodies[2:]
    metrics = {
        via: json.loads((tmp_path / via / "metrics.json").read_text())["systems"]["candidate"]["metrics"]
        for via in ("client", "agent")
    }
    assert metrics["client"]["rouge_l"] == metrics["agent"]["rouge_l"] and metrics["agent"]["rouge_l"]["mean"] == 1.0


@pytest.mark.model
def test_agent_framework_openai_client_on_the_v1_route(local, local_client):
    """Agent Framework's own Chat Completions client, pointed at phi3flow serve's /v1, gets the answer ours gets."""
    from agent_framework.openai import OpenAIChatCompletionClient

    base = local.url.removesuffix("/score") + "/v1"
    options = {"temperature": 0.0, "max_tokens": 32}

    async def whole_and_streamed() -> tuple[str, list[str]]:  # one event loop: the OpenAI client's connections live in it
        agent = Agent(
            OpenAIChatCompletionClient(model="phi3flow", api_key=local.key, base_url=base), "Be brief.", default_options=options
        )
        whole = (await agent.run("Who founded Microsoft?")).text
        return whole, [update.text async for update in agent.run("Who founded Microsoft?", stream=True) if update.text]

    answer, pieces = asyncio.run(whole_and_streamed())
    assert answer == run_agent(local_client, "Who founded Microsoft?", **options) and "Gates" in answer
    assert answer == run_agent(EndpointChatClient(base, local.key), "Who founded Microsoft?", **options)  # ours, OpenAI's dialect
    assert len(pieces) > 1 and "".join(pieces) == answer
