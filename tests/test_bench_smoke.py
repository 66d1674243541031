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


def test_data_throughput_smoke_measures_the_stage_both_packers_and_the_tokenizer(tmp_path):
    out = tmp_path / "data_throughput.json"
    subprocess.run(
        [sys.executable, "bench/data_throughput.py", "--smoke", "--out", str(out)], cwd=ROOT, check=True, timeout=300
    )
    report = json.loads(out.read_text())
    stage, pieces = report["stage"], report["pieces"]
    assert stage["cores"] >= 1 and stage["tokens_per_s_per_core"] > 0
    assert 0 < stage["packing_efficiency"] <= 1
    assert pieces["tokens"] == stage["tokens"]  # the one-core pieces ran on the stage's own documents
    packers = {(r["seq_len"], r["packer"].split(":")[0]): r for r in pieces["packing"]}
    assert set(packers) == {(seq, side) for seq in (4096, 128) for side in ("ours", "baseline")}
    assert all(r["tokens"] == pieces["tokens"] for r in packers.values())  # every token packed exactly once
    assert all(packers[seq, "ours"]["efficiency"] >= packers[seq, "baseline"]["efficiency"] for seq in (4096, 128))
    assert all(t["tokens_per_s"] > 0 for t in pieces["tokenizer"])


