"""Property-based tests over request JSON: the scoring path answers 200 or a clear 4xx, never raises."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi3serve import scoring as score
from phi3serve.contract import PARAMS, BadRequest, ChatRequest, parse_request
from phi3serve.loop import LoopEngine
from phi3serve.model import ChatModel

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant"]) | json_values
turns = st.fixed_dictionaries({"role": roles, "content": st.text(max_size=200) | json_values})
parameters = st.dictionaries(
    st.sampled_from([*PARAMS, "beams", ""]), json_values | st.floats(-10, 10) | st.integers(-5, 5000), max_size=4
)
near_valid = st.builds(
    lambda t, p, wrap: {"input_data": {"input_string": t, "parameters": p}} if wrap else {"input_string": t},
    st.lists(turns, max_size=5),
    parameters,
    st.booleans(),
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    near_valid.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_any_body_parses_or_is_a_clear_4xx(raw):
    try:
        request = parse_request(raw)
    except BadRequest as exc:
        assert 400 <= exc.status < 500 and str(exc) and "Traceback" not in str(exc)
        return
    assert isinstance(request, ChatRequest) and request.messages and request.messages[-1]["role"] == "user"
    assert all(isinstance(turn["content"], str) for turn in request.messages)
    assert 1 <= request.params.max_new_tokens <= 4096 and 0 <= request.params.temperature <= 2


@pytest.fixture(scope="module")
def live_model(embedded_dir):
    model = ChatModel.load(embedded_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(score, "_model", model)
        patch.setattr(score, "_engine", LoopEngine(model))
        yield model


short_params = st.fixed_dictionaries(
    {"max_new_tokens": st.integers(1, 3)},
    optional={
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "do_sample": st.booleans(),
        "repetition_penalty": st.floats(0.01, 10),
    },
)
conversations = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=300)}),
    min_size=1,
    max_size=6,
).map(lambda t: t + [{"role": "user", "content": "Hi"}])


@pytest.mark.model
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations, short_params, st.booleans())
def test_generation_path_never_fails(live_model, conversation, params, system):
    turns = ([{"role": "system", "content": "Be brief."}] if system else []) + conversation
    payload, status, _ = score.score(json.dumps({"input_data": {"input_string": turns, "parameters": params}}).encode())
    assert status == 200 and isinstance(payload["output"], str) or 400 <= status < 500 and payload["message"]
