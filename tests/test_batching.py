"""Batching on a real `phi3flow serve` server (azmlinfsrv + score.py, the embedded model): concurrent requests are
decoded together, and greedy answers do not depend on it where the server says so (float32 on a CPU), so an
evaluation gives the same predictions at any --concurrency and against itself."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import SECRET
from phi3flow.connect import create_connection
from phi3flow.data.sample import sample_split
from phi3flow.evaluation import compare
from phi3flow.offline import stop_pf_service
from phi3flow.serve import LocalEndpoint
from phi3serve.contract import BATCH_SIZE_HEADER

pytestmark = [pytest.mark.e2e, pytest.mark.model]
# float32 on a CPU: batch-invariant greedy decoding. A generous generation deadline: on a busy machine the default
# (90 s) would cut answers short under load, which is not what these tests are about.
FP32 = {"PHI3FLOW_DTYPE": "float32", "PHI3FLOW_REQUEST_TIMEOUT_S": "900"}
CLIENTS = 8


def ask_together(url: str, questions: list[str], max_new_tokens: int) -> list[requests.Response]:
    """Every question at once, one connection each, greedy."""

    def post(question: str) -> requests.Response:
        body = {
            "input_data": {
                "input_string": [{"role": "user", "content": question}],
                "parameters": {"temperature": 0, "max_new_tokens": max_new_tokens},
            }
        }
        return requests.post(url, json=body, headers={"Authorization": f"Bearer {SECRET}"}, timeout=300)

    with ThreadPoolExecutor(len(questions)) as pool:
        responses = list(pool.map(post, questions))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return responses


def batch_sizes(responses: list[requests.Response]) -> list[int]:
    """The x-phi3flow-batch-size header of each answer: the most sequences decoded together while it was generated."""
    assert all(BATCH_SIZE_HEADER in r.headers for r in responses), "the server sends no batch size header"
    return [int(r.headers[BATCH_SIZE_HEADER]) for r in responses]


@pytest.fixture(scope="module")
def fp32_server(embedded_dir, tmp_path_factory):
    with LocalEndpoint(embedded_dir, key=SECRET, log_file=tmp_path_factory.mktemp("fp32") / "server.log", env=FP32) as endpoint:
        yield endpoint


def test_concurrent_requests_are_decoded_together(fp32_server):
    """Fails when batching stops happening (PHI3FLOW_MAX_BATCH=1, a broken batcher): answers report batch size 1."""
    questions = [f"Write one sentence about the number {n}." for n in range(CLIENTS)]
    sizes = batch_sizes(ask_together(fp32_server.url, questions, max_new_tokens=24))
    assert max(sizes) > 1, sizes
    assert sum(size > 1 for size in sizes) >= CLIENTS // 2, sizes  # most answers shared their decode steps
    assert max(sizes) <= CLIENTS


def test_batch_size_one_is_reported_as_such(embedded_dir, tmp_path):
    """The header tells the truth: with batching turned off the same load reports batch size 1 on every answer."""
    env = {**FP32, "PHI3FLOW_MAX_BATCH": "1"}
    with LocalEndpoint(embedded_dir, key=SECRET, log_file=tmp_path / "server.log", threads=4, env=env) as endpoint:
        sizes = batch_sizes(ask_together(endpoint.url, [f"Count to {n}." for n in range(3, 7)], max_new_tokens=8))
    assert sizes == [1] * 4


def test_greedy_eval_is_reproducible_at_any_concurrency_and_against_itself(fp32_server, tmp_path: Path):
    """The same endpoint evaluated at --concurrency 1 and 8, and against itself through two connections: identical
    predictions on every line, and the report records the settings and the server's guarantee."""
    _, test = sample_split(size=60, seed=42)
    data = tmp_path / "test_data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in test[:12]), encoding="utf-8")
    create_connection(fp32_server.url, SECRET, "same_a")
    create_connection(fp32_server.url, SECRET, "same_b")
    try:
        runs = {f"c{c}": ["--candidate", "same_a", "--concurrency", str(c)] for c in (1, CLIENTS)}
        runs["itself"] = ["--candidate", "same_a", "--baseline", "same_b", "--concurrency", str(CLIENTS)]
        for name, argv in runs.items():
            assert compare.main([*argv, "--data", str(data), "--output-dir", str(tmp_path / name), "--max-new-tokens", "48"]) == 0
    finally:
        stop_pf_service()

    def predictions(run: str, connection: str) -> list[str]:
        lines = (tmp_path / run / f"{connection}.predictions.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["prediction"] for line in lines]

    answers = predictions("c1", "same_a")
    assert len(answers) == 12 and all(answers)
    assert predictions(f"c{CLIENTS}", "same_a") == answers
    assert predictions("itself", "same_a") == predictions("itself", "same_b") == answers
    results = json.loads((tmp_path / "itself" / "metrics.json").read_text())
    assert all(
        results["comparison"][m]["mean_difference"] == 0 for m in ("exact_match", "contains_fact", "rouge_l", "corpus_bleu")
    )
    server = results["systems"]["candidate"]["server"]
    assert server["batch_invariant"] is True and server["largest_batch"] > 1, server  # batched, and still the same answers
    assert results["decoding"]["temperature"] == 0.0 and results["decoding"]["concurrency"] == CLIENTS
    assert "server guarantees greedy answers" in (tmp_path / "itself" / "report.md").read_text()
