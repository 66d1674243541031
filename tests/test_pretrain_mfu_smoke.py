"""bench/pretrain_mfu.py runs the full pretraining step of ours and HF transformers on CPU and writes JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_mfu_smoke_measures_both_implementations_and_the_cpu_variants(tmp_path):
    out = tmp_path / "pretrain_mfu.json"
    subprocess.run(
        [sys.executable, "bench/pretrain_mfu.py", "--smoke", "--out", str(out)], cwd=ROOT, check=True, timeout=300
    )
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["fp8"].startswith("unavailable")
    records = {(r["case"], r["impl"], r["variant"]): r for r in report["records"]}
    assert set(records) == {
        (case, impl, variant)
        for case in ("tiny-dense", "tiny-moe")
        for impl, variant in (("hf-transformers", "eager"), ("ours", "eager"), ("ours", "chunked"))
    }
    for r in records.values():
        assert "error" not in r
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert math.isfinite(r["loss_step1"]) and math.isfinite(r["loss_last"])
        assert r["mfu"] is None and r["peak_mem_gb"] is None  # nothing here is GPU-measured
    for case in ("tiny-dense", "tiny-moe"):
        eager, chunked = records[case, "ours", "eager"], records[case, "ours", "chunked"]
        assert chunked["loss_impl"] == "chunked" and eager["loss_impl"] == "logits"
        assert abs(chunked["loss_step1"] - eager["loss_step1"]) < 1e-5
