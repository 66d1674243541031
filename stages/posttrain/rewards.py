"""Verifiable rewards for RLVR and UPO: `reward(completion, record) -> float`.

`completion` is the generated text as decoded (special tokens kept), so a reward can see
whether the model closed its think block and ended with the end-of-sentence token;
`record` is the prompt's jsonl record (`answer`, `task`, ...). Config names rewards by
dotted path (`posttrain.rlvr.rewards=[stages.posttrain.rewards.exact_match, my_pkg.mod.fn]`);
a bare name means a function of this module.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from ernie.chat_template import EOS, THINK_CLOSE, THINK_OPEN
from pipeline.contract import UserError

Reward = Callable[[str, dict], float]
_INTEGER = re.compile(r"-?\d+")


def final_answer(completion: str) -> str:
    """The answer part: after the last `</think>` if there is one, before the end-of-sentence token, stripped."""
    text = completion.split(EOS)[0]
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    return text.strip()


def exact_match(completion: str, record: dict) -> float:
    """1 when the final answer is the record's answer exactly (after stripping), else 0."""
    return float(final_answer(completion) == str(record["answer"]).strip())


def numeric_closeness(completion: str, record: dict) -> float:
    """1 / (1 + |guess - answer|) when the final answer and the record's are integers, else 0: partial
    credit for near misses."""
    guess, answer = final_answer(completion), str(record["answer"]).strip()
    if not (_INTEGER.fullmatch(guess) and _INTEGER.fullmatch(answer)):  # a word answer (VQA) has no distance
        return 0.0
    return 1.0 / (1.0 + abs(int(guess) - int(answer)))


def well_formed(completion: str, record: dict) -> float:
    """1 when the completion ends with the end-of-sentence token, closes any think block it
    opened, and leaves a non-empty answer; else 0."""
    body, ended, _ = completion.partition(EOS)
    if not ended or not final_answer(body):
        return 0.0
    opened = body.count(THINK_OPEN)
    return float(body.count(THINK_CLOSE) >= opened)


def resolve(paths: list[str], setting: str) -> list[Reward]:
    """The reward functions named by `paths`; a path that does not import names `setting[i]` in a `UserError`."""
    if not paths:
        raise UserError(f"{setting} is empty: name at least one reward function")
    functions = []
    for i, path in enumerate(paths):
        module_name, _, name = str(path).rpartition(".")
        where = f"{setting}[{i}]={path!r}"
        try:
            module = importlib.import_module(module_name or __name__)
        except ImportError as err:
            raise UserError(f"{where}: cannot import module {module_name!r} ({err})") from None
        function = getattr(module, name, None)
        if not callable(function):
            raise UserError(f"{where}: module {module.__name__!r} has no function {name!r}")
        functions.append(function)
    return functions


def score(functions: list[Reward], weights: list[float], completion: str, record: dict) -> float:
    """The weighted sum of the rewards of one completion."""
    return float(sum(w * float(f(completion, record)) for f, w in zip(functions, weights, strict=True)))
