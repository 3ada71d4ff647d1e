"""OpenAI's Chat Completions on the endpoint: the request mapping without a model, then the `openai` SDK itself
against `phi3flow serve` (azmlinfsrv + deploy/score.py on the embedded model): plain, streamed, bad key, bad
parameter, the same greedy answer as /score, and the OpenAI body accepted on /score (how it reaches Azure)."""

from __future__ import annotations

import json

import openai as sdk
import pytest
import requests

from conftest import SECRET, served_locally
from phi3serve import openai
from phi3serve.contract import DEFAULTS, BadRequest

QUESTION = [{"role": "user", "content": "Who founded Microsoft?"}]


def parse(**fields) -> openai.CompletionRequest:
    return openai.parse(json.dumps({"messages": QUESTION, **fields}).encode())


def test_request_maps_to_the_contract():
    request = parse(
        model="x",
        temperature=0,
        top_p=0.5,
        max_completion_tokens=9,
        stop="\n",
        stream=True,
        stream_options={"include_usage": True},
        seed=3,
        n=1,
        presence_penalty=0,
        user="u1",
    )
    assert request.chat.messages == QUESTION
    assert (request.chat.params.temperature, request.chat.params.top_p, request.chat.params.max_new_tokens) == (0, 0.5, 9)
    assert request.chat.params.greedy and request.stream and request.include_usage and request.stop == ("\n",)
    assert parse().chat.params == DEFAULTS  # the contract's defaults, not OpenAI's
    parts = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    assert openai.parse(json.dumps({"messages": parts}).encode()).chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]


