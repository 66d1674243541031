"""The quantize stage: RTN int4 on a briefly trained tiny MoE, quality measured, packed model reloadable."""

from __future__ import annotations

import json

import pytest
import tiny_artifacts
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

import stages.quantize as quantize
from ernie.checkpoint import load_pretrained
from ernie.evaluation import perplexity, val_loss
from ernie.quant import QuantizedGroupedExperts, QuantizedLinear, dequantize, load_quantized, quantized_modules
from ernie.tasks import accuracy_by_task, balanced_items, task_predictions
from pipeline.contract import UserError
from pipeline.formats import read_jsonl
from pipeline.shards import load_rows
from stages.quantize.rtn import quantize_model, rtn_quantize


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is as fast, and on a busy 2-core machine far faster (a gptq stage run took 13-20 s
    with two threads, 1 s with one; a 1-thread and a 2-thread run agree to 1e-5 in perplexity)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return tiny_artifacts.build(tmp_path_factory.getbasetemp() / "tiny_artifacts")


@pytest.fixture(scope="module")
def quantized(artifacts, tmp_path_factory):
    """The stage's output for the default config, and its in-memory logger."""
    out = tmp_path_factory.mktemp("qckpt")
    inputs = {"ckpt": ("ckpt", artifacts["ckpt"]), "dataset": ("dataset", artifacts["dataset"])}
    ctx = tiny_artifacts.context("quantize", quantize.Config(), inputs, out)
    result = quantize.run(ctx)
    return out, result, ctx.log


def _run(artifacts, tmp_path, **overrides):
    inputs = {"ckpt": ("ckpt", artifacts["ckpt"]), "dataset": ("dataset", artifacts["dataset"])}
    return quantize.run(tiny_artifacts.context("quantize", quantize.Config(**overrides), inputs, tmp_path))


def test_report_holds_the_measured_quality_and_sizes(quantized):
    out, result, log = quantized
    report = json.loads((out / "quant_report.json").read_text())
    for key in (
        "bits",
        "group_size",
        "method",
        "bytes_before",
        "bytes_after",
        "size_ratio",
        "ppl_before",
        "ppl_after",
        "ppl_delta",
        "task_accuracy_before",
        "task_accuracy_after",
        "task_items",
        "layer_output_error",
        "layers",
    ):
        assert key in report, key
    assert (report["bits"], report["group_size"], report["method"]) == (4, 32, "rtn")
    # int4 codes + an fp16 scale and a uint8 zero per 32 fp32 weights: (16 + 2 + 1) / 128 bytes
    assert report["size_ratio"] == pytest.approx(19 / 128)
    assert report["size_ratio"] < 0.35
    assert report["ppl_delta"] == pytest.approx(report["ppl_after"] - report["ppl_before"])
    assert 0 < report["layers"][0]["rel_error"] < 0.12
    assert all(layer["rel_error"] < 0.12 for layer in report["layers"])
    assert abs(report["ppl_delta"]) / report["ppl_before"] < 0.03
    assert log.last("ppl_after") == pytest.approx(report["ppl_after"])
    assert log.last("size_ratio") == pytest.approx(report["size_ratio"])
    assert "quant_error.png" in log.artifact_log
    assert (out / "quant_error.png").stat().st_size > 1000
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert result.metrics["ppl_before"] == pytest.approx(report["ppl_before"])
    assert log.last("task_accuracy_after") == pytest.approx(report["task_accuracy_after"])
    assert len(report["layer_output_error"]) == 3 and 0 < report["layer_output_error"][-1] < 0.2


def test_task_accuracy_before_and_after_are_the_models_greedy_answers(quantized, artifacts):
    """The bundled tasks (tasks/val.jsonl) answered by the checkpoint and by the packed model read back, scored as
    the eval stage scores them."""
    out, _, log = quantized
    report = json.loads((out / "quant_report.json").read_text())
    items = balanced_items(read_jsonl(artifacts["dataset"] / "tasks" / "val.jsonl"), quantize.Config().eval_items)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    for which, model in (("before", load_pretrained(artifacts["ckpt"]).eval()), ("after", load_quantized(out))):
        per_task, counts = accuracy_by_task(items, task_predictions(model, tokenizer, items, 8, 8))
        assert report["task_items"] == counts == {"add": 24, "reverse": 24}
        assert {t: report[f"task_accuracy_{which}/{t}"] for t in counts} == per_task
        overall = sum(per_task[t] * counts[t] for t in counts) / len(items)
        assert report[f"task_accuracy_{which}"] == pytest.approx(overall)
        assert log.last(f"task_accuracy_{which}/reverse") == pytest.approx(per_task["reverse"])
    assert "task_accuracy_not_measured" not in report


