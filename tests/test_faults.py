"""Faults: a restart during a batch run, a burst of 429s, interrupted and resumed evaluations and trainings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transformers import TrainerCallback

from conftest import PHI3_TARGETS, SECRET, Reply, ScriptedEndpoint, small_config
from phi3flow.client import EndpointClient, EndpointError
from phi3flow.evaluation.compare import main as evaluate


def test_restart_during_batch_run_is_recorded_then_resumed(tmp_path, monkeypatch):
    data = _data(tmp_path, 4)
    monkeypatch.setenv("PHI3FLOW_ENDPOINT_KEY", SECRET)
    server = ScriptedEndpoint()
    port = server.server.server_address[1]
    # line 3 is slow: the endpoint goes down while it is being answered, so line 4 finds nobody listening
    server.script = [
        Reply(body={"output": "a"}),
        Reply(body={"output": "a"}),
        Reply(body={"output": "a"}, delay=2.0),
        Reply(body={"output": "a"}),
    ]

    def go_down_mid_run() -> None:
        while len(server.requests) < 3:
            time.sleep(0.01)
        server.close()

    threading.Thread(target=go_down_mid_run, daemon=True).start()
    args = ["--candidate", server.url, "--data", str(data), "--output-dir", str(tmp_path / "out"), "--concurrency", "1"]
    assert evaluate(args) == 1  # failed lines make the run exit non-zero
    records = _stored(tmp_path / "out")
    failed = [r for r in records if r["error"]]
    assert len(records) == 4 and [r["index"] for r in failed] == [3] and "cannot reach" in failed[0]["error"]

    restarted = ScriptedEndpoint(port=port)  # the endpoint is back
    try:
        assert evaluate([*args, "--resume"]) == 0
        assert restarted.questions == ["q3"]  # only the failed line was asked again
    finally:
        restarted.close()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["systems"]["candidate"]
    assert metrics["succeeded"] == 4 and metrics["failed"] == 0


@pytest.mark.parametrize("retries", [2, 3])
def test_burst_of_429s_backs_off_without_a_retry_storm(endpoint, retries):
    endpoint.script = [Reply(429, {"message": "throttled"})]
    clients = 8
    client = EndpointClient(endpoint.url, SECRET, retries=retries, backoff_factor=0.2, max_backoff=2.0)
    started = time.monotonic()

    def call(_: int) -> str:
        with pytest.raises(EndpointError, match="HTTP 429"):
            client.chat([{"role": "user", "content": "hi"}])
        return "refused"

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, range(clients)))
    assert len(endpoint.requests) == clients * (retries + 1)  # bounded: no client retries more than it may
    arrivals = [t - started for t in endpoint.times]
    late = [t for t in arrivals if t > 0.3]
    assert len(late) >= clients  # later attempts waited for exponential backoff, not hammered at once
    assert len({round(t, 2) for t in late}) > clients // 2  # jitter spreads the retries out


# --- nothing lost on interrupt or resume (phi3flow eval) ---------------------------------------------------


def _data(tmp_path, lines: int):
    rows = [
        {
            "prompt": f"q{i}",
            "prompt_id": str(i),
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
        }
        for i in range(lines)
    ]
    data = tmp_path / "test_data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def _stored(out) -> list[dict]:
    return [json.loads(line) for line in (out / "candidate.predictions.jsonl").read_text().splitlines()]


def test_resume_with_a_smaller_limit_keeps_every_stored_answer(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PHI3FLOW_ENDPOINT_KEY", SECRET)
    args = ["--candidate", endpoint.url, "--data", str(_data(tmp_path, 6)), "--output-dir", str(tmp_path / "out")]
    assert evaluate(args) == 0
    assert evaluate([*args, "--resume", "--limit", "2"]) == 0
    assert len(endpoint.requests) == 6  # nothing asked again
    assert [r["index"] for r in _stored(tmp_path / "out")] == list(range(6))


def test_resume_after_a_torn_last_line_asks_only_for_that_line(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PHI3FLOW_ENDPOINT_KEY", SECRET)
    out = tmp_path / "out"
    args = ["--candidate", endpoint.url, "--data", str(_data(tmp_path, 4)), "--output-dir", str(out)]
    assert evaluate(args) == 0
    predictions = out / "candidate.predictions.jsonl"
    whole = predictions.read_text()
    predictions.write_text(whole[: whole.rindex("\n", 0, -1) + 1] + whole.splitlines()[-1][:25])  # killed mid-write of line 4
    assert evaluate([*args, "--resume"]) == 0
    assert endpoint.questions[4:] == ["q3"]
    assert [r["index"] for r in _stored(out)] == [0, 1, 2, 3]
    assert evaluate([*args, "--resume"]) == 0 and len(endpoint.requests) == 5  # and the next resume finds a clean file


def test_final_rewrite_is_atomic(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PHI3FLOW_ENDPOINT_KEY", SECRET)
    out = tmp_path / "out"
    args = ["--candidate", endpoint.url, "--data", str(_data(tmp_path, 3)), "--output-dir", str(out)]
    assert evaluate(args) == 0
    before = (out / "candidate.predictions.jsonl").read_text()

    def killed(_fd):
        raise KeyboardInterrupt  # the process dies while the rewrite is on its way to the disk

    monkeypatch.setattr("os.fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        from phi3flow.evaluation.predict import _write_predictions

        _write_predictions(out / "candidate.predictions.jsonl", {})
    assert (out / "candidate.predictions.jsonl").read_text() == before


def test_ctrl_c_stops_at_once_sends_nothing_more_and_keeps_the_answers(tmp_path):
    server = ScriptedEndpoint()
    server.script = [Reply(body={"output": "a"})] * 4 + [Reply(body={"output": "a"}, delay=120.0)]  # then the endpoint stalls
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "phi3flow.cli",
        "eval",
        "--candidate",
        server.url,
        "--data",
        str(_data(tmp_path, 40)),
        "--output-dir",
        str(out),
        "--concurrency",
        "2",
    ]
    try:
        process = subprocess.Popen(
            command, env={**os.environ, "PHI3FLOW_ENDPOINT_KEY": SECRET}, stderr=subprocess.PIPE, text=True
        )
        while len(server.requests) < 6:  # 4 answered, 2 waiting for the stalled endpoint
            assert process.poll() is None
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)  # it does not wait for the two answers in flight (120 s away)
        asked = server.questions
    finally:
        server.close()
    assert process.returncode == 130 and "--resume" in stderr
    assert len(asked) == 6  # nothing sent after Ctrl+C
    kept = _stored(out)
    assert len(kept) == 4 and {r["question"] for r in kept} < set(asked) and all(r["prediction"] == "a" for r in kept)


# --- finetune --resume after a kill while saving a checkpoint ---------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("cut", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_finetune_resume_falls_back_to_the_newest_intact_checkpoint(cut, tmp_path, sample_files, tiny_phi3_dir):
    from phi3flow.finetune import train

    cfg = small_config(tmp_path, sample_files, model=str(tiny_phi3_dir), target_modules=PHI3_TARGETS, max_steps=3, save_steps=1)
    train.train(train.prepare(cfg))
    checkpoints = Path(cfg.output_dir) / train.CHECKPOINT_DIR
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    half = checkpoints / "checkpoint-3" / cut  # killed while writing this file
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])

    resumed = train.prepare(
        small_config(tmp_path, sample_files, model=str(tiny_phi3_dir), target_modules=PHI3_TARGETS, max_steps=4, save_steps=1)
    )
    steps = []
    resumed.trainer.add_callback(
        type(
            "Steps", (TrainerCallback,), {"on_step_end": lambda self, args, state, control, **kw: steps.append(state.global_step)}
        )()
    )
    train.train(resumed, resume=True)
    assert steps == [3, 4]  # from checkpoint-2, the newest whole one
