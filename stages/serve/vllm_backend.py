"""vLLM backend of the serve stage (`serve.backend=vllm`): the exported checkpoint behind Ray Serve LLM.

Our own engine (`serve.backend=engine`, stages/serve/app.py) runs everywhere, CPU included. This backend hands
the model to vLLM engines through Ray Serve LLM instead (`ray.serve.llm`: `LLMConfig`, `build_openai_app`, and
`build_pd_openai_app` for prefill/decode disaggregation with a KV connector), for GPU clusters. It serves:

- a qckpt's vLLM export: `<qckpt>/export-gptq/` or `<qckpt>/export-compressed-tensors/` (stages/quantize/export.py;
  vLLM cannot read our own packed format), or
- a ckpt in the HF layout (`config.json` + safetensors), in bf16.

vLLM is not installed on CPU machines (it needs CUDA), so only the configuration building and the preflight run
there (tests/stages/test_serve_vllm_backend.py); `deploy` runs only where vLLM is installed, and has not been run
on a GPU in this project yet. `preflight` refuses, before anything is deployed, what would fail (or serve wrong
weights) on the cluster: no vLLM, a vLLM older than `min_vllm_version`, an unknown KV connector, parallel settings
the model cannot be split by, more GPUs than the cluster has, an architecture vLLM does not run as ERNIE 4.5, and
exports vLLM's kernels cannot run correctly. Where each rule comes from: docs/serving_vllm.md.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import importlib.util
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ernie.config import ConfigError
from ernie.hf_config import from_hf_config
from pipeline.contract import UserError

# ---------------------------------------------------------------------------------------------- facts
MIN_VLLM_VERSION = "0.29.0"
"""The oldest vLLM this backend accepts. Sources (docs/serving_vllm.md has the list):
- Ray 2.60's `ray[llm]` extra pins `vllm[audio]==0.29.0` (ray-2.60.0.dist-info/METADATA, installed here; read at
  run time by `ray_vllm_pin`), and Ray Serve LLM 2.60 imports vLLM modules of that line
  (ray/llm/_internal/serve/engines/vllm/vllm_models.py: `vllm.entrypoints.launchers.cli_args`), so an older vLLM
  does not run under this Ray at all.
- ERNIE 4.5 dense and MoE reached vLLM in PR #20220 (merged 2025-07), followed by MoE fixes that all predate 0.29:
  shared experts #21717 (2025-07-28), a load failure #26684 (2025-10-13), MoE without shared experts (the 300B)
  #27316 (2025-10-22); ERNIE 4.5 VL came with #22514 (vLLM recipes: "vLLM 0.11.0+"); GPTQ v2 zero points
  (our asymmetric exports) #26092 (2025-10); NixlConnector, vLLM's V1 KV connector, is older still (#17751).
The stored sources give PR merge dates, not release tags, so the first release with all of them is not pinned
down exactly; 0.29.0 is the first we can vouch for under Ray 2.60."""

VLLM_ARCHITECTURES = {
    "Ernie4_5ForCausalLM": "dense",
    "Ernie4_5_MoeForCausalLM": "moe",
    "Ernie4_5_VLMoeForConditionalGeneration": "vl_moe",
}
"""config.json `architectures` vLLM runs as ERNIE 4.5 (vllm/model_executor/models/registry.py:
`_TEXT_GENERATION_MODELS`, `_MULTIMODAL_MODELS`); the family our `ernie.hf_config` gives each."""

KV_CONNECTORS = ("NixlConnector", "LMCacheConnectorV1")
"""KV connectors `serve.vllm.kv_connector` may name: the two Ray Serve LLM documents for prefill/decode
disaggregation (docs.ray.io serve/llm prefill-decode guide). Preflight also checks that this Ray registers it
(`BUILTIN_BACKENDS` of ray/llm/_internal/serve/engines/vllm/kv_transfer/factory.py) and, where vLLM is installed,
that vLLM's `KVConnectorFactory` knows it."""

EXPORT_DIRS = {"gptq": "export-gptq", "compressed-tensors": "export-compressed-tensors"}
"""Where the quantize stage writes its vLLM exports inside a qckpt (stages/quantize/stage.py)."""
QCKPT_MARKER = "quant_config.json"
"""A qckpt holds it (our packed format), a ckpt does not (the serve stage tells them apart by it)."""