def test_perplexity_before_is_the_real_checkpoint_and_after_is_the_saved_model(quantized, artifacts):
    out, _, _ = quantized
    report = json.loads((out / "quant_report.json").read_text())
    rows = load_rows(artifacts["dataset"] / "val")
    loss_before, _ = val_loss(load_pretrained(artifacts["ckpt"]).eval(), rows)
    loss_after, _ = val_loss(load_quantized(out), rows)
    assert report["ppl_before"] == pytest.approx(perplexity(loss_before), rel=1e-6)
    assert report["ppl_after"] == pytest.approx(perplexity(loss_after), rel=1e-6)


def test_router_norms_embeddings_and_lm_head_stay_unquantized(quantized):
    out, _, _ = quantized
    model = load_quantized(out)
    names = set(quantized_modules(model))
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.text.experts" in names
    assert isinstance(model.model.layers[1].mlp.shared_experts.down_proj, QuantizedLinear)
    assert isinstance(model.model.layers[1].mlp.text.experts, QuantizedGroupedExperts)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.model.layers[1].mlp.text.gate.weight.dtype == torch.float32
    assert not any("gate" == n.split(".")[-1] or "norm" in n or "embed" in n for n in names)


def test_reloaded_model_gives_the_in_memory_quantized_logits(quantized, artifacts):
    out, _, _ = quantized
    in_memory = load_pretrained(artifacts["ckpt"]).eval()
    quantize_model(in_memory, bits=4, group_size=32, skip=quantize.Config().skip)
    ids = torch.randint(5, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_quantized(out)(ids).logits, in_memory(ids).logits)


def test_rtn_int4_is_far_better_than_a_broken_2bit_per_row_quantization(quantized, artifacts):
    out, _, _ = quantized
    report = json.loads((out / "quant_report.json").read_text())
    broken = load_pretrained(artifacts["ckpt"]).eval()
    stats = quantize_model(broken, bits=2, group_size=None, skip=["lm_head"])  # one group per row
    loss, _ = val_loss(broken, load_rows(artifacts["dataset"] / "val"))
    broken_delta = perplexity(loss) - report["ppl_before"]
    assert min(s.rel_error for s in stats) > 3 * max(layer["rel_error"] for layer in report["layers"])
    # measured on a 2-core CPU: int4 g32 +1.8% perplexity, 2-bit per row +47%
    assert broken_delta > 5 * abs(report["ppl_delta"])
    assert broken_delta / report["ppl_before"] > 0.10


def test_more_bits_give_smaller_weight_error(artifacts):
    errors = {}
    for bits in (2, 4, 8):
        model = load_pretrained(artifacts["ckpt"]).eval()
        stats = quantize_model(model, bits=bits, group_size=32, skip=["lm_head"])
        errors[bits] = sum(s.rel_error for s in stats) / len(stats)
    assert errors[8] < errors[4] / 4 < errors[2] / 4


def test_module_bits_give_each_matched_module_its_own_width(quantized, artifacts, tmp_path):
    """rtn int2 with attention at 4 bits: attention is quantized exactly as in the all-int4 run (RTN is per
    module), everything else at 2 bits; the packed model says so, and the report counts the bytes."""
    out4 = quantized[0]
    module_bits = {"*.self_attn": 4, "model.layers.0.mlp.down_proj": 8}
    result = _run(artifacts, tmp_path, bits=2, module_bits=module_bits, eval_items=0)
    report = json.loads((tmp_path / "quant_report.json").read_text())
    all4 = {s["name"]: s for s in json.loads((out4 / "quant_report.json").read_text())["layers"]}
    for layer in report["layers"]:
        name = layer["name"]
        expected = 8 if name == "model.layers.0.mlp.down_proj" else 4 if ".self_attn." in name else 2
        assert layer["bits"] == expected, name
        if expected == 4:
            assert layer["rel_error"] == all4[name]["rel_error"], name
        else:
            assert layer["rel_error"] != all4[name]["rel_error"], name
    qc = json.loads((tmp_path / "quant_config.json").read_text())
    assert qc["module_bits"] == module_bits and qc["bits"] == 2
    assert qc["modules"]["model.layers.1.self_attn.o_proj"]["bits"] == 4
    assert qc["modules"]["model.layers.1.mlp.text.experts"]["gate_up_proj"]["bits"] == 2
    assert (
        2 < result.metrics["bits_per_weight"] < json.loads((out4 / "quant_report.json").read_text())["bits_per_weight"]
    )
    model = load_quantized(tmp_path)
    assert (model.model.layers[2].self_attn.k_proj.bits, model.model.layers[0].mlp.down_proj.bits) == (4, 8)
    loss, _ = val_loss(model, load_rows(artifacts["dataset"] / "val"))
    assert perplexity(loss) == pytest.approx(result.metrics["ppl_after"], rel=1e-6)
    assert "rtn int2+rtn int4+rtn int8 g32" in result.summary


