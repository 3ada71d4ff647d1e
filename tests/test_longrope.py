"""LongRoPE (Phi-3.5-mini, Phi-4-mini): every engine gives `generate()`'s greedy answer for a request whose prompt +
answer crosses the model's original context, alone and beside requests of any length; long prompts are prefilled
in chunks that change no answer; an answer cut by max_new_tokens never ends in half a character.

The model is the `longrope_model_dir` fixture: real weights (answers are words), factors switching at position 64.
fp32 on the CPU, where batched greedy decoding is batch-invariant, so answers must match token for token.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import LONGROPE_ORIGINAL
from phi3serve.contract import parse_request
from phi3serve.engine import Job
from phi3serve.loop import Decoder, LoopEngine
from phi3serve.model import ChatModel
from phi3serve.settings import ENV

pytestmark = pytest.mark.model

CROSSING = "Write a short story about a lonely fox lost in the Arctic snow."  # 44-token prompt, 48-token answer
LONG = (
    "Tell me everything you know about the history of the Roman Empire, its emperors, its wars, its roads, its culture, "
    "its fall, and what it left behind for modern Europe and the world today."
)  # 71 tokens: long factors throughout
SHORT = ["What is the capital of France?", "Name three colours.", "Say hello."]  # answers within 64 tokens


def body(question: str, max_new_tokens: int) -> bytes:
    return json.dumps(
        {
            "input_data": {
                "input_string": [{"role": "user", "content": question}],
                "parameters": {"temperature": 0, "max_new_tokens": max_new_tokens},
            }
        }
    ).encode()


def job(model: ChatModel, question: str, max_new_tokens: int) -> Job:
    request = parse_request(body(question, max_new_tokens))
    return Job(model.encode(request.messages, max_new_tokens)[0], request.params)


@pytest.fixture(scope="module")
def chat(longrope_model_dir: Path, monkeypatch_module) -> ChatModel:
    monkeypatch_module.setenv(ENV["dtype"], "float32")
    return ChatModel.load(longrope_model_dir)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def reference(longrope_model_dir: Path):
    """A separate copy of the model, untouched by any engine: what transformers itself answers."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(longrope_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def expected(reference, chat: ChatModel) -> dict[str, str]:
    """generate()'s answer to each question of these tests."""
    return {q: generated(reference, chat, q, n) for q, n in [(CROSSING, 48), (LONG, 24)] + [(s, 16) for s in SHORT]}


def generated(reference, chat: ChatModel, question: str, max_new_tokens: int) -> str:
    ids = job(chat, question, max_new_tokens).ids
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=chat.stop_ids,
            pad_token_id=chat.pad_id,
        )
    return chat.text(out[0, len(ids) :].tolist())


def answers(engine, chat: ChatModel, requests: list[tuple[str, int]], gap_s: float = 0.0) -> list[str]:
    """Submit every request to the engine (`gap_s` apart, so later ones join a running batch); their answers."""
    jobs = []
    for question, max_new_tokens in requests:
        jobs.append(job(chat, question, max_new_tokens))
        engine.submit(jobs[-1])
        time.sleep(gap_s)
    return [j.future.result(timeout=300).text for j in jobs]


def test_the_fixture_crosses_the_switch_and_generate_answers_in_words(chat, expected):
    """The test is able to fail: the crossing request really passes position 64, the long one starts past it, and
    the reference answer is text (a model repeating one token would hide rotary bugs)."""
    assert len(job(chat, CROSSING, 48).ids) < LONGROPE_ORIGINAL < len(job(chat, CROSSING, 48).ids) + 48
    assert len(job(chat, LONG, 24).ids) > LONGROPE_ORIGINAL
    assert len(set(expected[CROSSING].split())) > 15, expected[CROSSING]


def test_the_decode_loop_answers_as_generate_across_the_switch_alone_and_in_any_batch(chat, expected):
    engine = LoopEngine(chat, max_batch=8)
    try:
        assert answers(engine, chat, [(CROSSING, 48)]) == [expected[CROSSING]]
        mixed = [(LONG, 24), (CROSSING, 48)] + [(s, 16) for s in SHORT]
        assert answers(engine, chat, mixed) == [expected[q] for q, _ in mixed]  # prefilled together
        assert answers(engine, chat, mixed[::-1], gap_s=0.3) == [expected[q] for q, _ in mixed[::-1]]  # joining
    finally:
        engine.close()


def test_the_continuous_batching_engine_answers_as_generate_across_the_switch(chat, expected):
    """transformers' continuous batching (the CUDA engine) run on the CPU: requests that may pass the switch are
    decoded by the loop, the rest stay within short factors; every answer is generate()'s, alone and mixed."""
    from phi3serve.continuous import ContinuousEngine

    engine = ContinuousEngine(chat, max_batch=4, max_queue=8, fallback=LoopEngine(chat, max_batch=4), warmup=False)
    try:
        assert answers(engine, chat, [(CROSSING, 48)]) == [expected[CROSSING]]
        mixed = [(LONG, 24), (CROSSING, 48)] + [(s, 16) for s in SHORT]
        assert answers(engine, chat, mixed, gap_s=0.1) == [expected[q] for q, _ in mixed]
    finally:
        engine.close()


def test_a_chunked_prefill_answers_as_an_unchunked_one(chat, expected):
    """Chunks of 16 tokens: the long prompt's first chunks lie before position 64 yet take the long factors its whole
    length calls for; the answers equal generate()'s, beside a short request decoding meanwhile."""
    decoder = Decoder(chat, chunk=16)
    jobs = [job(chat, LONG, 24), job(chat, SHORT[0], 16), job(chat, CROSSING, 48)]
    done = {id(j): decoder_answer for j, decoder_answer in decoder.decode(jobs)}
    got = [chat.text(done[id(j)]) for j in jobs]
    assert got == [expected[LONG], expected[SHORT[0]], expected[CROSSING]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_both_engines_answer_as_generate_across_the_switch(longrope_model_dir, monkeypatch):
    """On a GPU (fp32, so answers can be compared token for token): the loop and continuous batching engines."""
    from transformers import AutoModelForCausalLM

    from phi3serve.continuous import ContinuousEngine

    monkeypatch.setenv(ENV["dtype"], "float32")
    model = ChatModel.load(longrope_model_dir)
    assert model.device.type == "cuda"
    reference = AutoModelForCausalLM.from_pretrained(longrope_model_dir, dtype=torch.float32).to("cuda").eval()

    def expected(question: str, n: int) -> str:
        ids = job(model, question, n).ids
        out = reference.generate(
            torch.tensor([ids], device="cuda"),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=model.stop_ids,
            pad_token_id=model.pad_id,
        )
        return model.text(out[0, len(ids) :].tolist())

    mixed = [(LONG, 24), (CROSSING, 48), (SHORT[0], 16)]
    loop = LoopEngine(model, max_batch=4)
    engine = ContinuousEngine(model, max_batch=4, max_queue=8, fallback=loop)
    try:
        want = [expected(q, n) for q, n in mixed]
        assert answers(loop, model, mixed) == want
        assert answers(engine, model, mixed) == want
    finally:
        engine.close()