GPTQ_LINEAR_BITS = (2, 3, 4, 8)
"""Code widths vLLM's GPTQ linear kernels run (`gptq`; `gptq_marlin` only 4 and 8, symmetric)."""
MOE_EXPERT_BITS = (4, 8)
"""Code widths vLLM's fused-MoE kernels run for GPTQ experts: Marlin MoE (4/8-bit symmetric) and its fallback
`moe_wna16` (vllm/model_executor/layers/quantization/moe_wna16.py: `is_moe_wna16_compatible`, bits in [4, 8])."""
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
"""Group sizes the Marlin kernels take (marlin_utils.py: `supports_group_size = group_size in [-1, 32, 64, 128]`)."""
OWNED_ENGINE_KWARGS = ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "gpu_memory_utilization")
"""vLLM engine arguments set from their own `serve.vllm.*` field, not through `serve.vllm.engine_kwargs`."""
RAY_REFUSED_ENGINE_KWARGS = ("model", "served_model_name")
"""Ray Serve LLM refuses these in engine_kwargs (vllm_models.py `get_initialization_kwargs`): the model comes from
`model_loading_config`."""

GPU_ONLY = (
    "The vLLM backend runs only on GPU machines (CUDA): install it there with "
    '`pip install "ray[llm]==2.60.0"` (Ray Serve LLM and the vLLM release this Ray pins). On CPU machines serve '
    "with serve.backend=engine (our own engine, the default)."
)
VLLM_MISSING = "serve.backend=vllm needs vLLM, which is not installed in this environment. " + GPU_ONLY

CHAT_TEMPLATE = "".join(
    [
        "{{- '<|begin_of_sentence|>' -}}",
        "{%- for message in messages -%}",
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}",
        "{{- raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ message['role']"
        " ~ '; expected system, user or assistant') -}}",
        "{%- endif -%}",
        "{%- if message['content'] is string -%}",
        "{%- set content = message['content'] -%}",
        "{%- else -%}",
        "{%- set parts = namespace(text='') -%}",
        "{%- for part in message['content'] -%}",
        "{%- if part is mapping and part['type'] == 'text' and part['text'] is string -%}",
        "{%- set parts.text = parts.text ~ part['text'] -%}",
        "{%- else -%}",
        "{{- raise_exception('only text content parts are served') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- set content = parts.text -%}",
        "{%- endif -%}",
        "{%- if message['role'] == 'system' -%}",
        "{%- if not loop.first -%}",
        "{{- raise_exception('message ' ~ loop.index0 ~ ': a system message may only come first') -}}",
        "{%- endif -%}",
        "{{- content ~ '\\n' -}}",
        "{%- elif message['role'] == 'user' -%}",
        "{{- 'User: ' ~ content ~ '\\n' -}}",
        "{%- elif message['reasoning_content'] is defined and message['reasoning_content'] -%}",
        "{{- 'Assistant: <think>\\n' ~ message['reasoning_content'] ~ '\\n</think>\\n' ~ content"
        " ~ '<|end_of_sentence|>' -}}",
        "{%- else -%}",
        "{{- 'Assistant: <think>\\n\\n</think>\\n\\n' ~ content ~ '<|end_of_sentence|>' -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{%- if enable_thinking is defined and enable_thinking -%}",
        "{{- 'Assistant: <think>\\n' -}}",
        "{%- else -%}",
        "{{- 'Assistant: <think>\\n\\n</think>\\n\\n' -}}",
        "{%- endif -%}",
        "{%- endif -%}",
    ]
)
"""`ernie.chat_template.render` as the Jinja template vLLM's chat endpoint applies (our tokenizers carry none);
passed inline as the `chat_template` frontend argument. Text content only. Tested equal to `render`."""


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class VLLMSettings:
    """`serve.vllm.*`: how the vLLM backend deploys (used when `serve.backend=vllm`)."""

    tensor_parallel_size: int = 1
    """GPUs each engine splits every layer over (vLLM tensor_parallel_size); must divide the attention heads.
    0: the largest that fits the GPUs available per engine (see `llm_config_dicts`)."""
    pipeline_parallel_size: int = 1
    """Pipeline stages per engine (vLLM pipeline_parallel_size), each on its own GPUs; at most the layer count."""
    max_model_len: int = 0
    """Longest prompt plus completion an engine takes, in tokens; 0: vLLM's default, config.json's
    max_position_embeddings (the KV cache must then hold one such sequence)."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM may take for weights, activations and KV cache (0, 1]."""
    num_replicas: int = 1
    """Engines serving the model when pd=false; each takes tensor x pipeline parallel GPUs."""
    pd: bool = False
    """Prefill/decode disaggregation (`build_pd_openai_app`): prefill and decode engines apart, the KV cache
    handed over by `kv_connector`."""
    prefill_replicas: int = 1
    """Prefill engines when pd=true."""
    decode_replicas: int = 1
    """Decode engines when pd=true."""
    kv_connector: str = "NixlConnector"
    """vLLM KV connector moving the KV cache from prefill to decode engines (pd=true): NixlConnector or
    LMCacheConnectorV1."""
    export: str = ""
    """Which export of a qckpt to serve: gptq or compressed-tensors; empty: the first present, in that order."""
    accelerator_type: str | None = None
    """Ray accelerator type every engine is placed on (e.g. H100, A100-80G); None: any GPU."""
    min_vllm_version: str = MIN_VLLM_VERSION
    """Oldest vLLM preflight accepts (the default's sources: MIN_VLLM_VERSION)."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further vLLM engine arguments, merged over the ones built here (e.g. enable_prefix_caching, or a
    kv_transfer_config with LMCache's kv_connector_extra_config); not the ones with a field above."""