def test_tcq_codes_its_width_and_gptq_the_modules_given_another(artifacts, tmp_path):
    _run(
        artifacts,
        tmp_path,
        method="tcq",
        bits=2,
        module_bits={"*.self_attn": 4},
        block_size=32,
        min_expert_tokens=4,
        calibration_rows=16,
        eval_rows=8,
        eval_items=0,
    )
    modules = json.loads((tmp_path / "quant_config.json").read_text())["modules"]
    assert (modules["model.layers.1.self_attn.q_proj"]["kind"], modules["model.layers.1.self_attn.q_proj"]["bits"]) == (
        "linear",
        4,
    )
    assert modules["model.layers.1.mlp.text.experts"]["kind"] == "tcq_experts"
    assert modules["model.layers.0.mlp.up_proj"]["kind"] == "tcq_linear"
    report = json.loads((tmp_path / "quant_report.json").read_text())
    assert report["layers_uncalibrated"] == 0


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.sampled_from([4, 8, 16]),
    st.integers(1, 3),
    st.booleans(),
    st.integers(0, 10_000),
    st.floats(1e-3, 10.0),
)
def test_rtn_error_is_at_most_half_a_step(rows, group, groups, symmetric, seed, spread):
    w = torch.randn(rows, group * groups, generator=torch.Generator().manual_seed(seed)) * spread
    codes, scales, zeros = rtn_quantize(w, bits=4, group_size=group, symmetric=symmetric, scale_dtype=torch.float32)
    assert int(codes.max()) <= 15
    error = (w - dequantize(codes, scales, zeros, group)).abs().reshape(rows, groups, group)
    # asymmetric: [min, max] (widened to hold 0) spans 15 steps; symmetric: +-absmax spans +-7 steps
    assert bool((error <= scales.float()[..., None] * 0.5001).all())


