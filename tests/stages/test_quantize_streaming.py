"""The quantize stage streams decoder layers: each part of the checkpoint is read alone, the layer-by-layer forward
is the model's forward, non-sequential streaming is exactly the one-pass whole-model calibration, a VL model's
vision parts quantize where they run, the output is one shard per layer, and a model larger than a memory cap
quantizes under it (measured in a subprocess)."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_artifacts
import torch

import ernie.checkpoint as checkpoint
import stages.quantize as quantize
from ernie import ErnieForCausalLM, get_preset
from ernie.batching import collate
from ernie.checkpoint import load_checkpoint_part, load_pretrained, read_checkpoint_part, save_pretrained
from ernie.config import MoEConfig
from ernie.evaluation import val_loss
from ernie.positions import vl_position_ids
from ernie.quant import WEIGHTS_INDEX_FILE, QuantFormatError, QuantizedWriter, load_quantized, quantized_modules
from pipeline.shards import iter_rows
from stages.quantize.calibration import collect
from stages.quantize.gptq import GPTQLog, gptq_weight_quantizer
from stages.quantize.rtn import quantization_targets, quantize_model
from stages.quantize.stream import batch_loss, embed, load_by_parts, run_layer, skeleton, stream_quantize

PATCH_DIM = 3 * 14 * 14


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return tiny_artifacts.build(tmp_path_factory.getbasetemp() / "tiny_artifacts")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is as fast, and on a busy 2-core machine far faster (a gptq run took 13-20 s with
    two threads, 1 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str, seed: int = 0) -> ErnieForCausalLM:
    torch.manual_seed(seed)
    return ErnieForCausalLM(get_preset(name)).eval()


def _vl_rows(cfg, count: int, seed: int) -> list[dict]:
    """Packed-row dicts (as the data stage writes them) of text around one 4 x 4-patch image."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        before, after = torch.randint(11, 400, (5,), generator=g).tolist(), torch.randint(11, 400, (6,), generator=g)
        image = [cfg.image_start_token_id] + [cfg.image_token_id] * 4 + [cfg.image_end_token_id]
        ids = torch.tensor(before + image + after.tolist())
        grid = torch.tensor([[1, 4, 4]])
        documents = torch.zeros_like(ids)
        rows.append(
            {
                "input_ids": ids.numpy(),
                "labels": ids.numpy(),
                "document_ids": documents.numpy(),
                "position_ids": vl_position_ids(ids[None], cfg, grid, None, documents[None])[:, 0].numpy(),
                "image_grid_thw": grid.numpy(),
                "pixel_values": torch.randint(0, 256, (16, PATCH_DIM), generator=g, dtype=torch.uint8).numpy(),
            }
        )
    return rows


