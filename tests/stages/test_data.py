"""The data stage writes the dataset artifact of `pipeline.formats`, deterministically, with
document-masked packing and eval tasks that no training data has seen."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie import get_preset
from ernie.chat_template import SPECIAL_TOKENS, render
from pipeline.contract import MemoryLogger, StageContext, StageResult, UserError
from pipeline.formats import TOKENIZER_FILE, load_tokenizer, read_jsonl
from pipeline.shards import ROW_FIELDS, load_rows
from stages import data
from stages.data.packing import pack_documents

TEXT_SOURCES = [
    data.config.SourceConfig(name="stdlib-docs", kind="stdlib", weight=0.7),
    data.config.SourceConfig(name="arithmetic", kind="arithmetic", weight=0.3),
]
SMALL = dict(
    sources=TEXT_SOURCES,
    vocab_size=400,
    seq_len=64,
    max_documents=250,
    arithmetic_documents=120,
    rows_per_shard=16,
    sft_examples=60,
    preference_pairs=40,
    eval_tasks=30,
    val_fraction=0.1,
)
SPLITS = ("train", "val")


def run_stage(output_dir: Path, seed: int = 0, model=None, **overrides) -> tuple[StageContext, StageResult]:
    config = data.Config(**{**SMALL, **overrides})
    model = model or get_preset("tiny_dense").replace(vocab_size=config.vocab_size)
    ctx = StageContext("data", config, model, {}, output_dir, seed=seed)
    return ctx, data.run(ctx)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(dataset dir, context, result) of one small run, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("dataset")
    ctx, result = run_stage(out)
    return out, ctx, result


@pytest.fixture(scope="module")
def rows(built):
    return {split: load_rows(built[0] / split) for split in SPLITS}


def documents_from_rows(split_rows: dict[str, np.ndarray]) -> dict[int, list[int]]:
    """Token lists of each document, its pieces concatenated in row order (not always document order)."""
    docs: dict[int, list[int]] = defaultdict(list)
    for ids, doc_ids in zip(split_rows["input_ids"], split_rows["document_ids"], strict=True):
        for doc in dict.fromkeys(doc_ids[doc_ids >= 0].tolist()):
            docs[doc] += ids[doc_ids == doc].tolist()
    return docs


# ---------------------------------------------------------------------- artifact format
def test_stage_module_exposes_the_contract():
    assert data.INPUTS == {} and data.OUTPUT_KIND == "dataset"
    assert data.Config().vocab_size == 1024 and data.Config().seq_len == 128


def test_tokenizer_has_the_special_tokens_at_fixed_ids(built):
    out = built[0]
    assert (out / TOKENIZER_FILE).is_file()
    tok = load_tokenizer(out)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert 261 <= tok.get_vocab_size() <= SMALL["vocab_size"]
    text = "What is 17 + 25? Ünïcode ok"
    assert tok.decode(tok.encode(text).ids) == text
    chat = render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "42"}])
    ids = tok.encode(chat).ids
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1  # bos/eos are single tokens, nothing added


def test_shards_hold_rows_of_the_declared_fields_and_shapes(built, rows):
    out, _, _ = built
    for split in SPLITS:
        n = len(rows[split]["input_ids"])
        assert n > 0
        assert len(list((out / split).glob("shard-*.tar"))) == math.ceil(n / SMALL["rows_per_shard"])
        assert json.loads((out / split / "index.json").read_text())["rows"] == n
        for name, dtype in ROW_FIELDS.items():
            assert rows[split][name].dtype == dtype, name
            assert rows[split][name].shape == (n, SMALL["seq_len"]), name
        r = rows[split]
        pad = r["document_ids"] == -1
        assert (r["input_ids"][pad] == 0).all() and (r["labels"][pad] == -100).all()
        assert (r["input_ids"][~pad] != 0).all()  # pad id 0 only ever pads
        assert (r["modality_ids"] == 0).all()
        assert pad[:, 0].sum() == 0  # no empty rows


def test_labels_never_predict_across_a_document_boundary(rows):
    for r in rows.values():
        ids, labels, docs = r["input_ids"], r["labels"], r["document_ids"]
        supervised = labels != -100
        assert (labels[supervised] == ids[supervised]).all()
        boundary = np.zeros_like(docs, dtype=bool)
        boundary[:, 1:] = docs[:, 1:] != docs[:, :-1]
        assert not supervised[boundary].any()
        assert not supervised[ids == 1].any()  # every bos starts a document
        assert supervised.mean() > 0.8


def test_positions_restart_at_every_document_as_the_model_computes_them(rows):
    import torch

    from ernie.positions import document_positions

    for r in rows.values():
        expected = document_positions(torch.from_numpy(r["document_ids"]).long()).numpy()
        np.testing.assert_array_equal(r["position_ids"], expected)
        assert (r["position_ids"][r["input_ids"] == 1] == 0).all()


def test_every_document_survives_packing_whole_and_once(built, rows):
    out, _, _ = built
    stats = json.loads((out / "stats.json").read_text())
    seen: set[int] = set()
    for split in SPLITS:
        docs = documents_from_rows(rows[split])
        assert len(docs) == stats["splits"][split]["documents"]
        assert not seen & docs.keys()  # a document lives in one split only
        seen |= docs.keys()
        for tokens in docs.values():  # pieces may be in any row order: one bos and one eos per document
            assert tokens.count(1) == 1 and tokens.count(2) == 1
    assert len(seen) == stats["documents"]


# ---------------------------------------------------------------------- post-training sets
def user_prompts(records: list[dict], key: str) -> set[str]:
    return {m["content"] for r in records for m in r[key] if m["role"] == "user"}


def expressions(prompts: set[str]) -> set[str]:
    return {re.search(r"\d+ [+-] \d+", p).group(0) for p in prompts}


def test_eval_tasks_are_correct_and_held_out_of_every_training_set(built, rows):
    out = built[0]
    tasks = read_jsonl(out / "tasks" / "val.jsonl")
    assert len(tasks) == SMALL["eval_tasks"]
    assert {t["task"] for t in tasks} == {"add", "sub"}
    for t in tasks:
        a, sym, b = re.search(r"(\d+) ([+-]) (\d+)", t["prompt"][0]["content"]).groups()
        assert t["answer"] == str(int(a) + int(b) if sym == "+" else int(a) - int(b))
        assert t["task"] == {"+": "add", "-": "sub"}[sym]
    held_out = expressions(user_prompts(tasks, "prompt"))
    assert len(held_out) == len(tasks)
    for name, key in (("sft", "messages"), ("preferences", "prompt")):
        records = [r for split in SPLITS for r in read_jsonl(out / name / f"{split}.jsonl")]
        assert not held_out & expressions(user_prompts(records, key)), name

    tok = load_tokenizer(out)
    pretraining_text = "\n".join(
        tok.decode(tokens) for split in SPLITS for tokens in documents_from_rows(rows[split]).values()
    )
    assert re.search(r"\d+ \+ \d+ = \d+", pretraining_text)  # the corpus does teach arithmetic
    for expression in held_out:
        a, sym, b = expression.split()
        pattern = rf"(?<![\d.]){a} *{re.escape(sym)} *{b}(?![\d.])"
        assert not re.search(pattern, pretraining_text), f"eval fact {expression} leaked into pretraining"


def test_sft_and_preference_records_are_chats_with_right_answers(built):
    out = built[0]
    sft = read_jsonl(out / "sft" / "train.jsonl") + read_jsonl(out / "sft" / "val.jsonl")
    assert len(sft) == SMALL["sft_examples"] and read_jsonl(out / "sft" / "val.jsonl")
    for record in sft:
        render(record["messages"])  # valid for the chat template
        question, reply = record["messages"]
        a, sym, b = re.search(r"(\d+) ([+-]) (\d+)", question["content"]).groups()
        assert reply["content"] == str(int(a) + int(b) if sym == "+" else int(a) - int(b))
    assert any("reasoning_content" in r["messages"][1] for r in sft)
    prefs = read_jsonl(out / "preferences" / "train.jsonl") + read_jsonl(out / "preferences" / "val.jsonl")
    assert len(prefs) == SMALL["preference_pairs"]
    for pair in prefs:
        render(pair["prompt"], add_generation_prompt=True)
        a, sym, b = re.search(r"(\d+) ([+-]) (\d+)", pair["prompt"][0]["content"]).groups()
        assert pair["chosen"] == str(int(a) + int(b) if sym == "+" else int(a) - int(b))
        assert pair["rejected"] != pair["chosen"] and pair["rejected"].isdigit()


# ---------------------------------------------------------------------- stats, logging, progress
def test_stats_agree_with_the_shards_and_are_logged(built, rows):
    out, ctx, result = built
    stats = json.loads((out / "stats.json").read_text())
    assert stats["seq_len"] == SMALL["seq_len"]
    assert stats["tokenizer_vocab_size"] == load_tokenizer(out).get_vocab_size()
    assert set(stats["sources"]) == {"stdlib-docs", "arithmetic"}
    assert stats["modalities"]["vision"]["tokens"] == 0
    for name, share in stats["mixture"].items():
        assert share["realised"] == pytest.approx(share["asked"], abs=0.02), name
    total_real, total_slots = 0, 0
    for split in SPLITS:
        docs = rows[split]["document_ids"]
        real = int((docs >= 0).sum())
        assert stats["splits"][split]["rows"] == len(docs)
        assert stats["splits"][split]["tokens"] == real
        total_real, total_slots = total_real + real, total_slots + docs.size
    assert stats["tokens"] == total_real == sum(s["tokens"] for s in stats["sources"].values())
    assert stats["packing_efficiency"] == pytest.approx(total_real / total_slots)
    assert 0.98 < stats["packing_efficiency"] <= 1.0
    assert stats["records"] == {
        "sft_train": 54,
        "sft_val": 6,
        "preferences_train": 36,
        "preferences_val": 4,
        "rlvr_train": 360,
        "rlvr_val": 40,
        "tasks_val": 30,
    }

    log: MemoryLogger = ctx.log
    assert log.last("packing_efficiency") == pytest.approx(stats["packing_efficiency"])
    assert log.last("tokens/source/arithmetic") == stats["sources"]["arithmetic"]["tokens"]
    assert {"data/tokens_per_source.png", "data/token_balance.png"} <= set(log.artifact_log)
    assert result.metrics["rows"] == stats["rows"] and "arithmetic" in result.summary
    assert ctx.progress.snapshot()["done"] == ctx.progress.snapshot()["total"]


# ---------------------------------------------------------------------- determinism
def _contents(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _shard_members(out: Path) -> dict[str, list[tuple[str, bytes]]]:
    import tarfile

    members = {}
    for shard in sorted(out.rglob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members[str(shard.relative_to(out))] = [(m.name, tar.extractfile(m).read()) for m in tar]
    return members


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset_again")
    run_stage(out)
    return out


def test_same_seed_gives_identical_tokenizer_records_and_rows(built, rebuilt):
    first, second = _contents(built[0]), _contents(rebuilt)
    assert first.keys() == second.keys()
    for name in first:
        if not name.endswith(".tar"):
            assert first[name] == second[name], name
    assert _shard_members(built[0]) == _shard_members(rebuilt)


def test_same_seed_gives_byte_identical_shards(built, rebuilt):
    first, second = _contents(built[0]), _contents(rebuilt)
    assert {k: v for k, v in first.items() if k.endswith(".tar")} == {
        k: v for k, v in second.items() if k.endswith(".tar")
    }


def test_another_seed_gives_other_data(built, tmp_path):
    run_stage(tmp_path, seed=1, max_documents=40, arithmetic_documents=40)
    assert read_jsonl(tmp_path / "tasks" / "val.jsonl") != read_jsonl(built[0] / "tasks" / "val.jsonl")


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq_len", 4),
        ("vocab_size", 200),
        ("val_fraction", 0.0),
        ("val_fraction", 0.5),
        ("rows_per_shard", 0),
        ("sft_examples", -1),
        ("eval_tasks", 10_000),
    ],
)
def test_bad_config_is_a_user_error_naming_the_field(tmp_path, field, value):
    with pytest.raises(UserError, match=rf"data\.{field}={value!r}"):
        run_stage(tmp_path, **{field: value})
    assert not any(tmp_path.iterdir())  # nothing written


def test_image_sources_need_a_vl_model_and_nothing_is_written(tmp_path):
    scenes = [*TEXT_SOURCES, data.config.SourceConfig(name="scenes", kind="scenes", weight=0.2)]
    with pytest.raises(UserError, match=r"image sources \(scenes\) but model tiny-dense has no vision encoder"):
        run_stage(tmp_path, sources=scenes)
    assert not any(tmp_path.iterdir())


def test_vocab_size_must_match_the_model(tmp_path):
    from ernie import get_preset

    ctx = StageContext("data", data.Config(**SMALL), get_preset("tiny_dense"), {}, tmp_path)
    with pytest.raises(UserError, match=r"data\.vocab_size=400 .* vocab_size=512"):
        data.run(ctx)


def test_config_fields_are_documented():
    source = Path(data.config.__file__).read_text()
    for f in dataclasses.fields(data.Config):
        assert re.search(rf"\n    {f.name}: .*\n    \"\"\"", source), f"Config.{f.name} has no docstring"


# ---------------------------------------------------------------------- packing properties
@settings(max_examples=200, deadline=None)
@given(
    seq_len=st.integers(2, 48),
    lengths=st.lists(st.integers(1, 150), min_size=0, max_size=40),
)
def test_packing_keeps_every_token_once_in_order(seq_len, lengths):
    documents = [list(range(1000 * (i + 1), 1000 * (i + 1) + n)) for i, n in enumerate(lengths)]
    doc_ids = [7 * i + 3 for i in range(len(documents))]
    packed = list(pack_documents(documents, seq_len, doc_ids))

    seen: dict[int, list[int]] = defaultdict(list)
    for row in packed:
        assert all(row[k].shape == (seq_len,) for k in ROW_FIELDS)
        ids, labels, docs, pos = row["input_ids"], row["labels"], row["document_ids"], row["position_ids"]
        real = docs != -1
        assert real.any()
        assert not (~real[:-1] & real[1:]).any()  # padding only at the tail
        assert (ids[~real] == 0).all() and (labels[~real] == -100).all()
        starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], seq_len], strict=True):
            np.testing.assert_array_equal(pos[start:end], np.arange(end - start))
            if docs[start] != -1:
                assert labels[start] == -100
                np.testing.assert_array_equal(labels[start + 1 : end], ids[start + 1 : end])
        row_docs = docs[real][np.r_[True, docs[real][1:] != docs[real][:-1]]]
        assert len(set(row_docs.tolist())) == len(row_docs)  # one piece per document per row
        for doc in row_docs.tolist():
            seen[doc] += ids[docs == doc].tolist()

    # pieces may sit in rows out of document order (gap filling, balance ordering); the token values
    # here increase along each document, so sorting restores it
    assert {d: sorted(t) for d, t in seen.items()} == {d: t for d, t in zip(doc_ids, documents, strict=True)}
    assert sum(lengths) == sum(int((r["document_ids"] != -1).sum()) for r in packed)


# ---------------------------------------------------------------------- resume
def test_a_stage_stopped_mid_run_resumes_without_duplicating_or_dropping_rows(tmp_path, monkeypatch):
    """Stopped while its third window's shards were half written, then rerun with the same work dir:
    the shards and the statistics equal an uninterrupted run's, byte for byte."""
    import ray

    from stages.data import dataflow

    options = dict(window_rows=8, rows_per_shard=4, max_documents=120, arithmetic_documents=60)
    model = get_preset("tiny_dense").replace(vocab_size=SMALL["vocab_size"])
    reference = tmp_path / "reference"
    run_stage(reference, model=model, **options)

    config = data.Config(**{**SMALL, **options})
    work = tmp_path / "work"
    real_write = dataflow.write_shards
    windows = {"written": 0}

    def dying_write(directory, rows, rows_per_shard, first_shard):
        windows["written"] += 1
        if windows["written"] == 3:  # a shard of this window reaches the disk, then the node is lost
            ray.get(real_write(directory, rows[:rows_per_shard], rows_per_shard, first_shard))
            raise RuntimeError("node lost")
        return real_write(directory, rows, rows_per_shard, first_shard)

    monkeypatch.setattr(dataflow, "write_shards", dying_write)
    with pytest.raises(RuntimeError, match="node lost"):
        data.run(StageContext("data", config, model, {}, tmp_path / "first", work_dir=work))
    progress = json.loads((work / "data" / "progress.json").read_text())
    assert 0 < progress["next_doc_id"]  # it stopped after some windows were saved
    assert progress["saves"] == 2, "the windows handed over before the failure are saved"
    second_run = {"rows": 0}

    def counting_write(directory, rows, rows_per_shard, first_shard):
        second_run["rows"] += len(rows)
        return real_write(directory, rows, rows_per_shard, first_shard)

    monkeypatch.setattr(dataflow, "write_shards", counting_write)
    data.run(StageContext("data", config, model, {}, tmp_path / "second", work_dir=work))
    assert _shard_members(tmp_path / "second") == _shard_members(reference)
    # the statistics too: a window's saved progress holds them as they were when it was packed, not as
    # they stood when its shards were on disk (by then later windows had added theirs)
    assert (tmp_path / "second" / "stats.json").read_text() == (reference / "stats.json").read_text()
    total_rows = sum(json.loads((reference / s / "index.json").read_text())["rows"] for s in SPLITS)
    assert 0 < second_run["rows"] < total_rows  # it continued; the saved windows were not written again
    assert not (work / "data").exists()  # progress is dropped once the artifact is complete
