"""Run `python -m pipeline` as a user would: a subprocess in its own working directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def pipeline(workdir: Path, *words: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *words],
        cwd=workdir,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_lines(stdout: str) -> dict[str, str]:
    """{stage: "done" | "cached"} from the run's console output."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("data", "pretrain", "sft", "dpo", "quantize", "serve"):
            if parts[1] in ("done", "cached"):
                out[parts[0]] = parts[1]
    return out


# the data stage alone, on a text model with the generated arithmetic source only: the cheapest
# real run that still logs a parent run and a nested stage run with metrics
DATA_ONLY = [
    "stages=[data]",
    "model=tiny_moe",
    "data.sources=[{name:arithmetic,kind:arithmetic,weight:1.0}]",
    "data.max_documents=100",
    "data.arithmetic_documents=100",
    "data.sft_examples=40",
    "data.preference_pairs=40",
    "data.rlvr_prompts=40",
    "data.eval_tasks=20",
]