def test_symmetric_groups_use_the_fixed_zero_point(artifacts, tmp_path):
    result = _run(artifacts, tmp_path, symmetric=True)
    qc = json.loads((tmp_path / "quant_config.json").read_text())
    assert qc["symmetric"] is True
    model = load_quantized(tmp_path)
    assert bool((model.model.layers[0].self_attn.q_proj.zeros == 8).all())
    assert result.metrics["recon_error_max"] < 0.15


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bits": 5}, r"quantize\.bits=5 is not supported"),
        ({"bits": 3}, r"quantize\.bits=3"),
        ({"method": "awq"}, r"quantize\.method='awq' is not a known method; available: rtn, gptq"),
        ({"method": "gptq", "damp": 1.5}, r"quantize\.damp=1\.5 in \[0, 1\)"),
        ({"group_size": 48}, r"quantize\.group_size=48 does not divide the input features of model\.layers\.0"),
        ({"scale_dtype": "int8"}, r"quantize\.scale_dtype"),
        ({"skip": ["model", "lm_head"]}, r"leaves no layer to quantize"),
        ({"module_bits": {"*.self_attn": 3}}, r"quantize\.module_bits\['\*\.self_attn'\]=3 is not supported"),
        ({"module_bits": {"*.mlp": 2}, "export": ["compressed-tensors"]}, r"not 2-bit ones"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(artifacts, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _run(artifacts, tmp_path, **overrides)
    assert not (tmp_path / "quant_config.json").exists()


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_beats_rtn_on_validation_perplexity_at_the_same_bits(artifacts, tmp_path, bits):
    """Calibrated on the training rows, measured on the val rows: GPTQ's compensation pays at 4 bits and
    more so at 2; each expert's statistics come from the tokens routed to it."""
    rtn = _run(artifacts, tmp_path / "rtn", bits=bits, group_size=16)
    gptq = _run(artifacts, tmp_path / "gptq", bits=bits, group_size=16, method="gptq", min_expert_tokens=4)
    r, g = rtn.metrics, gptq.metrics
    print(f"\nint{bits} g16 val ppl: before {r['ppl_before']:.3f}, rtn {r['ppl_after']:.3f}, gptq {g['ppl_after']:.3f}")
    assert g["ppl_after"] < r["ppl_after"]
    assert g["ppl_after"] - g["ppl_before"] < 0.7 * (r["ppl_after"] - r["ppl_before"])
    report = json.loads((tmp_path / "gptq" / "quant_report.json").read_text())
    assert report["method"] == "gptq" and report["calibration_tokens"] > 0 and report["layers_uncalibrated"] == 0
    pools = report["expert_tokens"]
    assert pools and all(sum(tokens) > 0 for tokens in pools.values())


def test_tcq_2bit_stays_close_to_the_model_at_fewer_bits_than_gptq_2bit(artifacts, tmp_path):
    """The 2-bit trellis code (stages/quantize/tcq.py) beside GPTQ int2 g16, both calibrated on the same training
    rows and measured on the val rows. What holds on every machine: tcq stores fewer bits per weight (2.65: 2-bit
    codes, an 8-bit lead-in per row, an fp16 scale per 32; GPTQ 3.50), and keeps val perplexity within 10% of the
    unquantized model's (2-bit round-to-nearest costs about 19% here). Which of the two wins is not pinned: the
    trained tiny checkpoint differs with the CPU's kernels, and so does the winner (docs/quantization.md: tcq 2.032
    against GPTQ 2.075 from 2.017 on an AVX-512 machine; 1.938 against 1.884 from 1.850 on an AVX2 one)."""
    gptq = _run(artifacts, tmp_path / "gptq", method="gptq", bits=2, group_size=16, min_expert_tokens=4).metrics
    tcq = _run(
        artifacts, tmp_path / "tcq", method="tcq", bits=2, group_size=32, block_size=32, min_expert_tokens=4
    ).metrics
    before = gptq["ppl_before"]
    print(
        f"\nint2 val ppl: before {before:.3f}, gptq g16 {gptq['ppl_after']:.3f} ({gptq['bits_per_weight']:.2f} bpw), "
        f"tcq {tcq['ppl_after']:.3f} ({tcq['bits_per_weight']:.2f} bpw)"
    )
    assert gptq["bits_per_weight"] == pytest.approx(3.5)
    assert tcq["bits_per_weight"] < 2.7 < gptq["bits_per_weight"]
    assert before < tcq["ppl_after"] < 1.1 * before
    assert before < gptq["ppl_after"] < 1.1 * before

    report = json.loads((tmp_path / "tcq" / "quant_report.json").read_text())
    assert (report["method"], report["window_bits"], report["layers_uncalibrated"]) == ("tcq", 10, 0)
    qc = json.loads((tmp_path / "tcq" / "quant_config.json").read_text())
    assert qc["modules"]["model.layers.1.mlp.text.experts"]["kind"] == "tcq_experts"
    loss, _ = val_loss(load_quantized(tmp_path / "tcq"), load_rows(artifacts["dataset"] / "val"))
    assert perplexity(loss) == pytest.approx(tcq["ppl_after"], rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bits": 8}, r"quantize\.bits=8 is not supported by quantize\.method=tcq"),
        ({"window_bits": 9}, r"quantize\.window_bits=9 must be a multiple of bits=2"),
        ({"window_bits": 16}, r"quantize\.window_bits=16 gives 16384 trellis states"),
        ({"block_size": 48}, r"quantize\.block_size=48 must be a positive multiple of group_size=32"),
        ({"act_order": True}, r"quantize\.act_order=True applies to rtn / gptq grids"),
        ({"export": ["gptq"]}, r"quantize\.method=tcq writes no such grid"),
    ],
)
def test_bad_tcq_settings_are_refused_with_the_key_named(artifacts, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _run(artifacts, tmp_path, **({"method": "tcq", "bits": 2, "block_size": 32} | overrides))
    assert not (tmp_path / "quant_config.json").exists()
