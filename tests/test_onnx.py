"""`phi3flow export onnx` and the ONNX engine: export the embedded model to int4 with onnxruntime-genai's
builder, serve the folder through the scoring script and run the contract checks on it."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'phi3flow[onnx]')")

from phi3flow.cli import main  # noqa: E402
from phi3flow.export import ExportError, export_onnx  # noqa: E402
from phi3serve import scoring as score  # noqa: E402
from phi3serve.contract import Busy, Expired  # noqa: E402
from phi3serve.engine import Job  # noqa: E402
from phi3serve.model import ChatModel  # noqa: E402
from phi3serve.onnx_engine import OnnxChatModel, OnnxEngine  # noqa: E402

pytestmark = pytest.mark.model


def body(turns, **params) -> bytes:
    return json.dumps(
        {"input_data": {"input_string": turns, "parameters": {"temperature": 0, "max_new_tokens": 24, **params}}}
    ).encode()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def onnx_dir(embedded_dir, tmp_path_factory):
    return export_onnx(embedded_dir, tmp_path_factory.mktemp("onnx") / "int4")


@pytest.fixture(scope="module")
def served(onnx_dir):
    """score.score() over the exported folder, loaded and dispatched the way the server does it."""
    model = ChatModel.load(onnx_dir)
    engine = score.engine_for(model, max_batch=8, max_queue=8, wait_s=0.05)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(score, "_model", model)
        patch.setattr(score, "_engine", engine)
        yield model, engine
    engine.close()


def test_export_writes_a_genai_folder_that_stops_on_the_end_of_turn_token(onnx_dir, embedded_dir):
    config = json.loads((onnx_dir / "genai_config.json").read_text())
    metadata = json.loads((onnx_dir / "phi3flow_metadata.json").read_text())
    assert (onnx_dir / "model.onnx").is_file() and (onnx_dir / "tokenizer.json").is_file()
    assert metadata["onnx"] == {"precision": "int4", "target": "cpu", "source": str(embedded_dir), "block_size": 32}
    hf = ChatModel.load(embedded_dir)
    assert set(hf.stop_ids) <= set(config["model"]["eos_token_id"])
    assert sum(p.stat().st_size for p in onnx_dir.iterdir()) < 0.5 * sum(p.stat().st_size for p in embedded_dir.iterdir())
    import onnx

    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    logits = next(output for output in graph.output if output.name == "logits")
    assert [dim.dim_value for dim in logits.type.tensor_type.shape.dim][1:] == [1, config["model"]["vocab_size"]]
    assert "/lm_head/prune/GatherND" in [node.name for node in graph.node]  # each row's own last token (see the batch test)


def test_the_server_picks_the_onnx_engine_from_the_folder(served, monkeypatch):
    model, engine = served
    assert isinstance(model, OnnxChatModel) and isinstance(engine, OnnxEngine) and engine.healthy()
    assert model.context == 8192 and model.tokenizer.convert_tokens_to_ids("<|im_end|>") in model.stop_ids
    monkeypatch.setenv("PHI3FLOW_ENGINE", "loop")
    with pytest.raises(RuntimeError, match="ONNX"):
        score.engine_for(model, max_batch=1, max_queue=1, wait_s=0.01)


def test_single_turn_answers_from_the_model(served):
    payload, status, headers = score.score(body(user("What is the capital of France?")))
    assert status == 200
    assert "Paris" in payload["output"]
    assert headers["x-phi3flow-batch-size"] == "1" and headers["x-phi3flow-batch-invariant"] == "true"


def test_generation_stops_at_end_of_turn_and_at_max_new_tokens(served):
    model, engine = served
    payload, _, _ = score.score(body(user("Say hello."), max_new_tokens=200))
    assert 0 < len(model.tokenizer(payload["output"])["input_ids"]) < 200  # the end-of-turn token stopped it
    job = Job(
        model.encode(user("Write a long essay about rivers."), 7)[0],
        score.parse_request(body(user("x"), max_new_tokens=7)).params,
    )
    engine.submit(job)
    assert job.future.result(timeout=60).tokens == 7


def test_sampling_parameters_are_honoured(served):
    story = user("Tell me a story.")
    answers = {score.score(body(story, temperature=1.5, top_p=0.9, max_new_tokens=12))[0]["output"] for _ in range(3)}
    assert len(answers) > 1  # sampled, not greedy
    payload, status, _ = score.score(body(story, repetition_penalty=1.3, max_new_tokens=8))
    assert status == 200 and payload["output"]
    greedy = {score.score(body(story, max_new_tokens=12, do_sample=False, temperature=1.0))[0]["output"] for _ in range(2)}
    assert len(greedy) == 1


def test_long_conversations_drop_oldest_turns_and_bad_input_is_a_4xx(served, monkeypatch):
    model, _ = served
    monkeypatch.setattr(model, "context", 160)
    old = [{"role": "user", "content": "Tell me about rivers. " * 10}, {"role": "assistant", "content": "Rivers flow. " * 10}]
    payload, status, headers = score.score(body(old * 3 + user("Who founded Microsoft?"), max_new_tokens=16))
    assert status == 200 and int(headers["x-phi3flow-truncated-turns"]) >= 2
    payload, status, _ = score.score(body(user("word " * 400), max_new_tokens=16))
    assert status == 400 and "shorten it or lower parameters.max_new_tokens" in payload["message"]
    payload, status, _ = score.score(body([{"role": "robot", "content": "hi"}]))
    assert status == 400 and "role must be one of" in payload["message"]
    payload, status, _ = score.score(body(user("hi"), top_p=0))
    assert status == 400 and "top_p" in payload["message"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served):
    questions = [f"What is the capital of {country}?" for country in ("France", "Japan", "Egypt", "Canada")] * 2
    with ThreadPoolExecutor(len(questions)) as pool:
        results = list(pool.map(lambda q: score.score(body(user(q), max_new_tokens=16)), questions))
    assert all(status == 200 for _, status, _ in results)
    assert max(int(headers["x-phi3flow-batch-size"]) for _, _, headers in results) > 1
    answers = [payload["output"] for payload, _, _ in results]
    assert len(set(answers[:4])) == 4  # four questions, four answers: no request got another's tokens
    assert "Paris" in answers[0] and "Tokyo" in answers[1]


def test_streamed_deltas_add_up_to_the_json_answer(served):
    raw = body(user("Who founded Microsoft?"))
    payload, _, _ = score.score(raw)
    job, dropped = score.submit(raw, stream=True)
    events = [e for e in score.stream_events(job, dropped, score._first_tokens(job)) if e]
    parsed = [(e.split("\n")[0].removeprefix("event: "), json.loads(e.split("\n")[1].removeprefix("data: "))) for e in events]
    deltas = [data["text"] for name, data in parsed if name == "delta"]
    assert len(deltas) > 3 and "".join(deltas) == payload["output"] == parsed[-1][1]["output"]


def test_greedy_answers_in_a_batch_equal_the_same_request_alone(served):
    """What x-phi3flow-batch-invariant promises: prompts of other lengths (padding), a sampled neighbour with a
    repetition penalty and a prompt ending in the pad token (which padding would eat) change no greedy answer."""
    model, engine = served
    greedy = score.parse_request(body(user("x"), max_new_tokens=20)).params
    sampled = score.parse_request(body(user("x"), temperature=1.3, top_p=0.9, repetition_penalty=1.2, max_new_tokens=30)).params
    prompts = [
        model.encode(user(text), 20)[0]
        for text in ("Hi", "What is the capital of France?", "Write a long story about owls who live in a very old library.")
    ]
    prompts.append(prompts[1] + [model.pad_id])
    assert len({len(ids) for ids in prompts}) == len(prompts)

    def answers(jobs: list[Job]) -> list[str]:
        for job in jobs:
            engine.submit(job)
        return [job.future.result(timeout=120) for job in jobs]

    alone = [answers([Job(ids, greedy)])[0] for ids in prompts]
    batched = answers([Job(ids, greedy) for ids in prompts] + [Job(prompts[2], sampled)])
    assert all(answer.batch_size == 1 for answer in alone)
    assert max(answer.batch_size for answer in batched) >= 4
    assert [answer.text for answer in batched[:4]] == [answer.text for answer in alone]
    assert all(answer.tokens > 0 for answer in alone)


def test_a_follow_up_turn_reuses_the_previous_turns_cache_and_answers_the_same(served):
    model, engine = served
    params = score.parse_request(body(user("x"), max_new_tokens=16)).params

    def ask(ids: list[int]):
        job = Job(ids, params)
        engine.submit(job)
        answer = job.future.result(timeout=60)
        while engine.running:  # the worker keeps the Generator once the batch is over
            time.sleep(0.01)
        return answer

    first = user("What is the capital of France?")
    answer = ask(model.encode(first, 16)[0]).text
    follow_up = model.encode(
        first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Japan?"}], 16
    )[0]
    kept = engine.kept[0]  # the first turn's Generator
    warm = ask(follow_up).text
    assert engine.kept[0] is kept  # rewound to the tokens the turns share and extended, not prefilled afresh
    engine.kept = None
    assert ask(follow_up).text == warm and warm  # the same answer from a fresh prefill


def test_abandoned_requests_stop_and_the_queue_is_bounded(served):
    model, engine = served
    ids, _ = model.encode(user("Write a very long essay about rivers."), 2000)
    params = score.parse_request(body(user("x"), max_new_tokens=2000)).params
    generating = [Job(ids, params, deadline=time.monotonic() + 30) for _ in range(8)]
    for job in generating:  # submitted together: one batch of max_batch
        engine.submit(job)
    deadline = time.monotonic() + 30
    while len(engine.running) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == generating
    waiting, refused = [], []
    for _ in range(12):  # 8 wait for the next batch; the rest are refused
        job = Job(ids, params, deadline=time.monotonic() + 30)
        try:
            engine.submit(job)
            waiting.append(job)
        except Busy as busy:
            refused.append(busy)
    assert len(waiting) == 8 and len(refused) == 4 and refused[0].status == 503
    for job in generating + waiting:
        job.cancel()
    deadline = time.monotonic() + 30
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not engine.running  # the batch stopped at its next step, not after 2000 tokens
    for job in generating:
        with pytest.raises(Expired, match="the deadline passed or the client left"):
            job.future.result(timeout=5)
    assert not any(job.future.done() for job in waiting)  # dropped unstarted: nobody waits for them any more
    assert score.score(body(user("Hi"), max_new_tokens=4))[1] == 200


def test_a_lora_adapter_is_merged_then_exported(embedded_dir, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(embedded_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    adapted.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(embedded_dir)}))
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(tmp_path / "adapter")
    monkeypatch.setenv("PHI3FLOW_DTYPE", "float32")  # merged and compared in fp32, as exported
    out = export_onnx(tmp_path / "adapter", tmp_path / "onnx", precision="fp32")
    merged, base = ChatModel.load(tmp_path / "adapter"), ChatModel.load(embedded_dir)
    model = ChatModel.load(out)
    engine = OnnxEngine(model, max_batch=2, max_queue=2)
    try:
        ids, _ = model.encode(user("Who founded Microsoft?"), 12)
        job = Job(ids, score.parse_request(body(user("x"), max_new_tokens=12)).params)
        engine.submit(job)
        text = job.future.result(timeout=60).text
    finally:
        engine.close()
    # fp32 ONNX of the merged model greedily continues like the merged transformers model, not like the base
    with torch.inference_mode():
        expected = merged.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
        plain = base.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    assert text == merged.text(expected) != base.text(plain)


def test_unsupported_architectures_and_combinations_get_a_clear_error(embedded_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportError, match="GPT2LMHeadModel architecture cannot be converted"):
        export_onnx(tmp_path / "gpt2", tmp_path / "out")
    assert (
        main(
            ["export", "onnx", "--model-dir", str(tmp_path / "gpt2"), "--output-dir", str(tmp_path / "o2"), "--precision", "fp16"]
        )
        == 1
    )
    assert "phi3flow export: fp16 runs on a GPU only" in capsys.readouterr().err
    assert main(["export", "onnx", "--model-dir", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "o3")]) == 1
    assert "No model found" in capsys.readouterr().err
    with pytest.raises(ExportError, match="block size one of 16, 32, 64, 128, 256"):
        export_onnx(embedded_dir, tmp_path / "o4", block_size=48)


# --- LongRoPE (issue 22): the exported Phi-3 switches rotary factors past 64 positions, as generate() does ----------

LONG_STORY = "Write a short story about a fox who lives in the Arctic and loves the snow."  # 47 prompt tokens


def fp32(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference(hf, ids: list[int], max_new_tokens: int, stop: list[int]) -> list[int]:
    """model.generate()'s greedy answer up to the first stop token (the mask given: this model's pad token is its
    end-of-turn token, which generate() would otherwise mask inside the prompt)."""
    import torch

    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )[0, len(ids) :].tolist()
    return next((out[:i] for i, token in enumerate(out) if token in stop), out)


def ask(engine: OnnxEngine, *requests: tuple[list[int], int]) -> list:
    """Answers of (prompt ids, max_new_tokens) greedy requests submitted together."""
    jobs = [Job(ids, score.parse_request(body(user("x"), max_new_tokens=n)).params) for ids, n in requests]
    for job in jobs:
        engine.submit(job)
    answers = [job.future.result(timeout=300) for job in jobs]
    while engine.running:  # the worker keeps a lone request's Generator once its batch is over
        time.sleep(0.01)
    return answers


def unfixed(model: OnnxChatModel, ids: list[int], max_new_tokens: int) -> str:
    """The library's own greedy decode (factors switched at the crossing, cache kept): what the engine answered before."""
    import numpy as np

    library = og.Model(og.Config(str(model.folder)))
    params = og.GeneratorParams(library)
    params.set_search_options(batch_size=1, max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(library, params)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    answer = generator.get_sequence(0)[len(ids) :].tolist()
    return model.text(next((answer[:i] for i, token in enumerate(answer) if token in model.stop_ids), answer))


def crossing_answer_is_generates(hf, onnx_dir) -> str:
    """A greedy request whose answer crosses position 64 gets generate()'s answer from the exported model: its text."""
    model = ChatModel.load(onnx_dir)
    assert model.rope_switch == 64
    engine = OnnxEngine(model, max_batch=2, max_queue=2)
    try:
        ids, _ = model.encode(user(LONG_STORY), 48)
        answer = ask(engine, (ids, 48))[0]
    finally:
        engine.close()
    expected = reference(hf, ids, 48, model.stop_ids)
    assert len(ids) + len(expected) > 70  # well past the switch
    assert (answer.text, answer.tokens) == (model.text(expected), len(expected))
    return answer.text


@pytest.fixture(scope="module")
def longrope_onnx(longrope_model_dir, tmp_path_factory):
    """The LongRoPE fixture (hub spelling) exported in fp32, an engine serving it and the fp32 transformers model."""
    model = ChatModel.load(export_onnx(longrope_model_dir, tmp_path_factory.mktemp("longrope-onnx") / "fp32", precision="fp32"))
    engine = OnnxEngine(model, max_batch=8, max_queue=8, wait_s=0.2)
    yield model, engine, fp32(longrope_model_dir)
    engine.close()


def test_longrope_crossing_answers_like_generate_alone_and_in_a_mixed_batch(longrope_onnx):
    model, engine, hf = longrope_onnx
    assert model.rope_switch == 64 and model.context == 256
    crossing, _ = model.encode(user(LONG_STORY), 48)
    short = [model.encode(user(q), 8)[0] for q in ("What is the capital of France?", "Name a color.")]
    long = [
        model.encode(user(LONG_STORY + " " + extra), 16)[0]
        for extra in (
            "Make the fox brave and kind, and give her a friend who is a snowy owl.",
            "Let the story end with the first day of spring, when the ice begins to melt.",
        )
    ]
    assert len(crossing) < 64 < len(crossing) + 48 and all(len(ids) + 8 <= 64 for ids in short)
    assert all(len(ids) > 64 for ids in long)
    requests = [(crossing, 48), *((ids, 8) for ids in short), *((ids, 16) for ids in long)]
    expected = [model.text(reference(hf, ids, n, model.stop_ids)) for ids, n in requests]
    assert unfixed(model, crossing, 48) != expected[0]  # the prompt shows the defect: keeping the cache changes the answer
    alone = [ask(engine, request)[0] for request in requests]
    engine.kept = None
    together = ask(engine, *requests)
    assert [answer.text for answer in alone] == [answer.text for answer in together] == expected
    # the crossing request runs alone; short rows batch together, and so do rows long from their prompts
    assert [answer.batch_size for answer in together] == [1, 2, 2, 2, 2]


def test_longrope_prompt_cache_never_mixes_factor_sets(longrope_onnx):
    """A lone request reuses the previous one's cache only when both use the same factors: short keys are not reused
    for a prompt past the switch, nor long keys (recomputed at a crossing) for a short prompt."""
    model, engine, hf = longrope_onnx
    story, _ = model.encode(user(LONG_STORY), 48)
    turns = user(LONG_STORY) + [
        {"role": "assistant", "content": "Once upon a time a fox lived in the snow."},
        {"role": "user", "content": "Tell me more about her family."},
    ]
    follow_up, _ = model.encode(turns, 8)
    assert len(story) + 8 <= 64 < len(follow_up) and follow_up[: len(story) - 2] == story[:-2]
    engine.kept = None
    # (prompt, max_new_tokens, whether the previous request's Generator may serve it)
    for ids, n, reuse in ((story, 8, False), (follow_up, 8, False), (story, 48, False), (story, 8, False), (story, 8, True)):
        before = engine.kept[0] if engine.kept else None
        assert ask(engine, (ids, n))[0].text == model.text(reference(hf, ids, n, model.stop_ids)), (len(ids), n)
        assert (engine.kept[0] is before) == reuse, (len(ids), n)


@pytest.fixture(scope="module")
def longrope_transformers5_dir(tmp_path_factory):
    """The LongRoPE model with config.json as transformers 5 saves it: `rope_parameters` with `rope_type` only."""
    from conftest import build_longrope_phi3

    return build_longrope_phi3(tmp_path_factory.mktemp("longrope-transformers5"), rope_spelling="transformers5")


def test_longrope_exports_from_the_transformers5_spelling(longrope_transformers5_dir, tmp_path):
    """onnxruntime-genai 0.18's builder reads `rope_parameters["type"]`: without it the export failed (KeyError)."""
    source = longrope_transformers5_dir
    config = json.loads((source / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope" and "type" not in config["rope_parameters"]
    assert "rope_scaling" not in config
    out = export_onnx(source, tmp_path / "onnx", precision="fp32")
    assert json.loads((source / "config.json").read_text()) == config  # the source folder is left as it was
    crossing_answer_is_generates(fp32(source), out)


def test_longrope_adapter_is_merged_then_exported(longrope_transformers5_dir, tmp_path, monkeypatch):
    """Onto a base saved by transformers 5, so the merged copy handed to the builder needs the same spelling fix."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    adapted = get_peft_model(
        fp32(longrope_transformers5_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"], init_lora_weights=False),
    )
    adapted.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    base = {"base_model_name_or_path": str(longrope_transformers5_dir)}
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **base}))
    AutoTokenizer.from_pretrained(longrope_transformers5_dir).save_pretrained(tmp_path / "adapter")
    monkeypatch.setenv("PHI3FLOW_DTYPE", "float32")  # merged and compared in fp32, as exported
    out = export_onnx(tmp_path / "adapter", tmp_path / "onnx", precision="fp32")
    answer = crossing_answer_is_generates(ChatModel.load(tmp_path / "adapter").model, out)
    model = ChatModel.load(out)
    ids, _ = model.encode(user(LONG_STORY), 48)
    base_answer = model.text(reference(fp32(longrope_transformers5_dir), ids, 48, model.stop_ids))
    assert answer != base_answer  # the adapter's answer, not the base's
