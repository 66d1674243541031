"""Acceptance: SFT raises held-out exact match over the pretrained model (tiny preset, one rank each).

From one pretrained checkpoint, with fixed seeds (`sft_facts_data`): pretraining text states the
155 single-digit additions and subtractions many times, so the tiny model memorises them; SFT
chats cover part of the facts; tasks/val.jsonl holds facts that are in pretraining text but in
no SFT chat. The eval stage's own `evaluate` scores exact match on them:

- the pretrained model knows the held-out facts in text form, yet answers no chat prompt exactly;
- SFT answers a large share of them: it turned pretrained knowledge into chat answers;
- SFT on the same chats with the answers shuffled across the questions learns the chat format as
  well, but not the facts: it stays far below. An implementation that did not train on the
  assistant's answers (wrong mask or labels) would score the same on both, or low on both.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from sft_facts_data import HELD_OUT, SMALL_FACTS, TEXT_FORMATS, build_dataset, split_facts
from stage_runs import local_ray, make_ctx
from tokenizers import Tokenizer

from ernie import get_preset
from ernie.checkpoint import load_pretrained
from ernie.generation import generate
from pipeline.formats import TOKENIZER_FILE, read_jsonl
from pipeline.shards import iter_rows
from stages import eval as eval_stage
from stages import pretrain
from stages.posttrain import sft

PRESET = "tiny_moe"
PRETRAIN = dict(
    steps=600,
    batch_size=8,
    lr=3e-3,
    warmup_steps=5,
    eval_every=600,
    checkpoint_every=600,
    router_stats_every=600,
    eval_rows=8,
    num_workers=0,
    cpus_per_worker=2,
)
SFT = dict(steps=300, batch_size=16, lr=1e-3, eval_every=300, checkpoint_every=300, num_workers=0, cpus_per_worker=2)
EVAL = eval_stage.Config(max_rows=8, max_items=0, num_examples=8)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_local():
    yield from local_ray()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """The artifact, and the same artifact with the SFT answers shuffled across the questions."""
    return {
        "real": build_dataset(tmp_path_factory.mktemp("facts")),
        "scrambled": build_dataset(tmp_path_factory.mktemp("facts-scrambled"), scramble_answers=True),
    }


@pytest.fixture(scope="module")
def tokenizer(datasets) -> Tokenizer:
    return Tokenizer.from_file(str(datasets["real"] / TOKENIZER_FILE))


@pytest.fixture(scope="module")
def pretrained(ray_local, datasets, tokenizer, tmp_path_factory) -> Path:
    model = get_preset(PRESET).replace(vocab_size=tokenizer.get_vocab_size())
    ctx = make_ctx(
        "pretrain", pretrain.Config(**PRETRAIN), model, {"dataset": datasets["real"]}, tmp_path_factory.mktemp("pre")
    )
    started = time.perf_counter()
    result = pretrain.run(ctx)
    print(f"\npretrain {time.perf_counter() - started:.1f}s: {result.summary}")
    return ctx.output_dir


@pytest.fixture(scope="module")
def tuned(pretrained, datasets, tmp_path_factory) -> dict[str, Path]:
    """SFT from the pretrained checkpoint on the real chats and on the scrambled ones."""
    out = {}
    for name, dataset in datasets.items():
        ctx = make_ctx(
            "sft", sft.Config(**SFT), None, {"ckpt": pretrained, "dataset": dataset}, tmp_path_factory.mktemp(name)
        )
        started = time.perf_counter()
        result = sft.run(ctx)
        print(f"\nsft ({name}) {time.perf_counter() - started:.1f}s: {result.summary}")
        out[name] = ctx.output_dir
    return out


def exact_match(ckpt: Path, tokenizer: Tokenizer, dataset: Path) -> float:
    """The eval stage's task accuracy on every held-out item."""
    metrics, details = eval_stage.evaluate(load_pretrained(ckpt).eval(), tokenizer, dataset, EVAL)
    print(f"{ckpt.parent.name}: exact match {metrics['task_accuracy']:.3f}, e.g. {details['examples'][:3]}")
    return metrics["task_accuracy"]


