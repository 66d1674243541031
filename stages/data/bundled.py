"""The bundled corpus (built on the machine, DESIGN §9) as raw records, plus the post-training sets.

Real text comes from the stdlib docs, generated arithmetic teaches a skill whose held-out
questions measure learning, and generated scenes (shapes, colours, positions) give images
whose captions and answers are known. Every part draws from its own seeded stream, so
changing one count never reshuffles the others.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from pipeline.formats import IMAGE_SETTINGS

from . import arithmetic, scenes
from .config import Config, SourceConfig
from .corpus import holdout_split, sample_documents
from .sources import RawRecord
from .stdlib_corpus import stdlib_documents


@dataclass
class BundledCorpus:
    records: dict[str, list[RawRecord]] = field(default_factory=dict)
    """Raw records per bundled source name."""
    sets: dict[str, list[dict]] = field(default_factory=dict)
    """Post-training and eval records by relative path (sft/, preferences/, rlvr/, tasks/)."""
    held_out: list[arithmetic.Fact] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    """Other files of the artifact by relative path (the chats' images)."""


def rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{purpose}")


def bundled_corpus(config: Config, seed: int) -> BundledCorpus:
    stdlib = sample_documents(stdlib_documents(), config.max_documents, rng(seed, "stdlib"))
    facts = arithmetic.all_facts(config.max_operand)
    seen_in_docs = arithmetic.facts_in_text("\n".join(stdlib))  # such facts can never be held out
    held_out, train_facts = arithmetic.split_facts(facts, config.eval_tasks, seen_in_docs, rng(seed, "eval"))
    corpus = BundledCorpus(held_out=held_out, sets=_post_training_sets(config, train_facts, held_out, seed))
    for source in config.sources:
        if source.kind == "stdlib":
            corpus.records[source.name] = _text_records(source, stdlib)
        elif source.kind == "arithmetic":
            texts = arithmetic.arithmetic_documents(train_facts, config.arithmetic_documents, rng(seed, "arithmetic"))
            corpus.records[source.name] = _text_records(source, texts)
        elif source.kind == "scenes":
            generated = scenes.generate_scenes(config.scenes, rng(seed, "scenes"))
            documents = scenes.scene_documents(generated, rng(seed, "scene-documents"))
            corpus.records[source.name] = [
                RawRecord(source.name, f"{source.name}:#{i}", [_segment(s) for s in doc])
                for i, doc in enumerate(documents)
            ]
            if config.scene_chats and generated:
                _add_scene_chats(corpus, config, generated, seed)
    return corpus


def _add_scene_chats(corpus: BundledCorpus, config: Config, generated: list, seed: int) -> None:
    """VQA about the corpus's own scenes with the image inline: SFT chats and RLVR prompts (task "vqa",
    the answer checked against the scene's objects), each split into train / val like the text sets,
    and the referenced images with their resize bounds."""
    for name, purpose in (("sft", "scene-sft"), ("rlvr", "scene-rlvr")):
        records = []
        for index, question, answer in scenes.scene_questions(generated, config.scene_chats, rng(seed, purpose)):
            ref = f"images/scene-{index:05d}.png"
            corpus.files[ref] = generated[index].png
            user = {"role": "user", "content": [{"type": "image", "image": ref}, {"type": "text", "text": question}]}
            if name == "sft":
                records.append({"messages": [user, {"role": "assistant", "content": answer}]})
            else:
                records.append({"task": "vqa", "prompt": [user], "answer": answer})
        train, val = holdout_split(records, config.val_fraction)
        corpus.sets[f"{name}/train.jsonl"] = corpus.sets.get(f"{name}/train.jsonl", []) + train
        corpus.sets[f"{name}/val.jsonl"] = corpus.sets.get(f"{name}/val.jsonl", []) + val
    bounds = {"min_pixels": config.image.min_pixels, "max_pixels": config.image.max_pixels}
    corpus.files[IMAGE_SETTINGS] = (json.dumps(bounds, indent=2) + "\n").encode()


def _text_records(source: SourceConfig, texts: list[str]) -> list[RawRecord]:
    unique = list(dict.fromkeys(texts))
    return [RawRecord(source.name, f"{source.name}:#{i}", [("text", text)]) for i, text in enumerate(unique)]


def _segment(segment: dict) -> tuple[str, object]:
    return ("image", segment["image"]) if segment["type"] == "image" else ("text", segment["text"])


def _post_training_sets(config: Config, train_facts, held_out, seed: int) -> dict[str, list[dict]]:
    """{relative path: records} for sft/, preferences/, rlvr/ (training facts) and tasks/ (held-out facts).

    The val splits of sft/, preferences/ and rlvr/ are held-out records of the training facts;
    held-out facts are for tasks/ only, where eval measures what generalises."""
    sft = arithmetic.sft_examples(train_facts, config.sft_examples, rng(seed, "sft"))
    preferences = arithmetic.preference_pairs(train_facts, config.preference_pairs, rng(seed, "preferences"))
    prompts = arithmetic.verifiable_prompts(train_facts, config.rlvr_prompts, rng(seed, "rlvr"))
    sets = {}
    for name, records in (("sft", sft), ("preferences", preferences), ("rlvr", prompts)):
        sets[f"{name}/train.jsonl"], sets[f"{name}/val.jsonl"] = holdout_split(records, config.val_fraction)
    sets["tasks/val.jsonl"] = arithmetic.eval_tasks(held_out, rng(seed, "tasks"))
    return sets
