"""The stage graph and which stages a run executes.

    data ──dataset──▶ pretrain ──ckpt──▶ sft ──ckpt──▶ dpo ──ckpt──▶ quantize ──qckpt──▶ serve

`posttrain.recipe` decides the post-training chain after pretrain (any of sft, dpo, upo, rlvr,
in order). Every stage also takes
the dataset (tokenizer, validation data). Stages are found through `STAGE_MODULES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from .contract import UserError

STAGE_MODULES = {
    "data": "stages.data",
    "pretrain": "stages.pretrain",
    "sft": "stages.posttrain.sft",
    "dpo": "stages.posttrain.dpo",
    "upo": "stages.posttrain.upo",
    "rlvr": "stages.posttrain.rlvr",
    "quantize": "stages.quantize",
    "serve": "stages.serve",
}
EVAL_MODULE = "stages.eval"
POSTTRAIN_METHODS = ("sft", "dpo", "upo", "rlvr")
# the config section of each stage inside `PipelineConfig`
CONFIG_PATHS = {
    "data": "data",
    "pretrain": "pretrain",
    "sft": "posttrain.sft",
    "dpo": "posttrain.dpo",
    "upo": "posttrain.upo",
    "rlvr": "posttrain.rlvr",
    "quantize": "quantize",
    "serve": "serve",
}


def stage_module(name: str) -> ModuleType:
    return importlib.import_module(STAGE_MODULES[name])


@dataclass(frozen=True)
class StageNode:
    name: str
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> upstream stage
    config_path: str = ""

    @property
    def evaluated(self) -> bool:
        """Model-producing stages are followed by the eval step."""
        return self.name in ("pretrain", "quantize") or self.name in POSTTRAIN_METHODS


def build_graph(recipe: list[str]) -> list[StageNode]:
    """Stages in execution (topological) order."""
    unknown = [m for m in recipe if m not in POSTTRAIN_METHODS]
    if unknown:
        raise UserError(
            f"posttrain.recipe={recipe} names unknown method(s) {unknown}; available: {list(POSTTRAIN_METHODS)}"
        )
    nodes = [StageNode("data", {}, "data"), StageNode("pretrain", {"dataset": "data"}, "pretrain")]
    previous = "pretrain"
    for method in recipe:
        nodes.append(StageNode(method, {"ckpt": previous, "dataset": "data"}, CONFIG_PATHS[method]))
        previous = method
    nodes.append(StageNode("quantize", {"ckpt": previous, "dataset": "data"}, "quantize"))
    nodes.append(StageNode("serve", {"model": "quantize", "dataset": "data"}, "serve"))
    return nodes


@dataclass
class Selection:
    """What the user asked to run: `stages=[..]`, `from=`, `until=`, `force=[..]`."""

    stages: list[str] | None = None
    from_stage: str | None = None
    until: str | None = None
    force: list[str] = field(default_factory=list)

    def check(self, nodes: list[StageNode]) -> None:
        names = [n.name for n in nodes]
        asked = (self.stages or []) + self.force + [s for s in (self.from_stage, self.until) if s]
        bad = [s for s in asked if s not in names]
        if bad:
            raise UserError(f"unknown stage(s) {bad} in the stage selection; this pipeline's stages are {names}")
        if self.from_stage and self.until and names.index(self.from_stage) > names.index(self.until):
            raise UserError(f"from={self.from_stage} comes after until={self.until}; nothing to run")

    def wanted(self, nodes: list[StageNode]) -> list[str]:
        """Stages the user wants to (re)consider, before adding missing upstream."""
        names = [n.name for n in nodes]
        if self.stages:
            chosen = [n for n in names if n in self.stages]
        else:
            start = names.index(self.from_stage) if self.from_stage else 0
            chosen = names[start:]
        if self.until:
            chosen = [n for n in chosen if names.index(n) <= names.index(self.until)]
        return chosen
