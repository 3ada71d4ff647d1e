"""The GPU path end to end on a tiny random Phi-3: QLoRA (4-bit) training in each batching mode, the adapter
served through both engines on CUDA and `model.generate`. Skipped without CUDA (CI has none; run on a GPU
machine with `pytest -m gpu`). The full-size figures come from bench/gpu.py, never from a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def test_qlora_then_serving_on_cuda(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--output-dir", str(tmp_path), "--train-steps", "4", "--train-warmup", "2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "phi3-mini" / "results.json").read_text())
    for mode, trained in results["trained"].items():
        assert trained and trained["quantized_4bit"], (mode, trained)
        assert trained["peak_allocated_gib"] > 0
    served = results["served"]
    assert served["device"].startswith("cuda")
    for engine in ("loop", "continuous"):
        assert served[f"{engine}_4_tok_s"] > 0