# ---------------------------------------------------------------------- reading one part
def test_a_layer_is_read_alone_from_the_shards_and_parts_make_the_whole_model(tmp_path, monkeypatch):
    save_pretrained(_model("tiny_moe"), tmp_path, max_shard_bytes=40_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    reference = load_pretrained(tmp_path).state_dict()
    read = []

    class Recording:
        def __init__(self, path, **kwargs):
            self.file = checkpoint_safe_open(path, **kwargs)

        def __enter__(self):
            self.f = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    checkpoint_safe_open = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open", Recording)
    layer = read_checkpoint_part(tmp_path, get_preset("tiny_moe"), 1)
    assert read and all(name.startswith("model.layers.1.") for name in read)
    assert set(layer) == {k for k in reference if k.startswith("model.layers.1.")}
    assert all(torch.equal(t, reference[k]) for k, t in layer.items())

    whole = load_by_parts(tmp_path).state_dict()
    assert whole.keys() == reference.keys() and all(torch.equal(t, reference[k]) for k, t in whole.items())

    index = json.loads((tmp_path / checkpoint.INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.2.self_attn.o_proj.weight"]
    (tmp_path / checkpoint.INDEX_FILE).write_text(json.dumps(index))
    load_checkpoint_part(skeleton(tmp_path), tmp_path, 0)  # another layer still loads
    with pytest.raises(checkpoint.CheckpointError, match=r"\(layer 2\).*missing tensors.*layers.2.self_attn.o_proj"):
        load_checkpoint_part(skeleton(tmp_path), tmp_path, 2)


# ---------------------------------------------------------------------- the forward, layer by layer
@pytest.mark.parametrize("name", ["tiny_moe", "tiny_vl"])
def test_layer_by_layer_forward_is_the_model_forward(name):
    model = _model(name)
    rows = _vl_rows(model.config, 2, seed=1) if name == "tiny_vl" else _text_rows(2, seed=1)
    batch = collate(rows)
    x, inputs = embed(model, batch)
    for layer in model.model.layers:
        x = run_layer(model, layer, x, inputs)
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    with torch.no_grad():
        out = model(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"], **images
        )
        assert torch.equal(model.lm_head(model.model.norm(x)), out.logits)
    loss, tokens = batch_loss(model, x, inputs)
    assert loss / tokens == pytest.approx(val_loss(model, rows)[0], rel=1e-6)


def _text_rows(count: int, seed: int) -> list[dict]:
    """Rows of two packed documents each (positions restart, attention stays inside a document)."""
    ids = torch.randint(3, 500, (count, 12), generator=torch.Generator().manual_seed(seed))
    documents = torch.tensor([0] * 5 + [1] * 7)
    positions = torch.cat([torch.arange(5), torch.arange(7)])
    return [
        {
            "input_ids": row.numpy(),
            "labels": row.numpy(),
            "document_ids": documents.numpy(),
            "position_ids": positions.numpy(),
        }
        for row in ids
    ]


# ---------------------------------------------------------------------- calibration: sequential or not
def test_non_sequential_streaming_is_the_one_pass_whole_model_gptq_and_sequential_changes_later_layers(
    artifacts, tmp_path
):
    overrides = {"method": "gptq", "bits": 2, "group_size": 16, "min_expert_tokens": 4, "eval_items": 2}
    inputs = {"ckpt": ("ckpt", artifacts["ckpt"]), "dataset": ("dataset", artifacts["dataset"])}
    runs = {}
    for sequential in (False, True):
        cfg = quantize.Config(**overrides, sequential=sequential)
        quantize.run(tiny_artifacts.context("quantize", cfg, inputs, tmp_path / str(sequential)))
        runs[sequential] = load_quantized(tmp_path / str(sequential))

    # the reference: the whole model in memory, every layer's statistics from one full-precision pass
    cfg = quantize.Config(**overrides)
    model = load_pretrained(artifacts["ckpt"]).eval()
    targets = quantization_targets(model, cfg.skip)
    rows = list(itertools.islice(iter_rows(artifacts["dataset"] / "train"), cfg.calibration_rows))
    calibration = collect(model, targets, (collate(rows[i : i + 8]) for i in range(0, len(rows), 8)))
    log = GPTQLog()
    quantizer = gptq_weight_quantizer(calibration, 2, False, cfg.damp, False, cfg.block_size, 4, torch.float16, log)
    quantize_model(model, 2, 16, skip=cfg.skip, quantize_weight=quantizer)

    ids = torch.randint(5, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(runs[False](ids).logits, model(ids).logits)
    codes = {s: {n: m.state_dict() for n, m in quantized_modules(runs[s]).items()} for s in runs}
    first = [n for n in codes[True] if n.startswith("model.layers.0.")]
    later = [n for n in codes[True] if not n.startswith("model.layers.0.")]
    assert all(_same(codes[True][n], codes[False][n]) for n in first)  # the same inputs in layer 0
    assert not all(_same(codes[True][n], codes[False][n]) for n in later)
    report = json.loads((tmp_path / "True" / "quant_report.json").read_text())
    assert report["sequential"] is True and len(report["layer_output_error"]) == 3


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- a VL model, vision quantized too
def test_a_vl_model_streams_with_its_vision_encoder_quantized_where_it_runs(tmp_path):
    model = _model("tiny_vl")
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=100_000)
    val, train = _vl_rows(model.config, 3, seed=2), _vl_rows(model.config, 4, seed=3)
    cfg = quantize.Config(method="gptq", group_size=4, skip=["lm_head"], min_expert_tokens=1)  # 4 divides 588
    writer = QuantizedWriter(tmp_path / "q", parts=model.config.num_layers + 1)
    quantize_part = quantize._part_quantizer(cfg, GPTQLog())
    batches = [collate(val[:2]), collate(val[2:])]
    result = stream_quantize(tmp_path / "ckpt", batches, [collate(train)], quantize_part, writer, cfg.skip)
    writer.close(model.config, result.dtype, {"method": "gptq"})

    names = {s.name for s in result.stats}
    assert any(n.startswith("vision_encoder.") for n in names) and any(n.startswith("adapter.") for n in names)
    assert result.loss_before == pytest.approx(val_loss(model, val)[0], rel=1e-6)
    quantized = load_quantized(tmp_path / "q")
    assert result.loss_after == pytest.approx(val_loss(quantized, val)[0], rel=1e-6)
    assert result.loss_after != result.loss_before
    assert sum(sum(tokens) for tokens in result.expert_tokens.values()) > 0  # vision pools too: image tokens


# ---------------------------------------------------------------------- the output format
def test_the_packed_model_is_one_shard_per_layer_and_a_broken_index_is_refused(artifacts, tmp_path):
    dataset = tmp_path / "dataset"  # without tasks/
    for part in ("val", "tokenizer"):
        shutil.copytree(artifacts["dataset"] / part, dataset / part)
    inputs = {"ckpt": ("ckpt", artifacts["ckpt"]), "dataset": ("dataset", dataset)}
    quantize.run(tiny_artifacts.context("quantize", quantize.Config(), inputs, tmp_path))
    report = json.loads((tmp_path / "quant_report.json").read_text())
    assert report["task_accuracy_not_measured"] == "no items in tasks/val.jsonl"
    qc = json.loads((tmp_path / "quant_config.json").read_text())
    assert qc["weights"] == WEIGHTS_INDEX_FILE
    weight_map = json.loads((tmp_path / WEIGHTS_INDEX_FILE).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert shards == [f"quantized-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert {f for k, f in weight_map.items() if k.startswith("model.layers.1.")} == {shards[1]}
    assert weight_map["model.embed_tokens.weight"] == shards[-1]

    index = tmp_path / WEIGHTS_INDEX_FILE
    index.write_text(json.dumps({"weight_map": {**weight_map, "model.norm.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(QuantFormatError, match="elsewhere"):
        load_quantized(tmp_path)
    (tmp_path / shards[2]).unlink()
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(QuantFormatError, match=f"{shards[2]} is listed in {WEIGHTS_INDEX_FILE} but missing"):
        load_quantized(tmp_path)


# ---------------------------------------------------------------------- memory
# The peak is the child's VmHWM (the high-water mark of its own address space), not getrusage's ru_maxrss: Linux
# carries ru_maxrss across exec, so a child forked from a large pytest process starts at its parent's size.
_CHILD = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)  # a busy 2-core machine: one thread is as fast and its timing steadier
import matplotlib.pyplot, tokenizers  # imported by the stage's report and task accuracy
import stages.quantize as quantize, tiny_artifacts
from ernie.checkpoint import load_pretrained
from stages.quantize.stream import skeleton

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

mode, ckpt, dataset, out, cap = sys.argv[1:6]
skeleton(ckpt)  # the first model built on the meta device imports torch's compiler stack (~150 MiB), once
base = status("VmRSS")
if mode == "whole":
    model = load_pretrained(ckpt)
else:
    inputs = {"ckpt": ("ckpt", Path(ckpt)), "dataset": ("dataset", Path(dataset))}
    cfg = quantize.Config(eval_rows=4, eval_items=4, max_new_tokens=2, max_memory_gb=int(cap) / 2**30)
    quantize.run(tiny_artifacts.context("quantize", cfg, inputs, Path(out)))
print(json.dumps({"growth": status("VmHWM") - base}))
"""


def _peak_growth(mode: str, ckpt: Path, dataset: Path, out: Path, cap: int) -> int:
    """Peak resident bytes over what the process held before, in a fresh interpreter."""
    helpers = Path(tiny_artifacts.__file__).parent
    argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(helpers)!r})\n" + _CHILD]
    done = subprocess.run(
        [*argv, mode, str(ckpt), str(dataset), str(out), str(cap)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["growth"]


def test_a_model_larger_than_the_memory_cap_quantizes_under_it(artifacts, tmp_path):
    """16 layers of 64 experts: 233 MiB of fp32 weights in 24 MiB shards, a cap of 3/4 of that (174 MiB).
    Measured on a 2-core CPU: the streamed run peaked 95-105 MiB over its start, `load_pretrained` 464 MiB (the
    published tensors and their stacked copies). The stream itself peaks near 70 MiB (one 15 MiB layer, dequantized
    for each forward of its quantized form); the task accuracy on the packed model read back (36 MiB) is the
    run's largest moment. The full-precision model does not fit the cap, so its task accuracy is not measured."""
    cfg = get_preset("tiny_moe").replace(
        vocab_size=tiny_artifacts.VOCAB,
        hidden_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        num_layers=16,
        moe=MoEConfig(num_experts=64, top_k=2, intermediate_size=160, num_shared_experts=1, layer_start=1),
    )
    torch.manual_seed(0)
    model = ErnieForCausalLM(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=24 * 2**20)
    del model
    cap = weights * 3 // 4

    streamed = _peak_growth("stream", tmp_path / "ckpt", artifacts["dataset"], tmp_path / "q", cap)
    whole = _peak_growth("whole", tmp_path / "ckpt", artifacts["dataset"], tmp_path / "q", cap)
    print(
        f"\nweights {weights / 2**20:.0f} MiB, cap {cap / 2**20:.0f} MiB: streamed peak +{streamed / 2**20:.0f} MiB, "
        f"whole-model load +{whole / 2**20:.0f} MiB"
    )
    assert streamed < cap < weights < whole

    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert report["task_accuracy_before"] is None
    assert f"over the memory cap of {cap / 2**30:.3g} GiB" in report["task_accuracy_not_measured"]["before"]
    assert report["task_accuracy_after"] is not None  # the packed model fits
    assert report["model_bytes_before"] == pytest.approx(weights, rel=1e-3)  # + the routers' correction biases
    assert report["model_bytes_after"] < cap
