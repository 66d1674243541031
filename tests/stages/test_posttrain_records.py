"""Bad post-training records are refused with the file, line and reason named."""

from __future__ import annotations

import json

import pytest

from pipeline.contract import UserError
from stages.data.tokenizer import train_tokenizer
from stages.posttrain.dpo import tokenise_pairs
from stages.posttrain.sft import tokenise_file

TEXTS = ["what is two plus two", "four", "the answer is four", "five", "hello there"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 300)


def write(path, records) -> object:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(question: str, answer: str | None) -> dict:
    messages = [{"role": "user", "content": question}]
    return {"messages": messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])}


def test_good_records_tokenise(tokenizer, tmp_path):
    assert len(tokenise_file(tokenizer, write(tmp_path / "sft.jsonl", [chat("two plus two", "four")]), 64)) == 1
    pair = {"prompt": [{"role": "user", "content": "two plus two"}], "chosen": "four", "rejected": "five"}
    assert len(tokenise_pairs(tokenizer, write(tmp_path / "pref.jsonl", [pair]), 64)) == 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (chat("two plus two", None), "line 2: the chat has no assistant turn"),
        ({"messages": [{"role": "robot", "content": "beep"}]}, "line 2: not a chat record .*role 'robot'"),
        ({"text": "no messages"}, "line 2: not a chat record"),
    ],
)
def test_malformed_chats_are_named(tokenizer, tmp_path, record, message):
    path = write(tmp_path / "sft.jsonl", [chat("two plus two", "four"), record])
    with pytest.raises(UserError, match=message):
        tokenise_file(tokenizer, path, 64)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": [{"role": "user", "content": "hi"}], "chosen": "four", "rejected": "four"}, "line 2: .*the same"),
        ({"prompt": [{"role": "user", "content": "hi"}], "chosen": "four"}, "line 2: not a preference record"),
    ],
)
def test_malformed_pairs_are_named(tokenizer, tmp_path, record, message):
    good = {"prompt": [{"role": "user", "content": "two plus two"}], "chosen": "four", "rejected": "five"}
    with pytest.raises(UserError, match=message):
        tokenise_pairs(tokenizer, write(tmp_path / "pref.jsonl", [good, record]), 64)
