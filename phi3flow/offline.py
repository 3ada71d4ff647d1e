"""Environment for running Prompt Flow without a network: no tracing exporter, no telemetry config fetch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

OFFLINE_ENV = {
    "PF_DISABLE_TRACING": "true",
    # azure-monitor's exporter (used by promptflow's telemetry) fetches remote settings unless told not to
    "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
}


def pf_executable() -> str:
    """The `pf` beside this Python (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("pf")
    return str(local) if local.exists() else (shutil.which("pf") or "pf")


def use_offline_defaults() -> None:
    """Apply OFFLINE_ENV to this process (before promptflow is imported) unless the user set them."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)


def offline_environment() -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV}


def stop_pf_service() -> None:
    """`pf flow test` leaves a local pf service on port 23333; stop it when we are done."""
    subprocess.run([pf_executable(), "service", "stop"], env=offline_environment(), capture_output=True, check=False)
