"""bench/model_step.py runs ours and HF transformers side by side and writes JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_step_smoke_writes_both_implementations(tmp_path):
    out = tmp_path / "model_step.json"
    subprocess.run(
        [sys.executable, "bench/model_step.py", "--smoke", "--out", str(out)], cwd=ROOT, check=True, timeout=300
    )
    report = json.loads(out.read_text())
    impls = {(r["case"], r["impl"]) for r in report["records"]}
    assert impls == {
        ("tiny-dense", "ours"),
        ("tiny-dense", "hf-transformers"),
        ("tiny-moe", "ours"),
        ("tiny-moe", "hf-transformers"),
    }
    assert all(r["tokens_per_s"] > 0 for r in report["records"])