def validate_settings(s: VLLMSettings) -> None:
    """Refuse settings that are wrong whatever the model and the cluster."""
    checks = [
        (s.tensor_parallel_size >= 0, "tensor_parallel_size", s.tensor_parallel_size, "must be >= 0 (0: auto)"),
        (s.pipeline_parallel_size >= 1, "pipeline_parallel_size", s.pipeline_parallel_size, "must be >= 1"),
        (s.max_model_len >= 0, "max_model_len", s.max_model_len, "must be >= 0 (0: the model's own)"),
        (0 < s.gpu_memory_utilization <= 1, "gpu_memory_utilization", s.gpu_memory_utilization, "must be in (0, 1]"),
        (s.num_replicas >= 1, "num_replicas", s.num_replicas, "must be >= 1"),
        (s.prefill_replicas >= 1, "prefill_replicas", s.prefill_replicas, "must be >= 1"),
        (s.decode_replicas >= 1, "decode_replicas", s.decode_replicas, "must be >= 1"),
        (s.export in ("", *EXPORT_DIRS), "export", s.export, f"must be one of {', '.join(EXPORT_DIRS)} or empty"),
    ]
    for ok, key, value, rule in checks:
        if not ok:
            raise UserError(f"serve.vllm.{key}={value!r} {rule}")
    _version(s.min_vllm_version, "serve.vllm.min_vllm_version")
    for key in s.engine_kwargs:
        if key in OWNED_ENGINE_KWARGS:
            raise UserError(f"serve.vllm.engine_kwargs.{key}: set serve.vllm.{key} instead")
        if key in RAY_REFUSED_ENGINE_KWARGS:
            raise UserError(
                f"serve.vllm.engine_kwargs.{key}: Ray Serve LLM takes the model from the checkpoint served "
                "(model_loading_config), not from engine_kwargs"
            )


# ---------------------------------------------------------------------------------------------- the model
def export_dir(model_dir: str | Path, export: str = "") -> Path:
    """The directory vLLM loads for `model_dir`: a qckpt's `export-gptq/` or `export-compressed-tensors/`
    (`export` picks one; empty: the first present), or a ckpt (HF layout) itself, served in bf16."""
    d = Path(model_dir)
    if (d / QCKPT_MARKER).is_file():
        wanted = [export] if export else list(EXPORT_DIRS)
        for fmt in wanted:
            candidate = d / EXPORT_DIRS[fmt]
            if (candidate / "config.json").is_file():
                return candidate
        looked = ", ".join(f"{EXPORT_DIRS[f]}/" for f in wanted)
        raise UserError(
            f"{d} is a quantized checkpoint (qckpt) without the vLLM export serve.backend=vllm needs (looked for "
            f"{looked}): vLLM cannot read our packed format. Re-run the quantize stage with quantize.export=[gptq] "
            "(or [compressed-tensors]), or serve this qckpt with serve.backend=engine."
        )
    if not (d / "config.json").is_file():
        raise UserError(
            f"{d} has no config.json: serve.backend=vllm serves a ckpt in the HF layout or a qckpt's vLLM export "
            "(quantize.export=[gptq])"
        )
    if export and "quantization_config" not in _read_json(d / "config.json"):
        raise UserError(
            f"serve.vllm.export={export} picks an export of a qckpt; {d} is a full-precision ckpt (leave it empty)"
        )
    return d


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


@dataclass
class ModelFacts:
    """What the checks need from a served directory's config.json."""

    architecture: str
    family: str
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    max_position_embeddings: int
    expert_layers: list[str]
    """vLLM's layer names of the MoE blocks' experts (one fused layer per block)."""
    split_sizes: dict[str, int]
    """FFN sizes tensor parallelism splits evenly: the dense MLPs' intermediate size, the experts' (per pool)."""
    quantization: dict | None


