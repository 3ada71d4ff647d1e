"""The scoring script: contract validation (no model), then real generation on the embedded model."""

from __future__ import annotations

import json

import pytest

from phi3flow.deploy import score
from phi3flow.deploy.score import BadRequest, ChatModel, find_model_folder, parse_request


def body(turns=None, **params) -> bytes:
    data = {"input_data": {"input_string": turns if turns is not None else [{"role": "user", "content": "Hi"}]}}
    if params:
        data["input_data"]["parameters"] = params
    return json.dumps(data).encode()


def test_valid_request_gets_defaults_and_params():
    request = parse_request(body(temperature=0, max_new_tokens=8, do_sample=False, top_p=0.5))
    assert request.messages == [{"role": "user", "content": "Hi"}]
    assert request.params["temperature"] == 0 and request.params["max_new_tokens"] == 8 and request.params["top_p"] == 0.5
    assert parse_request(body()).params == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 128, "repetition_penalty": 1.0}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", 'missing "input_data"'),
        (b'{"inputs": "hi"}', 'missing "input_data"'),
        (b'{"input_data": "hi"}', "input_data must be an object"),
        (body([]), "non-empty list"),
        (b'{"input_data": {"input_string": "hi"}}', "non-empty list"),
        (body(["hi"]), r"input_string\[0\] must be an object"),
        (body([{"role": "robot", "content": "hi"}]), r"input_string\[0\].role must be one of system, user, assistant"),
        (body([{"role": "user", "content": 42}]), r"input_string\[0\].content must be a string"),
        (body([{"role": "user"}]), r"content must be a string"),
        (body([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "must end with a user turn"),
        (body([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]), "system turn is only allowed first"),
        (body(temperature="hot"), "parameters.temperature must be a number"),
        (body(temperature=True), "parameters.temperature must be a number"),
        (body(temperature=-1), r"parameters.temperature must be in \[0, 2\]"),
        (body(top_p=0), r"parameters.top_p must be in \(0, 1\]"),
        (body(max_new_tokens=0), "max_new_tokens must be in"),
        (body(max_new_tokens=1.5), "must be a whole number"),
        (body(do_sample="yes"), "do_sample must be true or false"),
        (body(beams=4), "unknown parameter.*beams.*supported"),
        (b'{"input_data": {"input_string": [{"role": "user", "content": "a"}], "parameters": [1]}}', "parameters must be an object"),
        (b'{"input_data": {"input_string": [{"role": "user", "content": "a"}], "parameters": {"temperature": NaN}}}', "must be a number"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(raw, expected):
    with pytest.raises(BadRequest, match=expected) as info:
        parse_request(raw)
    assert info.value.status == 400


def test_oversize_body_is_a_413():
    with pytest.raises(BadRequest) as info:
        parse_request(b" " * (score.MAX_BODY_BYTES + 1))
    assert info.value.status == 413


def test_model_folder_is_found_in_registered_and_mlflow_layouts(tmp_path):
    (tmp_path / "model" / "data" / "model").mkdir(parents=True)
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "model" / "data" / "model" / "config.json").write_text("{}")
    assert find_model_folder(tmp_path) == tmp_path / "model" / "data" / "model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No model found"):
        find_model_folder(tmp_path / "empty")


@pytest.fixture(scope="module")
def model(embedded_dir):
    loaded = ChatModel.load(embedded_dir)
    score._model, score._batcher = loaded, score.Batcher(loaded)
    yield loaded
    score._model = score._batcher = None


def ask(turns, **params) -> tuple[dict, int, dict]:
    return score.score(body(turns, **{"temperature": 0, "max_new_tokens": 24, **params}))


@pytest.mark.model
def test_single_turn_answers_from_the_model(model):
    payload, status, _ = ask([{"role": "user", "content": "Who founded Microsoft?"}])
    assert status == 200
    assert "Gates" in payload["output"]


@pytest.mark.model
def test_multi_turn_uses_the_conversation(model):
    turns = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    payload, status, _ = ask(turns)
    assert status == 200 and "Ada" in payload["output"]


@pytest.mark.model
def test_generation_stops_at_end_of_turn(model):
    payload, _, _ = ask([{"role": "user", "content": "Say hello."}], max_new_tokens=200)
    tokens = len(model.tokenizer(payload["output"])["input_ids"])
    assert tokens < 200  # stopped by the end-of-turn token, not by the length limit
    assert set(model.stop_ids) >= {model.tokenizer.eos_token_id}


@pytest.mark.model
def test_long_conversations_drop_oldest_turns(model, monkeypatch):
    monkeypatch.setattr(model, "context", 160)
    old = [{"role": "user", "content": "Tell me about rivers. " * 10}, {"role": "assistant", "content": "Rivers flow. " * 10}]
    turns = old * 3 + [{"role": "user", "content": "Who founded Microsoft?"}]
    payload, status, headers = ask(turns, max_new_tokens=16)
    assert status == 200 and int(headers["x-phi3flow-truncated-turns"]) >= 2
    payload, status, _ = ask([{"role": "user", "content": "word " * 400}], max_new_tokens=16)
    assert status == 400 and "shorten it or lower parameters.max_new_tokens" in payload["message"]


@pytest.mark.model
def test_lora_adapter_is_loaded_and_changes_output(model, embedded_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(embedded_dir)
    config = LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    adapted = get_peft_model(base, config)
    adapted.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({**json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()), "base_model_name_or_path": str(embedded_dir)})
    )
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(tmp_path / "adapter")
    with_adapter = ChatModel.load(tmp_path / "adapter")
    from peft import PeftModel

    assert isinstance(with_adapter.model, PeftModel)
    request = parse_request(body([{"role": "user", "content": "Who founded Microsoft?"}], temperature=0, max_new_tokens=12))
    assert with_adapter.generate(request)[0] != model.generate(request)[0]


