"""Faults on the way to the endpoint: a restart during a batch run, a burst of 429s."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import SECRET, Reply, ScriptedEndpoint
from phi3flow.client import EndpointClient, EndpointError
from phi3flow.evaluation.compare import main as evaluate


def test_restart_during_batch_run_is_recorded_then_resumed(tmp_path, monkeypatch):
    rows = [{"prompt": f"q{i}", "prompt_id": str(i), "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(4)]
    data = tmp_path / "test_data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv("PHI3FLOW_ENDPOINT_KEY", SECRET)
    server = ScriptedEndpoint()
    port = server.server.server_address[1]
    # line 3 is slow: the endpoint goes down while it is being answered, so line 4 finds nobody listening
    server.script = [Reply(body={"output": "a"}), Reply(body={"output": "a"}), Reply(body={"output": "a"}, delay=2.0), Reply(body={"output": "a"})]

    def go_down_mid_run() -> None:
        while len(server.requests) < 3:
            time.sleep(0.01)
        server.close()

    threading.Thread(target=go_down_mid_run, daemon=True).start()
    args = ["--candidate", server.url, "--data", str(data), "--out", str(tmp_path / "out"), "--concurrency", "1"]
    assert evaluate(args) == 1  # failed lines make the run exit non-zero
    records = [json.loads(line) for line in (tmp_path / "out" / "candidate.predictions.jsonl").read_text().splitlines()]
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