@torch.no_grad()
def text_recall(ckpt: Path, tokenizer: Tokenizer, dataset: Path) -> float:
    """Share of the held-out facts the model completes in pretraining's question format (greedy)."""
    model = load_pretrained(ckpt).eval()
    items = read_jsonl(dataset / "tasks" / "val.jsonl")
    correct = 0
    for item in items:
        prompt = f"Question: {item['prompt'][-1]['content']} Answer:"
        ids = [model.config.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False).ids]
        new = generate(model, torch.tensor([ids]), max_new_tokens=4, eos_token_id=model.config.eos_token_id)
        correct += tokenizer.decode(new[0].tolist()).split(".")[0].strip() == item["answer"]
    return correct / len(items)


@pytest.fixture(scope="module")
def accuracies(pretrained, tuned, datasets, tokenizer) -> dict[str, float]:
    real = datasets["real"]  # every model is scored on the same held-out items
    acc = {
        "pretrained_text_recall": text_recall(pretrained, tokenizer, real),
        "pretrained": exact_match(pretrained, tokenizer, real),
        "sft": exact_match(tuned["real"], tokenizer, real),
        "sft_scrambled": exact_match(tuned["scrambled"], tokenizer, real),
    }
    print("held-out exact match: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return acc


# ---------------------------------------------------------------------- the dataset
def _facts_in(text: str) -> set[tuple[int, str, int, int]]:
    stated = ({form.format(a=a, op=op, b=b, c=c) for form in TEXT_FORMATS} for a, op, b, c in SMALL_FACTS)
    return {fact for fact, forms in zip(SMALL_FACTS, stated, strict=True) if any(s in text for s in forms)}


def test_held_out_facts_are_in_pretraining_text_and_in_no_sft_chat(datasets, tokenizer):
    real, scrambled = datasets["real"], datasets["scrambled"]
    text = "\n".join(tokenizer.decode(row["input_ids"].tolist()) for row in iter_rows(real / "train"))
    assert _facts_in(text) == set(SMALL_FACTS), "pretraining text states every fact"
    sft_train, sft_val, held = split_facts()
    questions = {
        r["messages"][0]["content"] for split in ("train", "val") for r in read_jsonl(real / "sft" / f"{split}.jsonl")
    }
    tasks = read_jsonl(real / "tasks" / "val.jsonl")
    assert len(tasks) == len(held) == HELD_OUT and {t["task"] for t in tasks} == {"add", "sub"}
    assert not questions & {t["prompt"][-1]["content"] for t in tasks}, "a held-out fact is in an SFT chat"
    assert len(questions) == len(sft_train) + len(sft_val)
    # the control differs in the pairing of the SFT train answers only
    ours, theirs = (read_jsonl(d / "sft" / "train.jsonl") for d in (real, scrambled))
    assert [r["messages"][0] for r in ours] == [r["messages"][0] for r in theirs]
    answers = [[r["messages"][1]["content"] for r in rs] for rs in (ours, theirs)]
    assert sorted(answers[0]) == sorted(answers[1])
    assert sum(x != y for x, y in zip(*answers, strict=True)) > 0.8 * len(ours)
    for name in ("sft/val.jsonl", "tasks/val.jsonl", TOKENIZER_FILE):
        assert (real / name).read_bytes() == (scrambled / name).read_bytes(), name


# ---------------------------------------------------------------------- the acceptance
@pytest.mark.slow
def test_sft_raises_held_out_exact_match_over_the_pretrained_model(accuracies):
    acc = accuracies
    assert acc["pretrained_text_recall"] >= 0.8, f"pretraining did not teach the facts the test relies on: {acc}"
    assert acc["pretrained"] <= 0.05, acc
    assert acc["sft"] >= 0.3, acc
    assert acc["sft"] - acc["pretrained"] >= 0.25, acc


@pytest.mark.slow
def test_sft_on_scrambled_answers_does_not_reach_it(accuracies):
    """Same chats, same answer distribution, wrong question-answer pairing: the format alone scores low."""
    acc = accuracies
    assert acc["sft_scrambled"] <= 0.15, acc
    assert acc["sft"] - acc["sft_scrambled"] >= 0.25, acc
