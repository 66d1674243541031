"""The eval stage: perplexity and task accuracy, checked on cases whose answers are known."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import tiny_artifacts
import torch

import stages.eval as eval_stage
import stages.quantize as quantize
from ernie import tasks as eval_metrics
from ernie.chat_template import EOS, render
from ernie.checkpoint import load_pretrained
from ernie.evaluation import val_loss
from pipeline.formats import load_tokenizer, read_jsonl
from pipeline.shards import load_rows


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return tiny_artifacts.build(tmp_path_factory.getbasetemp() / "tiny_artifacts")


def _run(artifacts, tmp_path, model_dir=None, kind="ckpt", **overrides):
    inputs = {"model": (kind, model_dir or artifacts["ckpt"]), "dataset": ("dataset", artifacts["dataset"])}
    ctx = tiny_artifacts.context("eval", eval_stage.Config(**overrides), inputs, tmp_path)
    return eval_stage.run(ctx), ctx.log


def _oracle_generate(tokenizer, items, reply=None):
    """A stand-in for `generate` that answers each prompt with its item's answer (or `reply`) + EOS."""
    answers = {render(it["prompt"], add_generation_prompt=True): it["answer"] for it in items}
    eos = tokenizer.token_to_id(EOS)

    def fake(model, input_ids, max_new_tokens, attention_mask=None, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
            text = answers[prompt] if reply is None else reply
            new = tokenizer.encode(text, add_special_tokens=False).ids + [eos]
            rows.append((new + [0] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)

    return fake


def test_a_model_that_answers_correctly_scores_one_and_ppl_is_exp_loss(artifacts, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(artifacts["dataset"])
    items = read_jsonl(artifacts["dataset"] / "tasks" / "val.jsonl")
    monkeypatch.setattr(eval_metrics, "generate", _oracle_generate(tokenizer, items))
    result, log = _run(artifacts, tmp_path, max_items=0)
    m = result.metrics
    assert m["task_accuracy"] == 1.0
    assert m["task_accuracy/add"] == 1.0 and m["task_accuracy/reverse"] == 1.0
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]), rel=1e-12)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["model_kind"] == "ckpt"
    assert report["task_items"] == {"add": 24, "reverse": 24}
    assert report["metrics"]["task_accuracy"] == 1.0
    assert log.last("val_loss") == pytest.approx(m["val_loss"])


def test_wrong_answers_score_zero_and_whitespace_around_an_answer_does_not_count(artifacts, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(artifacts["dataset"])
    items = read_jsonl(artifacts["dataset"] / "tasks" / "val.jsonl")
    monkeypatch.setattr(eval_metrics, "generate", _oracle_generate(tokenizer, items, reply="nope"))
    result, _ = _run(artifacts, tmp_path)
    assert result.metrics["task_accuracy"] == 0.0
    assert eval_metrics.answer_text(tokenizer, tokenizer.encode(" 12 ").ids + [2, 0, 0], eos_id=2) == "12"
    assert eval_metrics.answer_text(tokenizer, tokenizer.encode("7").ids + [2] + tokenizer.encode("8").ids, 2) == "7"


def test_val_loss_is_the_models_own_document_masked_loss_over_all_rows(artifacts, tmp_path):
    result, _ = _run(artifacts, tmp_path, max_items=1)
    rows = {k: torch.from_numpy(v).long() for k, v in load_rows(artifacts["dataset"] / "val").items()}
    assert bool((rows["labels"] == -100).any()) and int(rows["document_ids"].max()) > 0
    model = load_pretrained(artifacts["ckpt"]).eval()
    with torch.no_grad():
        out = model(
            rows["input_ids"],
            labels=rows["labels"],
            document_ids=rows["document_ids"],
            position_ids=rows["position_ids"],
        )
    assert result.metrics["val_loss"] == pytest.approx(float(out.losses["lm"]), rel=1e-5)


def test_only_supervised_targets_count(artifacts):
    """Labels -100 everywhere but position 1: the loss is each row's first-token prediction alone."""
    model = load_pretrained(artifacts["ckpt"]).eval()
    rows = load_rows(artifacts["dataset"] / "val")
    labels = np.full_like(rows["labels"], -100)
    labels[:, 1] = rows["input_ids"][:, 1]
    loss, tokens = val_loss(model, {**rows, "labels": labels}, batch_size=4)
    assert tokens == len(labels)
    first = torch.from_numpy(rows["input_ids"][:, :1]).long()
    with torch.no_grad():
        logits = model(first).logits[:, 0]
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(rows["input_ids"][:, 1]).long())
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_real_generation_on_a_checkpoint_and_its_quantized_form_is_fast(artifacts, tmp_path):
    qdir = tmp_path / "qckpt"
    inputs = {"ckpt": ("ckpt", artifacts["ckpt"]), "dataset": ("dataset", artifacts["dataset"])}
    quantize.run(tiny_artifacts.context("quantize", quantize.Config(), inputs, qdir))
    t0 = time.perf_counter()
    full, _ = _run(artifacts, tmp_path / "full")
    quant, _ = _run(artifacts, tmp_path / "quant", model_dir=qdir, kind="qckpt")
    # ~0.5 s each on an idle 2-core CPU; the bound only catches a runaway (a busy CI machine is slow)
    assert time.perf_counter() - t0 < 60
    assert json.loads((tmp_path / "quant" / "eval.json").read_text())["model_kind"] == "qckpt"
    report = json.loads((qdir / "quant_report.json").read_text())
    assert full.metrics["val_ppl"] == pytest.approx(report["ppl_before"], rel=1e-6)
    assert quant.metrics["val_ppl"] == pytest.approx(report["ppl_after"], rel=1e-6)
    for m in (full.metrics, quant.metrics):
        assert 0.0 <= m["task_accuracy"] <= 1.0
        assert set(m) >= {"val_loss", "val_ppl", "task_accuracy", "task_accuracy/add", "task_accuracy/reverse"}


def test_item_cap_keeps_every_task():
    items = [{"task": "a", "i": i} for i in range(10)] + [{"task": "b", "i": i} for i in range(3)]
    picked = eval_metrics.balanced_items(items, 6)
    assert len(picked) == 6
    assert sum(it["task"] == "b" for it in picked) == 3
    assert eval_metrics.balanced_items(items, 0) == items


def test_bad_settings_are_refused(artifacts, tmp_path):
    from pipeline.contract import UserError

    with pytest.raises(UserError, match="eval.batch_size"):
        _run(artifacts, tmp_path, batch_size=0)
