"""Compose, validate and shrink the pipeline configuration (Hydra + typed dataclasses).

`conf/NAME.yaml` is composed with the user's overrides through Hydra's compose API on top
of `PipelineConfig`, registered in Hydra's ConfigStore as `pipeline_schema`, so an unknown
key or a wrongly typed value fails before anything runs, with its full key path.
Cross-field rules (model consistency, tokenizer vocabulary = model vocabulary, ...) are
checked by `validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ernie import ConfigError, ErnieConfig, shrink

from .contract import LOCAL_RAY_CPUS, UserError
from .graph import POSTTRAIN_METHODS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _stage_configs():
    """The stages' config classes from their own modules, which import no torch: reading and checking a config
    (every CLI command) costs no model library."""
    from stages import data, pretrain, quantize, serve
    from stages.eval import Config as EvalConfig
    from stages.posttrain.config import DPOConfig, RLVRConfig, SFTConfig, UPOConfig

    posttrain = (SFTConfig, DPOConfig, UPOConfig, RLVRConfig)
    return data.Config, pretrain.Config, *posttrain, quantize.Config, serve.Config, EvalConfig


(
    DataConfig,
    PretrainConfig,
    SFTConfig,
    DPOConfig,
    UPOConfig,
    RLVRConfig,
    QuantizeConfig,
    ServeConfig,
    EvalConfig,
) = _stage_configs()


@dataclass
class PosttrainConfig:
    recipe: list[str] = field(default_factory=lambda: ["sft", "dpo"])
    """Post-training methods run in order after pretrain: any of sft, dpo, upo, rlvr (ERNIE text models: sft then
    dpo or upo)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    upo: UPOConfig = field(default_factory=UPOConfig)
    rlvr: RLVRConfig = field(default_factory=RLVRConfig)