@pytest.mark.parametrize(
    ("fields", "param", "expected"),
    [
        ({"n": 2}, "n", "n must be 1"),
        ({"temperature": 3}, "temperature", r"temperature must be in \[0, 2\]"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be in"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "differ"),
        ({"logit_bias": {"1": 2}}, "logit_bias", "logit_bias is not supported"),
        ({"tools": [{"type": "function"}]}, "tools", "cannot call tools"),
        ({"seed": 1, "temperature": 0.7}, "seed", "only with temperature 0"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "only text parts"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "messages.0..role must be one of"),
        ({"messages": [{"role": "tool", "content": "1"}]}, "messages[0]", "tool calls"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(fields, param, expected):
    with pytest.raises(BadRequest, match=expected) as info:
        parse(**fields)
    assert info.value.status == 400
    assert openai.error(info.value)["error"]["param"] == param


def test_stop_sequences_cut_streams_and_answers_alike():
    scanner, stops = openai.StopScanner(("END", "\n\n")), ("END", "\n\n")
    pieces = ["Hello E", "N", "D! more"]
    streamed = "".join(scanner.feed(p) for p in pieces) + scanner.flush()
    assert streamed == "Hello " == openai.cut("".join(pieces), stops)[0] and scanner.hit
    scanner = openai.StopScanner(("END",))
    assert "".join(scanner.feed(p) for p in ["ab", "E", "c"]) + scanner.flush() == "abEc" and not scanner.hit


# --- the `openai` SDK against `phi3flow serve` ----------------------------------------------------------------


@pytest.fixture(scope="module")
def served(embedded_dir, tmp_path_factory):
    with served_locally(embedded_dir, tmp_path_factory) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def client(served) -> sdk.OpenAI:
    return sdk.OpenAI(base_url=served.url.removesuffix("/score") + "/v1", api_key=SECRET, max_retries=0)


@pytest.mark.model
def test_sdk_gets_the_greedy_answer_of_score(served, client):
    answer = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=24)
    contract = requests.post(
        served.url,
        headers={"Authorization": f"Bearer {SECRET}"},
        timeout=120,
        json={"input_data": {"input_string": QUESTION, "parameters": {"temperature": 0, "max_new_tokens": 24}}},
    ).json()
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == contract["output"]
    assert "Gates" in contract["output"]
    usage = answer.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert answer.choices[0].finish_reason == ("length" if usage.completion_tokens == 24 else "stop")
    short = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert (short.choices[0].finish_reason, short.usage.completion_tokens) == ("length", 3)
    assert [model.id for model in client.models.list()] == [served.model_dir.name]


@pytest.mark.model
def test_sdk_streams_the_same_answer(client):
    whole = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model="any", messages=QUESTION, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.model
def test_sdk_stop_sequence(client):
    whole = (
        client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=24).choices[0].message.content
    )
    word = whole.split()[3]
    cut = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=24, stop=[word])
    assert cut.choices[0].message.content == whole[: whole.index(word)] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="any", messages=QUESTION, temperature=0, max_tokens=24, stop=[word], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.choices[0].message.content


@pytest.mark.model
def test_sdk_bad_key_and_bad_parameter(served, client):
    with pytest.raises(sdk.AuthenticationError) as info:
        client.with_options(api_key="wrong").chat.completions.create(model="any", messages=QUESTION)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(sdk.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=QUESTION, top_p=0)
    assert info.value.body["param"] == "top_p" and "top_p must be in (0, 1]" in info.value.body["message"]
    with pytest.raises(sdk.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="any", messages=QUESTION, n=2)
    azure_style = sdk.OpenAI(base_url=client.base_url, api_key="unused", default_headers={"api-key": SECRET, "Authorization": ""})
    assert azure_style.chat.completions.create(model="any", messages=QUESTION, max_tokens=2).usage.completion_tokens == 2


@pytest.mark.model
def test_openai_body_on_the_scoring_route(served, client):
    """The scoring URI takes the OpenAI body as it is (a deployment whose gateway forwards only /score)."""
    sent = {"messages": QUESTION, "temperature": 0, "max_tokens": 24}
    answer = requests.post(served.url, json=sent, headers={"api-key": SECRET}, timeout=120).json()
    assert answer["object"] == "chat.completion"
    assert (
        answer["choices"][0]["message"]["content"]
        == client.chat.completions.create(model="any", **sent).choices[0].message.content
    )
    refused = requests.post(served.url, json={**sent, "n": 3}, headers={"api-key": SECRET}, timeout=120)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"


# --- phi3flow's own client in OpenAI's dialect (the tool, eval, connect and agents share it) ------------------


def test_client_picks_the_dialect_from_the_url():
    from types import SimpleNamespace

    from phi3flow.client import EndpointClient, EndpointError
    from phi3flow.connect import client_options

    assert (
        EndpointClient("https://x.services.ai.azure.com/openai/v1", "k").url
        == "https://x.services.ai.azure.com/openai/v1/chat/completions"
    )
    assert not EndpointClient("https://x.inference.ml.azure.com/score", "k").openai
    explicit = EndpointClient("https://x.inference.ml.azure.com/score", "k", api_format="openai")
    assert explicit.openai and explicit.url == "https://x.inference.ml.azure.com/score"  # the OpenAI body on the scoring route
    assert not EndpointClient("http://localhost:8000/v1", "k", api_format="azureml").openai
    with pytest.raises(EndpointError, match="api_format must be one of"):
        EndpointClient("http://localhost:8000/v1", "k", api_format="anthropic")
    connection = SimpleNamespace(
        configs={"endpoint": "http://h/v1", "model": "Phi-4-mini-instruct", "api_format": ""}, secrets={"key": "k"}
    )
    assert client_options(connection) == {"model": "Phi-4-mini-instruct"}


def test_connection_carries_the_dialect_and_model():
    """`phi3flow connect --api-format/--model` store them in configs; the tool, eval and agents read them back."""
    from phi3flow.client import EndpointError
    from phi3flow.connect import create_connection, read_connection

    create_connection("http://127.0.0.1:9/openai/v1", "k-123", "openai_conn", model="Phi-4-mini-instruct")
    assert read_connection("openai_conn") == ("http://127.0.0.1:9/openai/v1", "k-123", {"model": "Phi-4-mini-instruct"})
    create_connection("http://127.0.0.1:9/score", "k-123", "openai_on_score", api_format="openai")
    assert read_connection("openai_on_score")[2] == {"api_format": "openai"}
    with pytest.raises(EndpointError, match="api_format"):
        create_connection("http://127.0.0.1:9/score", "k-123", "bad", api_format="grpc")


@pytest.mark.model
def test_client_speaks_openai_to_the_v1_route(served):
    from phi3flow.client import EndpointClient, EndpointError

    base = served.url.removesuffix("/score") + "/v1"
    openai_client, contract_client = EndpointClient(base, SECRET, model="any"), EndpointClient(served.url, SECRET)
    greedy = {"temperature": 0, "max_new_tokens": 24}
    answer = openai_client.chat(QUESTION, **greedy)
    assert answer == contract_client.chat(QUESTION, **greedy) and "Gates" in answer
    assert answer == openai_client.chat(QUESTION, do_sample=False, max_new_tokens=24)
    pieces = list(openai_client.chat_stream(QUESTION, **greedy))
    assert len(pieces) > 1 and "".join(pieces) == answer
    with pytest.raises(EndpointError, match=r"refused the key \(HTTP 401\)") as info:
        EndpointClient(base, "not-the-key-123", retries=0).chat(QUESTION)
    assert "not-the-key-123" not in str(info.value)
    with pytest.raises(EndpointError, match=r"HTTP 400.*top_p must be in"):
        openai_client.chat(QUESTION, top_p=0)
    with pytest.raises(EndpointError, match="no chat completions route.*ending in /v1"):
        EndpointClient(served.url.removesuffix("/score") + "/v2/v1", SECRET).chat(QUESTION)


@pytest.mark.model
def test_comparison_puts_an_openai_endpoint_beside_a_scoring_url(served, tmp_path, monkeypatch):
    """`phi3flow eval` with the candidate given as an OpenAI base URL and the baseline as the scoring URL: the same
    model behind both dialects scores the same, line for line."""
    from phi3flow.evaluation.compare import main as evaluate

    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Who founded Microsoft?", "Bill Gates and Paul Allen."), ("What is the capital of France?", "Paris.")]
    ]
    data = tmp_path / "test_data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv("PHI3FLOW_ENDPOINT_KEY", SECRET)
    base = served.url.removesuffix("/score") + "/v1"
    assert (
        evaluate(
            [
                "--candidate",
                base,
                "--baseline",
                served.url,
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "out"),
                "--max-new-tokens",
                "24",
                "--concurrency",
                "1",
            ]
        )
        == 0
    )
    systems = json.loads((tmp_path / "out" / "metrics.json").read_text())["systems"]
    quality = [
        {name: value for name, value in systems[role]["metrics"].items() if name != "latency_s"}
        for role in ("candidate", "baseline")
    ]
    assert quality[0] == quality[1]
    assert systems["candidate"]["metrics"]["rouge_l"]["mean"] > 0