def model_facts(source: Path) -> ModelFacts:
    """Read `source`/config.json; refuse architectures vLLM does not run as ERNIE 4.5."""
    config = _read_json(source / "config.json")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in VLLM_ARCHITECTURES:
        raise UserError(
            f"{source / 'config.json'} names architectures={archs!r}; vLLM runs ERNIE 4.5 as one of "
            f"{', '.join(VLLM_ARCHITECTURES)} (vLLM's model registry)"
        )
    try:
        cfg = from_hf_config(config, source.name)
    except ConfigError as err:
        raise UserError(f"{source / 'config.json'}: {err}") from None
    text = config.get("text_config", config)
    experts = [f"model.layers.{i}.mlp.experts" for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    split = {}
    if cfg.moe is None or len(experts) < cfg.num_layers:
        split["intermediate_size"] = cfg.intermediate_size
    if cfg.moe is not None:
        split["moe_intermediate_size"] = cfg.moe.intermediate_size
        if cfg.vision is not None:
            split["vision moe_intermediate_size"] = cfg.moe.vision_intermediate_size
    return ModelFacts(
        architecture=arch,
        family=VLLM_ARCHITECTURES[arch],
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_hidden_layers=cfg.num_layers,
        max_position_embeddings=int(text.get("max_position_embeddings", cfg.max_position_embeddings)),
        expert_layers=experts if cfg.moe is not None else [],
        split_sizes=split,
        quantization=config.get("quantization_config"),
    )


def tokenizer_dir(source: Path) -> Path:
    """Where vLLM finds the tokenizer: beside the weights (our exports copy it there), else a ckpt's tokenizer/."""
    for d in (source, source / "tokenizer"):
        if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file():
            return d
    raise UserError(f"no tokenizer (tokenizer.json or tokenizer.model) in {source} or {source / 'tokenizer'}")


def _check_weights(source: Path) -> None:
    if not ((source / "model.safetensors").is_file() or (source / "model.safetensors.index.json").is_file()):
        raise UserError(f"{source} has no model.safetensors (or its index): nothing for vLLM to load")


# ---------------------------------------------------------------------------------------------- quantization
def gptq_layer_bits(qc: dict, layer: str) -> int:
    """A layer's width as vLLM resolves a GPTQ `dynamic` config: the first rule whose regex matches the layer's
    name ("-:": not quantized, 0; "+:" or no prefix: its override), else the config's bits."""
    for rule, override in (qc.get("dynamic") or {}).items():
        negative = rule.startswith("-:")
        if re.match(rule[2:] if rule[:2] in ("-:", "+:") else rule, layer):
            return 0 if negative else int((override or {}).get("bits", qc["bits"]))
    return int(qc["bits"])


def _gptq_widths(qc: dict) -> set[int]:
    widths = {int(qc["bits"])}
    for rule, override in (qc.get("dynamic") or {}).items():
        if not rule.startswith("-:") and "bits" in (override or {}):
            widths.add(int(override["bits"]))
    return widths


def _compressed_groups(qc: dict) -> list[dict]:
    return [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]


def vllm_quantization(qc: dict | None) -> tuple[str | None, str]:
    """(vLLM `quantization`, `dtype`) for an export's quantization_config (None: a bf16 ckpt).

    GPTQ runs on Marlin (`gptq_marlin`, bf16 activations) when every width is 4 or 8 bits, the grid symmetric and
    the group size one Marlin takes; otherwise on vLLM's `gptq` kernels, which take fp16 activations only (vLLM
    refuses bf16 for them). Naming `gptq` explicitly would keep vLLM off Marlin, so the method is chosen here."""
    if qc is None:
        return None, "bfloat16"
    method = qc.get("quant_method")
    if method == "gptq":
        marlin = (
            _gptq_widths(qc) <= {4, 8}
            and bool(qc.get("sym"))
            and not qc.get("desc_act")
            and qc.get("group_size") in MARLIN_GROUP_SIZES
        )
        return ("gptq_marlin", "bfloat16") if marlin else ("gptq", "float16")
    if method == "compressed-tensors":
        return "compressed-tensors", "bfloat16"
    raise UserError(f"quantization_config.quant_method={method!r}: the vLLM backend serves gptq and compressed-tensors")


def check_quantization(facts: ModelFacts, source: Path) -> list[str]:
    """Refuse exports vLLM's kernels cannot run, or would run on the wrong weights; returns notes."""
    qc = facts.quantization
    if qc is None:
        return []
    where = f"{source / 'config.json'}"
    method, dtype = vllm_quantization(qc)
    notes = [f"vLLM quantization={method}, dtype={dtype}"]
    if method in ("gptq", "gptq_marlin"):
        widths = _gptq_widths(qc)
        if not widths <= set(GPTQ_LINEAR_BITS):
            raise UserError(f"{where}: GPTQ widths {sorted(widths)}; vLLM's GPTQ kernels take {GPTQ_LINEAR_BITS} bits")
        expert_bits = {gptq_layer_bits(qc, layer) for layer in facts.expert_layers} - {0}
        odd = sorted(expert_bits - set(MOE_EXPERT_BITS))
        if odd:
            raise UserError(
                f"{where}: the MoE experts are {'/'.join(map(str, odd))}-bit; vLLM runs a block's experts on its "
                "fused-MoE GPTQ kernels (Marlin MoE, and moe_wna16 behind it), which take 4- or 8-bit codes only. "
                "Quantize the experts at 4 or 8 bits (quantize.bits, or quantize.module_bits={'*.experts': 4}) or "
                "serve with serve.backend=engine, which runs 2-bit experts."
            )
        if expert_bits and not qc.get("sym"):
            raise UserError(
                f"{where}: an asymmetric GPTQ export (checkpoint_format {qc.get('checkpoint_format')}) of a MoE "
                "model: vLLM's Marlin MoE kernel takes symmetric grids only, and its moe_wna16 fallback reads every "
                "GPTQ zero point as stored minus one (moe_wna16.py adds 1), which is wrong for our gptq_v2 zero "
                "points, so the experts would run on wrong weights. Re-quantize with quantize.symmetric=true, or "
                "serve with serve.backend=engine."
            )
        if method == "gptq":
            notes.append(
                "GPTQ runs on vLLM's gptq kernels (not Marlin: a width other than 4/8, an asymmetric grid or a "
                "group size Marlin does not take), with fp16 activations (the model was trained in bf16)"
            )
    else:
        groups = _compressed_groups(qc)
        widths = {int(g.get("num_bits", 0)) for g in groups}
        if not widths <= {4, 8}:
            raise UserError(f"{where}: compressed-tensors widths {sorted(widths)}; vLLM's WNA16 kernels take 4 or 8")
        if facts.expert_layers and not all(g.get("symmetric", True) for g in groups):
            raise UserError(
                f"{where}: an asymmetric compressed-tensors export of a MoE model; vLLM's compressed-tensors MoE "
                'methods take symmetric weights only ("Only symmetric quantization is supported for MoE", vLLM '
                "issue #39980). Re-quantize with quantize.symmetric=true, or use quantize.export=[gptq] with it."
            )
    return notes


# ---------------------------------------------------------------------------------------------- parallelism
def check_parallel(facts: ModelFacts, tp: int, pp: int, expert_parallel: bool = False) -> None:
    """vLLM's rules for splitting the model: heads over TP (ModelConfig.verify_with_parallel_config), KV heads
    split or replicated evenly (QKVParallelLinear), the FFN intermediate sizes split evenly (column-parallel
    layers; the experts' too unless expert parallelism places whole experts), one layer per pipeline stage."""
    heads, kv = facts.num_attention_heads, facts.num_key_value_heads
    if heads % tp:
        raise UserError(
            f"serve.vllm.tensor_parallel_size={tp} does not divide the model's {heads} attention heads "
            f"({facts.architecture}); vLLM needs it to. Divisors: {_divisors(heads)}"
        )
    if (kv % tp) if tp <= kv else (tp % kv):
        raise UserError(
            f"serve.vllm.tensor_parallel_size={tp} and the model's {kv} KV heads: vLLM splits KV heads evenly over "
            f"TP ranks, or replicates them evenly when TP exceeds them, so one must divide the other"
        )
    for name, size in facts.split_sizes.items():
        if size % tp and not (expert_parallel and "moe" in name):
            raise UserError(
                f"serve.vllm.tensor_parallel_size={tp} does not divide the model's {name} ({size}); vLLM splits "
                "it evenly over the TP ranks"
            )
    if pp > facts.num_hidden_layers:
        raise UserError(f"serve.vllm.pipeline_parallel_size={pp} exceeds the model's {facts.num_hidden_layers} layers")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fits_tp(facts: ModelFacts, tp: int) -> bool:
    try:
        check_parallel(facts, tp, 1)
    except UserError:
        return False
    return True


def engines(settings: VLLMSettings) -> int:
    """vLLM engines the deployment starts: the replicas (both roles with pd)."""
    return settings.prefill_replicas + settings.decode_replicas if settings.pd else settings.num_replicas


def gpus_per_engine(settings: VLLMSettings, tp: int) -> int:
    """GPUs one engine takes: tensor x pipeline (x data) parallel, as Ray Serve LLM places them."""
    dp = int(settings.engine_kwargs.get("data_parallel_size", 1) or 1)
    return tp * settings.pipeline_parallel_size * dp


def resolve_tensor_parallel(settings: VLLMSettings, facts: ModelFacts, num_gpus_available: int | None) -> int:
    """serve.vllm.tensor_parallel_size, or with 0 the largest that fits the GPUs available per engine and splits
    the model (heads and KV heads)."""
    if settings.tensor_parallel_size:
        return settings.tensor_parallel_size
    if num_gpus_available is None:
        raise UserError(
            "serve.vllm.tensor_parallel_size=0 (auto) needs the cluster's GPU count; set tensor_parallel_size "
            "explicitly or deploy on a running Ray cluster"
        )
    per_engine = num_gpus_available // (engines(settings) * gpus_per_engine(settings, 1))
    fitting = [t for t in range(1, per_engine + 1) if _fits_tp(facts, t)]
    if not fitting:
        raise UserError(
            f"serve.vllm.tensor_parallel_size=0 (auto): {num_gpus_available} GPUs leave none per engine for "
            f"{engines(settings)} engine(s) x pipeline_parallel_size={settings.pipeline_parallel_size}"
        )
    return fitting[-1]


# ---------------------------------------------------------------------------------------------- Ray's side
def _ray_source(relative: str) -> Path:
    """A file of the installed Ray, found without importing Ray (whose LLM modules need vLLM to import)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        raise UserError("Ray is not installed; serve.backend=vllm deploys through Ray Serve LLM")
    return Path(spec.origin).parent / relative


def ray_kv_connectors() -> set[str]:
    """The KV connectors this Ray's Serve LLM registers (`BUILTIN_BACKENDS`, read from its source)."""
    path = _ray_source("llm/_internal/serve/engines/vllm/kv_transfer/factory.py")
    if not path.is_file():
        raise UserError(f"this Ray has no Serve LLM KV connector registry ({path}); the vLLM backend needs Ray 2.60")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BUILTIN_BACKENDS" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise UserError(f"{path} defines no BUILTIN_BACKENDS; the vLLM backend was written against Ray 2.60")


def ray_accelerator_types() -> set[str]:
    """The accelerator types Ray knows (LLMConfig validates `accelerator_type` against them)."""
    path = _ray_source("util/accelerators/accelerators.py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            if all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
                names.add(node.value.value)
    return names


def ray_vllm_pin() -> str | None:
    """The vLLM version the installed Ray's `ray[llm]` extra pins (None: no pin found)."""
    from packaging.requirements import Requirement

    try:
        requires = importlib.metadata.requires("ray") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requires:
        req = Requirement(line)
        if req.name == "vllm" and req.marker is not None and req.marker.evaluate({"extra": "llm"}):
            pinned = [s.version for s in req.specifier if s.operator == "=="]
            return pinned[0] if pinned else None
    return None


def _ray_cluster_gpus() -> int | None:
    """GPUs of the running Ray cluster; None when Ray is not initialized here (nothing to ask)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return int(ray.cluster_resources().get("GPU", 0))


# ---------------------------------------------------------------------------------------------- config dicts
def llm_config_dicts(
    settings: VLLMSettings, model_dir: str | Path, model_name: str, num_gpus_available: int | None = None
) -> dict:
    """The argument of `build_openai_app` (`{"llm_configs": [LLMConfig fields]}`) or, with pd, of
    `build_pd_openai_app` (`{"prefill_config": ..., "decode_config": ...}`), as plain dicts in the shape Ray
    Serve LLM 2.60 validates them (LLMConfig, LLMServingArgs, PDServingArgs), buildable without vLLM.

    `num_gpus_available` only resolves tensor_parallel_size=0 (auto)."""
    validate_settings(settings)
    source = export_dir(model_dir, settings.export)
    facts = model_facts(source)
    tp = resolve_tensor_parallel(settings, facts, num_gpus_available)
    quantization, dtype = vllm_quantization(facts.quantization)
    engine: dict[str, Any] = {
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "dtype": dtype,
        "chat_template": CHAT_TEMPLATE,
    }
    if settings.max_model_len:
        engine["max_model_len"] = settings.max_model_len
    if quantization:
        engine["quantization"] = quantization
    tokenizer = tokenizer_dir(source)
    if tokenizer != source:
        engine["tokenizer"] = str(tokenizer)
    engine.update(copy.deepcopy(settings.engine_kwargs))

    def llm_config(replicas: int, kv_transfer: bool) -> dict:
        engine_kwargs = copy.deepcopy(engine)  # Ray's connector backends write into kv_transfer_config
        if kv_transfer:
            engine_kwargs.setdefault(
                "kv_transfer_config", {"kv_connector": settings.kv_connector, "kv_role": "kv_both"}
            )
        config: dict[str, Any] = {
            "model_loading_config": {"model_id": model_name, "model_source": str(source)},
            "engine_kwargs": engine_kwargs,
            "deployment_config": {"num_replicas": replicas},
        }
        if settings.accelerator_type:
            config["accelerator_type"] = settings.accelerator_type
        return config

    if settings.pd:
        return {
            "prefill_config": llm_config(settings.prefill_replicas, True),
            "decode_config": llm_config(settings.decode_replicas, True),
        }
    return {"llm_configs": [llm_config(settings.num_replicas, False)]}


# ---------------------------------------------------------------------------------------------- preflight
@dataclass
class PreflightReport:
    """What preflight checked, for endpoint.json."""

    vllm_version: str
    vllm_version_from: str
    """"installed" (read from the environment) or "given" (the caller's; the runtime imports were not checked)."""
    ray_vllm_pin: str | None
    model_source: str
    architecture: str
    quantization: str | None
    dtype: str
    tensor_parallel_size: int
    gpus_needed: int
    cluster_gpus: int | None
    """None: not checked (Ray not initialized here and no count given)."""
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def installed_vllm_version() -> str:
    """The installed vLLM's version, read from its package metadata (importing vLLM needs CUDA libraries)."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(VLLM_MISSING) from None


def _version(text: str, what: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        raise UserError(f"{what}={text!r} is not a version") from None


def preflight(
    settings: VLLMSettings,
    model_dir: str | Path,
    model_name: str,
    cluster_gpus: int | None = None,
    vllm_version: str | None = None,
) -> PreflightReport:
    """Check everything that can be checked before deploying; raise UserError naming the first problem.

    `vllm_version`: the vLLM version to check against (e.g. the cluster image's, from a machine without vLLM);
    None: the installed one, and then vLLM and Ray Serve LLM must also import and accept the configs here.
    `cluster_gpus`: GPUs available; None: the running Ray cluster's (`ray.cluster_resources()`), unchecked when
    Ray is not initialized."""
    validate_settings(settings)
    installed = vllm_version is None
    version = installed_vllm_version() if installed else vllm_version
    if _version(version, "vLLM version") < _version(settings.min_vllm_version, "serve.vllm.min_vllm_version"):
        raise UserError(
            f"vLLM {version} is older than {settings.min_vllm_version}, the oldest the vLLM backend runs "
            f'(serve.vllm.min_vllm_version; Ray 2.60 pins {ray_vllm_pin()}): upgrade with `pip install "ray[llm]"`'
        )
    notes: list[str] = []
    pin = ray_vllm_pin()
    if pin and version != pin:
        notes.append(f"vLLM {version} is not the {pin} Ray 2.60's ray[llm] pins; Ray Serve LLM is tested with {pin}")

    source = export_dir(model_dir, settings.export)
    facts = model_facts(source)
    _check_weights(source)
    tokenizer_dir(source)
    if facts.family == "vl_moe":
        notes.append("ERNIE 4.5 VL through vLLM is untested here; only text content is served by the chat template")

    if settings.pd:
        known = ray_kv_connectors()
        if settings.kv_connector not in KV_CONNECTORS or settings.kv_connector not in known:
            raise UserError(
                f"serve.vllm.kv_connector={settings.kv_connector!r} is not a KV connector the vLLM backend deploys "
                f"prefill/decode with: {', '.join(c for c in KV_CONNECTORS if c in known)}"
            )
    if settings.accelerator_type and settings.accelerator_type not in ray_accelerator_types():
        raise UserError(
            f"serve.vllm.accelerator_type={settings.accelerator_type!r} is not an accelerator type Ray knows "
            f"(e.g. {', '.join(sorted(t for t in ray_accelerator_types() if t[:1] in 'ABHL'))})"
        )

    if cluster_gpus is None:
        cluster_gpus = _ray_cluster_gpus()
    tp = resolve_tensor_parallel(settings, facts, cluster_gpus)
    check_parallel(
        facts, tp, settings.pipeline_parallel_size, bool(settings.engine_kwargs.get("enable_expert_parallel"))
    )
    if settings.max_model_len > facts.max_position_embeddings:
        raise UserError(
            f"serve.vllm.max_model_len={settings.max_model_len} exceeds the model's max_position_embeddings "
            f"({facts.max_position_embeddings}); vLLM refuses a longer context"
        )
    notes += check_quantization(facts, source)

    needed = engines(settings) * gpus_per_engine(settings, tp)
    if cluster_gpus is not None and needed > cluster_gpus:
        layout = (
            f"(prefill_replicas={settings.prefill_replicas} + decode_replicas={settings.decode_replicas})"
            if settings.pd
            else f"num_replicas={settings.num_replicas}"
        )
        if "data_parallel_size" in settings.engine_kwargs:
            layout += f" x data_parallel_size={settings.engine_kwargs['data_parallel_size']}"
        raise UserError(
            f"the vLLM deployment needs {needed} GPUs: {layout} x tensor_parallel_size={tp} x "
            f"pipeline_parallel_size={settings.pipeline_parallel_size}, and the cluster has {cluster_gpus}"
        )

    configs = llm_config_dicts(settings, model_dir, model_name, cluster_gpus)
    if installed:
        _check_runtime(settings, configs)
    quantization, dtype = vllm_quantization(facts.quantization)
    return PreflightReport(
        vllm_version=version,
        vllm_version_from="installed" if installed else "given",
        ray_vllm_pin=pin,
        model_source=str(source),
        architecture=facts.architecture,
        quantization=quantization,
        dtype=dtype,
        tensor_parallel_size=tp,
        gpus_needed=needed,
        cluster_gpus=cluster_gpus,
        notes=notes,
    )


def _check_runtime(settings: VLLMSettings, configs: dict) -> None:
    """Where vLLM is installed: it and Ray Serve LLM import, Ray accepts the configs, and the KV connector is one
    vLLM registers, with its transfer library present. Runs only on machines with vLLM (not in this project's
    tests)."""
    try:
        import vllm  # noqa: F401
    except Exception as err:  # a broken CUDA install fails with more than ImportError
        raise UserError(
            f"vLLM is installed but does not import here ({type(err).__name__}: {err}). " + GPU_ONLY
        ) from None
    try:
        from ray.serve.llm import LLMConfig
    except Exception as err:
        raise UserError(f"Ray Serve LLM does not import with this vLLM ({type(err).__name__}: {err})") from None
    for role, config in _each_config(configs):
        try:  # get_engine_config sorts engine_kwargs into vLLM's engine and frontend arguments, refusing others
            LLMConfig.model_validate(copy.deepcopy(config)).get_engine_config()
        except Exception as err:
            raise UserError(f"Ray Serve LLM refuses the {role} config: {err}") from None
    if settings.pd:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        registry = getattr(KVConnectorFactory, "_registry", None)
        if registry is not None and settings.kv_connector not in registry:
            raise UserError(
                f"serve.vllm.kv_connector={settings.kv_connector!r} is not registered in this vLLM "
                f"(known: {', '.join(sorted(registry))})"
            )
        library = {
            "NixlConnector": ("nixl", "pip install nixl"),
            "LMCacheConnectorV1": ("lmcache", "pip install lmcache"),
        }
        module, hint = library[settings.kv_connector]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"serve.vllm.kv_connector={settings.kv_connector} needs the {module} package: {hint}")


def _each_config(configs: dict):
    if "llm_configs" in configs:
        yield from (("llm", c) for c in configs["llm_configs"])
    else:
        yield from (("prefill", configs["prefill_config"]), ("decode", configs["decode_config"]))


# ---------------------------------------------------------------------------------------------- deploy
def deploy(settings: VLLMSettings, model_dir: str | Path, model_name: str, host: str, port: int, app_name: str) -> str:
    """Preflight, then deploy the model with Ray Serve LLM on the running (or a new local) Ray cluster and start
    Serve's HTTP proxy on host:port; returns the base URL (the OpenAI API is at <url>/v1). Needs vLLM: GPU
    machines only. `serve.run` returns once the engines are up (weights loaded)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS when set, else a local Ray
    preflight(settings, model_dir, model_name)
    from ray.serve.llm import LLMConfig, build_openai_app, build_pd_openai_app

    from . import port_is_free

    configs = llm_config_dicts(settings, model_dir, model_name, _ray_cluster_gpus())
    if settings.pd:
        app = build_pd_openai_app(
            {
                "prefill_config": LLMConfig(**configs["prefill_config"]),
                "decode_config": LLMConfig(**configs["decode_config"]),
            }
        )
    else:
        app = build_openai_app({"llm_configs": [LLMConfig(**c) for c in configs["llm_configs"]]})
    if not serve.status().proxies and not port_is_free(host, port):
        raise UserError(f"serve.port={port} is already in use on {host}; pick another with serve.port=...")
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=app_name, route_prefix="/")
    return f"http://{host}:{port}"