@dataclass
class ArtifactsConfig:
    root: str = "runs/artifacts"
    """Where artifacts live: a local directory (relative to the working dir) or s3://bucket/prefix."""
    local_root: str = "runs/local"
    """Local working space: fetched copies of remote artifacts, staging, resume state."""


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db."""
    experiment: str = "ernie-pipeline"
    """MLflow experiment the runs are logged under (created when missing)."""
    register_model: bool = True
    """Register the served model in the MLflow model registry."""


@dataclass
class ClusterConfig:
    address: str = ""
    """Ray cluster address; empty = $RAY_ADDRESS, else a local Ray started for the run."""
    local_num_cpus: int = LOCAL_RAY_CPUS
    """Logical CPUs of the local Ray (more than the cores is fine: stages mostly wait on workers)."""
    max_cpus: float = 0.0
    """An autoscaling cluster's ceiling of CPUs (Ray autoscaler max_workers, KubeRay maxReplicas): stages are
    checked against it rather than the nodes up now, and wait while the autoscaler adds nodes; 0: the cluster as
    it is."""
    max_gpus: float = 0.0
    """The same ceiling for GPUs (a cluster at rest is often its head alone, with no GPU)."""


@dataclass
class PipelineConfig:
    name: str = "tiny"
    """The run's name (a preset sets its own); MLflow parent runs and `ls` show it."""
    seed: int = 0
    """The seed every stage gets (and part of every cache key): the same config gives the same artifacts."""
    model: ErnieConfig = field(default_factory=ErnieConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    posttrain: PosttrainConfig = field(default_factory=PosttrainConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    artifacts: ArtifactsConfig = field(default_factory=ArtifactsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def section(self, path: str):
        value = self
        for part in path.split("."):
            value = getattr(value, part)
        return value


def presets() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def compose(name: str, overrides: list[str]):
    """The composed OmegaConf config (schema-checked), or a `UserError` naming the problem."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if name not in presets():
        raise UserError(
            f"unknown preset conf={name!r}; available presets: {', '.join(presets())} (files in {CONF_DIR})"
        )
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(config_name=name, overrides=overrides)
    # Hydra raises a plain ValueError for some bad overrides (`model=0`: a group choice that is not a name)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        missing = re.match(r"Could not override '([^']+)'", str(err))
        key = missing[1] if missing else None
        why = unknown_key_reason(key) if key else None
        if why:
            raise UserError(f"bad configuration for conf={name}: unknown configuration key {key} {why}") from None
        raise UserError(f"bad configuration for conf={name}: {_one_paragraph(err)}") from None


RETIRED_KEYS = {
    "serve.prefix_cache_tokens": "prefix caching keeps prompts' blocks in the KV pool's free room now: "
    "serve.prefix_caching turns it on or off, and serve.kv_cache_tokens is its room",
}
"""Keys earlier versions had, and what took their place: said when a config still sets one."""


def unknown_key_reason(key: str) -> str | None:
    """Why `key` (dotted) is not a configuration key, with the nearest keys of its section (or what replaced it,
    for a retired key); None when the schema has it, or it lies under a free-form value (a dict, a list)."""
    value, path = PipelineConfig(), ""
    for part in key.split("."):
        if not dataclasses.is_dataclass(value):
            return None
        names = [f.name for f in dataclasses.fields(value)]
        if part not in names:
            section = path.rstrip(".") or "the top level"
            message = f"({section} has no key {part!r})"
            if key in RETIRED_KEYS:
                return f"{message}; {RETIRED_KEYS[key]}"
            near = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
            if near:
                return f"{message}; did you mean {' or '.join(path + n for n in near)}?"
            return f"{message}; {section} has {', '.join(sorted(names))}"
        value, path = getattr(value, part), f"{path}{part}."
    return None


def _one_paragraph(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text.replace(" full_key:", "; key:").replace(" object_type=", "; in ")


def load(name: str, overrides: list[str], dry_run: bool = False) -> PipelineConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    composed = compose(name, overrides)
    try:
        cfg: PipelineConfig = OmegaConf.to_object(composed)
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        raise UserError(f"bad configuration for conf={name}: {_one_paragraph(err)}") from None
    check_known_keys(cfg)
    if dry_run:
        cfg = shrink_for_dry_run(cfg, overrides)
    validate(cfg)
    return cfg


def check_known_keys(value, path: str = "") -> None:
    """Refuse keys no schema declares. Hydra's `+key=value` adds a key even under a structured
    config, and `to_object` then sets it as a stray attribute: a typo would pass silently."""
    if dataclasses.is_dataclass(value):
        declared = {f.name for f in dataclasses.fields(value)}
        stray = sorted(set(getattr(value, "__dict__", {})) - declared)
        if stray:
            key = f"{path}{stray[0]}"
            why = unknown_key_reason(key) or f"({type(value).__name__} has no field {stray[0]!r})"
            raise UserError(
                f"unknown configuration key {key} {why}. An override starting with + adds a key no schema declares"
            )
        for name in declared:
            check_known_keys(getattr(value, name), f"{path}{name}.")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_known_keys(item, f"{path.rstrip('.')}[{i}].")


def to_yaml(cfg: PipelineConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def validate(cfg: PipelineConfig) -> None:
    """Cross-field rules; a violation names the key path and the value."""
    try:
        cfg.model.validate()
    except ConfigError as err:
        raise UserError(f"bad configuration: {err}") from None
    if cfg.data.vocab_size != cfg.model.vocab_size:
        raise UserError(
            f"data.vocab_size={cfg.data.vocab_size} must equal model.vocab_size={cfg.model.vocab_size} "
            "(the tokenizer the data stage trains is the model's vocabulary)"
        )
    cfg.data.check_model(cfg.model)
    posttrain = [f"posttrain.{m}" for m in POSTTRAIN_METHODS]
    for path in ("data", "pretrain", *posttrain, "quantize", "serve", "eval"):
        section = cfg.section(path)
        if hasattr(section, "validate"):  # each stage's own rules, raising UserError with its key path
            if path.startswith("posttrain."):
                section.validate(path.split(".")[-1])
            else:
                section.validate()
    import stages.quantize
    import stages.serve

    stages.quantize.validate(cfg.quantize)
    stages.serve.validate(cfg.serve)
    bad = [m for m in cfg.posttrain.recipe if m not in POSTTRAIN_METHODS]
    if bad:
        raise UserError(
            f"posttrain.recipe={cfg.posttrain.recipe} has unknown method(s) {bad}; known: {list(POSTTRAIN_METHODS)}"
        )
    repeated = sorted({m for m in cfg.posttrain.recipe if cfg.posttrain.recipe.count(m) > 1})
    if repeated:
        raise UserError(
            f"posttrain.recipe={cfg.posttrain.recipe} names {repeated} twice; each method is one stage of the graph"
        )
    group = cfg.quantize.group_size
    widths = {"model.hidden_size": cfg.model.hidden_size, "model.intermediate_size": cfg.model.intermediate_size}
    if cfg.model.moe is not None:
        widths["model.moe.intermediate_size"] = cfg.model.moe.intermediate_size
        if cfg.model.vision is not None:
            widths["model.moe.vision_intermediate_size"] = cfg.model.moe.vision_intermediate_size
    for key, width in widths.items():
        if width % group:
            raise UserError(f"quantize.group_size={group} must divide {key}={width} (the quantized input width)")


def shrink_for_dry_run(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """Same stage graph and settings, tiny same-family model and the tiny preset's data and steps."""
    tiny = load("tiny", [o for o in overrides if not o.startswith("model.")])
    model = shrink(cfg.model).replace(vocab_size=tiny.data.vocab_size)
    posttrain = dataclasses.replace(tiny.posttrain, recipe=cfg.posttrain.recipe)
    from stages.data.config import IMAGE_KINDS

    data = tiny.data
    if model.vision is None:  # a text model rehearses on the tiny mixture's text sources
        data = dataclasses.replace(data, sources=[s for s in data.sources if s.kind not in IMAGE_KINDS])
    return dataclasses.replace(
        cfg,
        model=model,
        data=data,
        pretrain=tiny.pretrain,
        posttrain=posttrain,
        quantize=dataclasses.replace(tiny.quantize, bits=cfg.quantize.bits, method=cfg.quantize.method),
        serve=tiny.serve,
        eval=tiny.eval,
        cluster=tiny.cluster,
    )