def test_posttrain_throughput_smoke_measures_ours_and_trl_on_the_same_tokens(tmp_path):
    out = tmp_path / "posttrain_throughput.json"
    subprocess.run(
        [sys.executable, "bench/posttrain_throughput.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    report = json.loads(out.read_text())
    assert not report["ray_imported"]
    records = {(r["measurement"], r["impl"]): r for r in report["records"] if r["case"] == "tiny_dense"}
    assert {("sft", "ours"), ("sft", "trl"), ("rlvr", "ours"), ("rlvr", "trl")} <= set(records)
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["measures"] for r in records.values())
    assert all(records["rlvr", impl]["generation_tokens_per_s"] > 0 for impl in ("ours", "trl"))
    sft_runs = [r for (measurement, _), r in records.items() if measurement == "sft"]
    # like for like: the same batches, the same non-padding tokens and assistant-only targets, the same weights
    assert len({(r["tokens"], r["tokens_all_steps"], r["supervised_tokens"]) for r in sft_runs}) == 1
    assert 0 < records["sft", "ours"]["supervised_tokens"] < records["sft", "ours"]["tokens"]
    assert abs(records["sft", "ours"]["loss_step1"] - records["sft", "trl"]["loss_step1"]) < 1e-4


def test_serve_load_smoke_measures_our_engine_and_hf_generate_on_the_same_requests(tmp_path):
    """Ours (packed weights, unpacked, with the compiled decode step, with it and prompts waiting up to 4 steps for
    each other, and read by a thread per stream) and HF generate on the same requests."""
    out = tmp_path / "serve_load.json"
    subprocess.run(
        [sys.executable, "bench/serve_load.py", "--smoke", "--compile", "--unpacked", "--thread-readers"]
        + ["--prompt-wait-steps", "4", "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    report = json.loads(out.read_text())
    records = {(r["impl"], r["streams"]): r for r in report["records"]}
    impls = ("ours", "ours-compiled", "ours-unpacked", "hf-generate", "ours-thread-readers", "ours-compiled-wait4")
    assert set(records) == {(impl, streams) for impl in impls for streams in (1, 4)}
    for streams in (1, 4):
        ours, fast, unpacked, hf, threaded, waited = (records[impl, streams] for impl in impls)
        assert len({r["requests"] for r in (ours, fast, unpacked, hf, threaded, waited)}) == 1
        assert len({r["tokens"] for r in (ours, fast, unpacked, hf, threaded, waited)}) == 1 and ours["tokens"] > 0
        # greedy on the same checkpoint: the same tokens
        assert ours["same_tokens_as_hf"] == fast["same_tokens_as_hf"] == waited["same_tokens_as_hf"] == 1.0
        assert waited["prompt_wait_steps"] == 4 and 0 < waited["compiled_steps"] <= waited["decode_steps"]
        assert all(r["tokens_per_s"] > 0 and r["ttft_ms"]["p50"] > 0 and r["tpot_ms"]["p99"] > 0 for r in (ours, hf))
        assert 0 < fast["compiled_steps"] <= fast["decode_steps"]
        assert ours["packed_layers"] == 0  # tiny-dense: no weight is large enough for packing to pay
    assert records["ours", 4]["scheduler"]["max_batch"] > 1  # concurrent streams were batched


def test_serve_load_shared_prefix_workload_reuses_the_system_prompt(tmp_path):
    """Every prompt starts with the same system prompt: our engine shares its cached blocks (and is measured
    without them too), and all three give the same greedy tokens."""
    out = tmp_path / "serve_load.json"
    cmd = [sys.executable, "bench/serve_load.py", "--smoke", "--streams", "4", "--workload", "shared-prefix"]
    subprocess.run([*cmd, "--system-tokens", "40", "--out", str(out)], cwd=ROOT, check=True, timeout=300)
    report = json.loads(out.read_text())
    records = {r["impl"]: r for r in report["records"]}
    assert set(records) == {"ours", "ours-no-prefix-cache", "hf-generate"}
    assert report["config"]["system_prompt_tokens"] == 40
    assert len({r["tokens"] for r in records.values()}) == 1 and records["ours"]["same_tokens_as_hf"] == 1.0
    # the first request computes the system prompt; the later ones share its two whole 16-token blocks
    assert records["ours"]["scheduler"]["prefix_hit_tokens"] >= (records["ours"]["requests"] - 4) * 32


def test_quant_quality_smoke_runs_the_stage_per_method_on_one_checkpoint(tmp_path):
    out = tmp_path / "quant_quality.json"
    subprocess.run(
        [sys.executable, "bench/quant_quality.py", "--smoke", "--work", str(tmp_path), "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    report = json.loads(out.read_text())
    records = {r["method"]: r for r in report["records"]}
    assert set(records) == {"rtn-4", "gptq-2 (g16)"}
    assert len({r["ppl_before"] for r in records.values()}) == 1, "one checkpoint, measured once per method alike"
    assert records["rtn-4"]["bits_per_weight"] > records["gptq-2 (g16)"]["bits_per_weight"]
    assert all(r["ppl_after"] > 0 and r["task_accuracy_after"] is not None for r in records.values())


def test_linear_packing_smoke_times_f_linear_and_the_packed_layer_on_the_same_inputs(tmp_path):
    out = tmp_path / "linear_packing.json"
    subprocess.run(
        [sys.executable, "bench/linear_packing.py", "--smoke", "--out", str(out)], cwd=ROOT, check=True, timeout=300
    )
    report = json.loads(out.read_text())
    records = report["records"]
    dtypes = {"float32", "bfloat16"} - set(report["not_packable"])
    shapes = {"q", "k", "v", "o", "gate", "up", "down", "lm_head", "layer"} | {
        f"square-{side}" for side in (64, 256, 512, 1024)
    }
    assert {(r["shape"], r["dtype"], r["rows"]) for r in records} == {
        (shape, dtype, rows) for shape in shapes for dtype in dtypes for rows in (1, 4)
    }
    for r in records:
        assert r["f_linear_ms"] > 0 and r["packed_ms"] > 0
        assert r["speedup"] == round(r["f_linear_ms"] / r["packed_ms"], 2)
        if r["shape"] != "layer":  # the same product: bf16 bit for bit, fp32 to rounding
            assert r["max_abs_diff"] <= (0.0 if r["dtype"] == "bfloat16" else 1e-4)


def test_train_start_smoke_times_our_launch_and_ray_train_as_is_in_local_mode(tmp_path):
    out = tmp_path / "train_start.json"
    command = [sys.executable, "bench/train_start.py", "--workers", "0", "--repeats", "1", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, timeout=300)
    report = json.loads(out.read_text())
    sides = {(r["side"], r["workers"]): r for r in report["records"]}
    assert set(sides) == {("ours", 0), ("ray-train", 0)}
    assert all(len(r["seconds"]) == 1 and r["median_s"] > 0 for r in sides.values())
