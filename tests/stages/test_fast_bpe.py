"""The data stage's tiktoken encoder gives exactly HF tokenizers' ids for the bundled BPE."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from ernie.chat_template import SPECIAL_TOKENS
from stages.data.encode import EncodeSpec, encode_records, table_documents
from stages.data.fast_bpe import close_merges, fast_encoder, is_closed
from stages.data.sources import RawRecord
from stages.data.stdlib_corpus import stdlib_documents
from stages.data.tokenizer import BOS_ID, EOS_ID, train_bpe, train_tokenizer

FRAGMENTS = [
    " ",
    "  ",
    "\n",
    "\t",
    " \n ",
    "42",
    " 7",
    "3.14",
    "x=10",
    "don't",
    "it's",
    "'ll",
    "Ünïcödé",
    "日本語",
    "٣٤",  # Arabic-Indic digits: numeric, so split one per piece like ASCII digits
    "½",
    "def f(a, b):",
    "-->",
    "😀",
    *SPECIAL_TOKENS,
]


@pytest.fixture(scope="module")
def bundled() -> tuple[Tokenizer, object]:
    tokenizer = train_tokenizer(stdlib_documents()[:400], 512)
    encode = fast_encoder(tokenizer.to_str())
    assert encode is not None, "the bundled BPE must take the tiktoken path"
    return tokenizer, encode


def hf_ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def test_same_ids_as_hf_on_the_corpus(bundled):
    tokenizer, encode = bundled
    texts = stdlib_documents()[400:1400]  # documents the BPE did not train on, too
    fast = encode(texts)
    assert all(ids.dtype == np.int32 for ids in fast)
    assert [ids.tolist() for ids in fast] == hf_ids(tokenizer, texts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)),
        max_size=20,
    ).map("".join)
)
def test_same_ids_as_hf_on_any_text(bundled, text):
    tokenizer, encode = bundled
    assert encode([text])[0].tolist() == hf_ids(tokenizer, [text])[0]


def test_trained_bpe_is_closed_and_closing_again_changes_nothing(bundled):
    tokenizer, _ = bundled
    spec = json.loads(tokenizer.to_str())
    assert is_closed(spec)
    assert json.loads(close_merges(tokenizer.to_str()))["model"]["merges"] == spec["model"]["merges"]


def test_closing_keeps_every_trained_merge():
    raw = train_bpe(stdlib_documents()[:200], 400, min_frequency=0)
    trained = [tuple(m) for m in json.loads(raw.to_str())["model"]["merges"]]
    closed = {tuple(m) for m in json.loads(close_merges(raw.to_str()))["model"]["merges"]}
    assert set(trained) <= closed and len(closed) >= len(trained)


def test_other_tokenizers_keep_hf_tokenizers():
    raw = train_bpe(stdlib_documents()[:200], 400, min_frequency=0)
    assert fast_encoder(raw.to_str()) is None, "merges not closed: tiktoken could merge differently"
    spec = json.loads(close_merges(raw.to_str()))
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert fast_encoder(json.dumps(spec)) is None, "another pre-tokenizer: the regex would not match it"


def test_encode_records_gives_hf_ids_with_bos_and_eos(bundled):
    tokenizer, _ = bundled
    texts = ["a plain line", "numbers 12 and 345", "tabs\tand  spaces"]
    records = [RawRecord(source="s", key=f"k{i}", segments=[("text", t)]) for i, t in enumerate(texts)]
    spec = EncodeSpec.build(tokenizer.to_str(), None, 56 * 56, 112 * 112, 0.0)
    docs = [doc for _, (_, doc) in table_documents(encode_records(records, spec))]
    assert [d.tokens.tolist() for d in docs] == [[BOS_ID, *ids, EOS_ID] for ids in hf_ids(tokenizer, texts)]
    assert [d.source for d in docs] == ["s"] * 3