@pytest.mark.model
def test_continuous_batching_gives_each_request_its_own_answer(embedded_dir, monkeypatch):
    """Requests joining a running batch, with their own length limits, get exactly what they would alone (fp32: exact)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv(score.DTYPE_ENV, "float32")
    model = ChatModel.load(embedded_dir)
    batcher = score.Batcher(model, max_batch=4)
    countries = ["France", "Japan", "Germany", "Egypt", "Kenya", "Canada"] * 2
    requests = [parse_request(body([{"role": "user", "content": f"What is the capital of {c}?"}], temperature=0, max_new_tokens=3 + 5 * (i % 3)))
                for i, c in enumerate(countries)]
    alone = [model.generate(request)[0] for request in requests]

    def staggered(i: int) -> str:
        time.sleep(0.15 * i)  # arrive while earlier ones are mid-generation
        ids, _ = model.encode(requests[i].messages, requests[i].params["max_new_tokens"])
        return batcher.submit(ids, requests[i].params)

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(staggered, range(len(requests))))
    assert together == alone
    assert len(model.tokenizer(together[0])["input_ids"]) <= 3


@pytest.mark.model
def test_a_failing_batch_fails_every_request_in_it_and_the_batcher_goes_on(embedded_dir, monkeypatch):
    """Requests that joined a batch whose generation fails get the error instead of waiting forever."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    model = ChatModel.load(embedded_dir)
    batcher = score.Batcher(model, max_batch=4)
    request = parse_request(body([{"role": "user", "content": "Count to ten."}], temperature=0, max_new_tokens=12))
    ids, _ = model.encode(request.messages, 12)
    real_prefill, calls, joined = model._prefill, [], threading.Event()

    def failing_second_prefill(items, *args):
        calls.append(len(items))
        if len(calls) == 2:  # the joiners' prefill
            joined.set()
            raise RuntimeError("GPU fell off the bus")
        return real_prefill(items, *args)

    monkeypatch.setattr(model, "_prefill", failing_second_prefill)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.submit, ids, request.params)
        while not calls:  # the first batch has started
            time.sleep(0.001)
        second = pool.submit(batcher.submit, ids, request.params)
        assert joined.wait(30)
        for future in (first, second):
            with pytest.raises(RuntimeError, match="fell off the bus"):
                future.result(timeout=30)
    monkeypatch.setattr(model, "_prefill", real_prefill)
    assert batcher.submit(ids, request.params)  # the batcher thread survived
