"""Generated arithmetic: the part of the bundled data whose answers are known exactly.

A tiny model can learn small additions and subtractions, so this is where pretraining,
SFT and DPO show a measurable effect. Every statement is a `Fact` (op, a, b). Facts are
split once into *held-out* facts, used only as eval tasks, and *training* facts, the only
ones the corpus, SFT and preference data are generated from. Every corpus line spells its
fact as "a + b = c" (word problems too), so a regex over the pretraining text can prove
that no eval fact leaked in.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pipeline.contract import UserError

SYMBOLS = {"add": "+", "sub": "-"}
QUESTION_TEMPLATES = ("What is {expr}?", "Compute {expr}.", "Calculate {expr}.", "{expr} = ?")
NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Juno", "Kofi", "Lena")
ITEMS = (("apple", "apples"), ("marble", "marbles"), ("book", "books"), ("coin", "coins"), ("shell", "shells"))
_EXPRESSION = re.compile(r"(?<![\d.])(\d+) *([+-]) *(\d+)(?![\d.])")


@dataclass(frozen=True, order=True)
class Fact:
    """One arithmetic fact: `a op b`; subtraction keeps a >= b so answers stay non-negative."""

    op: str
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "add" else self.a - self.b

    @property
    def expression(self) -> str:
        return f"{self.a} {SYMBOLS[self.op]} {self.b}"


def all_facts(max_operand: int) -> list[Fact]:
    """Every addition and non-negative subtraction with operands in [0, max_operand]."""
    numbers = range(max_operand + 1)
    adds = [Fact("add", a, b) for a in numbers for b in numbers]
    subs = [Fact("sub", a, b) for a in numbers for b in numbers if a >= b]
    return adds + subs


def facts_in_text(text: str) -> set[Fact]:
    """Facts written as "a + b" / "a - b" anywhere in `text` (used to keep eval facts unseen)."""
    return {Fact("add" if sym == "+" else "sub", int(a), int(b)) for a, sym, b in _EXPRESSION.findall(text)}


def split_facts(facts: list[Fact], n_eval: int, seen: set[Fact], rng: random.Random) -> tuple[list[Fact], list[Fact]]:
    """(held-out eval facts, training facts). Facts already in `seen` text never go to eval.

    The eval facts are spread evenly over the operations so both tasks get a score.
    """
    candidates = {op: [f for f in facts if f.op == op and f not in seen] for op in SYMBOLS}
    available = sum(len(c) for c in candidates.values())
    if n_eval > available // 2:
        raise UserError(
            f"data.eval_tasks={n_eval} is too many: only {available} arithmetic facts with operands up to "
            f"max_operand can be held out and at least half must stay for training; lower eval_tasks "
            f"or raise data.max_operand"
        )
    held_out: set[Fact] = set()
    for i, op in enumerate(SYMBOLS):
        k = n_eval // len(SYMBOLS) + (1 if i < n_eval % len(SYMBOLS) else 0)
        held_out.update(rng.sample(candidates[op], min(k, len(candidates[op]))))
    while len(held_out) < n_eval:  # one operation ran short: take the rest from any
        held_out.add(rng.choice([f for c in candidates.values() for f in c if f not in held_out]))
    return sorted(held_out), [f for f in facts if f not in held_out]


# ---------------------------------------------------------------------- pretraining text
def arithmetic_documents(facts: list[Fact], n: int, rng: random.Random) -> list[str]:
    """`n` short documents, each a few statements, Q/A lines and word problems."""
    writers = (_statement, _statement, _question_answer, _word_problem)
    return ["\n".join(rng.choice(writers)(rng.choice(facts), rng) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def _statement(fact: Fact, rng: random.Random) -> str:
    return f"{fact.expression} = {fact.answer}."


def _question_answer(fact: Fact, rng: random.Random) -> str:
    return f"Question: {question(fact, rng)} Answer: {fact.answer}."


def _word_problem(fact: Fact, rng: random.Random) -> str:
    name, (one, many) = rng.choice(NAMES), rng.choice(ITEMS)
    noun = lambda k: one if k == 1 else many
    if fact.op == "add":
        story = f"{name} has {fact.a} {noun(fact.a)} and gets {fact.b} more."
        return f"{story} Now {name} has {fact.expression} = {fact.answer} {noun(fact.answer)}."
    story = f"{name} has {fact.a} {noun(fact.a)} and gives away {fact.b}."
    return f"{story} Now {name} has {fact.expression} = {fact.answer} {noun(fact.answer)} left."


def question(fact: Fact, rng: random.Random) -> str:
    return rng.choice(QUESTION_TEMPLATES).format(expr=fact.expression)


# ---------------------------------------------------------------------- post-training sets
def sft_examples(facts: list[Fact], n: int, rng: random.Random) -> list[dict]:
    """Chats where the user asks and the assistant answers with the number.

    One in four also carries `reasoning_content` (rendered as a <think> block), so the
    thinking mode of the chat template is exercised too.
    """
    examples = []
    for _ in range(n):
        fact = rng.choice(facts)
        reply: dict = {"role": "assistant", "content": str(fact.answer)}
        if rng.random() < 0.25:
            reply["reasoning_content"] = f"{fact.expression} = {fact.answer}."
        examples.append({"messages": [{"role": "user", "content": question(fact, rng)}, reply]})
    return examples


def preference_pairs(facts: list[Fact], n: int, rng: random.Random) -> list[dict]:
    """Same prompts as SFT; chosen is the right answer, rejected a plausible wrong one."""
    pairs = []
    for _ in range(n):
        fact = rng.choice(facts)
        pairs.append(
            {
                "prompt": [{"role": "user", "content": question(fact, rng)}],
                "chosen": str(fact.answer),
                "rejected": str(plausible_wrong_answer(fact, rng)),
            }
        )
    return pairs


def verifiable_prompts(facts: list[Fact], n: int, rng: random.Random) -> list[dict]:
    """Questions in the SFT prompt style with their exact answers, for RL with verifiable rewards."""
    records = []
    for _ in range(n):
        fact = rng.choice(facts)
        records.append(
            {"task": fact.op, "prompt": [{"role": "user", "content": question(fact, rng)}], "answer": str(fact.answer)}
        )
    return records


def plausible_wrong_answer(fact: Fact, rng: random.Random) -> int:
    """An off-by-one / off-by-ten slip, or the other operation's result: never the answer."""
    other = fact.a - fact.b if fact.op == "add" else fact.a + fact.b
    options = {fact.answer + d for d in (-10, -2, -1, 1, 2, 10)} | {other}
    return rng.choice(sorted(x for x in options if x >= 0 and x != fact.answer))


def eval_tasks(held_out: list[Fact], rng: random.Random) -> list[dict]:
    """Held-out questions with the exact answer string, in the SFT prompt style."""
    tasks = [
        {"task": f.op, "prompt": [{"role": "user", "content": question(f, rng)}], "answer": str(f.answer)}
        for f in held_out
    ]
    rng.shuffle(tasks)
    return tasks
