"""Stage selection (stages / from / until / force) and content-addressed cache keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.contract import UserError
from pipeline.graph import Selection, build_graph
from pipeline.store import cache_key

NODES = build_graph(["sft", "dpo"])
NAMES = [n.name for n in NODES]


def test_default_graph_order_and_edges():
    assert NAMES == ["data", "pretrain", "sft", "dpo", "quantize", "serve"]
    edges = {n.name: n.inputs for n in NODES}
    assert edges["sft"] == {"ckpt": "pretrain", "dataset": "data"}
    assert edges["quantize"] == {"ckpt": "dpo", "dataset": "data"}
    assert edges["serve"] == {"model": "quantize", "dataset": "data"}


def test_recipe_changes_the_chain():
    names = [n.name for n in build_graph(["sft"])]
    assert names == ["data", "pretrain", "sft", "quantize", "serve"]
    with pytest.raises(UserError, match="unknown method"):
        build_graph(["sft", "ppo"])


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (Selection(), NAMES),
        (Selection(stages=["quantize"]), ["quantize"]),
        (Selection(from_stage="sft"), ["sft", "dpo", "quantize", "serve"]),
        (Selection(until="pretrain"), ["data", "pretrain"]),
        (Selection(from_stage="sft", until="dpo"), ["sft", "dpo"]),
        (Selection(stages=["dpo", "serve"], until="quantize"), ["dpo"]),
    ],
)
def test_selection_picks_the_stages_asked_for(selection, expected):
    selection.check(NODES)
    assert selection.wanted(NODES) == expected


@pytest.mark.parametrize(
    "selection",
    [
        Selection(stages=["nope"]),
        Selection(from_stage="x"),
        Selection(force=["y"]),
        Selection(from_stage="serve", until="data"),
    ],
)
def test_bad_selection_is_refused(selection):
    with pytest.raises(UserError):
        selection.check(NODES)


def _key(**changes):
    base = {"stage": "quantize", "config": {"bits": 4, "group_size": 32}, "code": "abc", "inputs": {"ckpt": "k1"}}
    base.update(changes)
    return cache_key(base["stage"], base["config"], base["code"], base["inputs"])


def test_key_changes_with_each_ingredient():
    base = _key()
    assert _key() == base
    assert _key(stage="serve") != base
    assert _key(config={"bits": 2, "group_size": 32}) != base
    assert _key(code="abd") != base
    assert _key(inputs={"ckpt": "k2"}) != base


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.integers(), max_size=6))
def test_key_ignores_dict_order(config):
    reordered = dict(reversed(list(config.items())))
    assert cache_key("s", config, "c", {}) == cache_key("s", reordered, "c", {})


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.integers(), min_size=1, max_size=6), st.data())
def test_key_changes_when_any_value_changes(config, data):
    name = data.draw(st.sampled_from(sorted(config)))
    changed = {**config, name: config[name] + 1}
    assert cache_key("s", config, "c", {}) != cache_key("s", changed, "c", {})


def test_training_keys_ignore_operational_settings_and_follow_the_rest(tmp_path):
    """More workers, other resources or another checkpoint cadence keep a training stage's key (its
    artifact is reused, its train state resumed); a setting that changes the weights does not."""
    from pipeline.config import load
    from pipeline.graph import Selection
    from pipeline.runner import make_store, plan_stages

    def keys(*overrides: str) -> dict[str, str]:
        cfg = load("tiny", [f"artifacts.root={tmp_path}", *overrides])
        return {p.node.name: p.key for p in plan_stages(cfg, make_store(cfg), Selection())}

    base = keys()
    operational = keys("pretrain.num_workers=1", "pretrain.checkpoint_every=7", "pretrain.expert_parallel=1")
    assert operational == base
    changed = keys("pretrain.lr=0.01")
    assert changed["data"] == base["data"] and changed["pretrain"] != base["pretrain"]
    assert changed["sft"] != base["sft"], "downstream keys follow their inputs"
