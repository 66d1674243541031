"""Exports of a quantized model in the layouts vLLM loads: GPTQ and compressed-tensors.

Both hold the model under the published ERNIE 4.5 tensor names (`ernie.checkpoint`: per-expert
`mlp.experts.{e}.{gate,up,down}_proj`), the quantized linears replaced by their packed tensors,
everything else in bf16 (routers and their correction bias in fp32, as published), plus
`config.json` with its `quantization_config` and the tokenizer. The codes, scales and zero points
are ours unchanged: an exported weight dequantizes to exactly what our engine runs (tests).

GPTQ (`export-gptq/`; 2, 4 or 8 bits), per linear with prefix P, in = input, out = output features,
g = group size, f = 32 / bits codes per int32:
- P.qweight int32 [in / f, out]: code of (o, i) at bits (i % f) * bits of word [i // f, o];
- P.qzeros int32 [in / g, out / f]: zero point of (o, group) at bits (o % f) * bits of word
  [group, o // f], stored minus one in the original layout (`checkpoint_format: gptq`, which
  cannot hold a zero point of 0) and as is in `gptq_v2`: symmetric grids (zero point 2**(bits-1))
  are written as `gptq`, which every GPTQ kernel reads, asymmetric ones as `gptq_v2`;
- P.scales fp16 [in / g, out]; P.g_idx int32 [in] = i // g (groups are contiguous: act_order uses
  static groups, so `desc_act` is false).
Weight = (code - zero) * scale. Modules left in full precision are excluded by `dynamic` "-:" rules, and
modules at another width than the most common one (`quantize.module_bits`) get "+:" rules with their bits;
each rule matches the published names and the layer vLLM fuses them into (`vllm_layer`: q/k/v, gate/up, a
block's experts), and such fused siblings must share one width.

compressed-tensors (`export-compressed-tensors/`, format pack-quantized; 4 or 8 bits, the widths
vLLM's WNA16 kernels take): P.weight_packed int32 [out, in / f] (code of (o, i) at bits
(i % f) * bits of word [o, i // f], the code being the signed value plus 2**(bits-1)),
P.weight_scale [out, in / g], P.weight_zero_point int32 [out / f, in / g] packed along the output
dim (asymmetric grids only), P.weight_shape int64 [2]; weight = (q - zero_point) * scale. One config group
per width: the most common targets every Linear, the others their layers by name.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ernie.checkpoint import to_hub_name, to_hub_state_dict
from ernie.hf_config import to_hf_config
from ernie.quant import QuantizedGroupedExperts, QuantizedLinear, quantized_modules
from pipeline.contract import UserError

from .config import EXPORT_BITS, EXPORTS, check_export  # noqa: F401 - check_export: its callers' name


class QuantizedTensor:
    """One exported weight: its published name prefix and our codes, scales and zero points."""

    def __init__(self, prefix: str, codes, scales, zeros, bits: int, group_size: int, bias=None) -> None:
        self.prefix, self.codes, self.scales, self.zeros = prefix, codes, scales, zeros
        self.bits, self.group_size, self.bias = bits, group_size, bias


def quantized_tensors(model: nn.Module) -> list[QuantizedTensor]:
    """Every quantized weight under its published name (experts split into gate / up / down)."""
    out = []
    expert_base = _expert_index_base(model)
    for name, module in quantized_modules(model).items():
        if isinstance(module, QuantizedLinear):
            bias = None if module.bias is None else module.bias.detach()
            parts = [(to_hub_name(name), module.codes(), module.scales, module.zeros, module.group_size, bias)]
            out += [QuantizedTensor(p, c, s, z, module.bits, g, b) for p, c, s, z, g, b in parts]
        elif isinstance(module, QuantizedGroupedExperts):
            prefix, first = expert_base[name]
            inter = module.intermediate
            gate_up, down = module.gate_up, module.down
            gu_codes, d_codes = gate_up.codes(), down.codes()
            for e in range(module.num_experts):
                key = f"{prefix}.experts.{first + e}"
                halves = {"gate_proj": slice(0, inter), "up_proj": slice(inter, 2 * inter)}
                for proj, rows in halves.items():
                    c, s, z = gu_codes[e, rows], gate_up.scales[e, rows], gate_up.zeros[e, rows]
                    out.append(QuantizedTensor(f"{key}.{proj}", c, s, z, gate_up.bits, gate_up.group_size))
                c, s, z = d_codes[e], down.scales[e], down.zeros[e]
                out.append(QuantizedTensor(f"{key}.down_proj", c, s, z, down.bits, down.group_size))
        else:
            raise UserError(f"{name} ({type(module).__name__}) has no integer grid to export")
    return out


def _expert_index_base(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Our pool's module name -> (its MoE block's published prefix, index of its first expert):
    text experts first, a VL model's vision experts after them, as `ernie.checkpoint` numbers them."""
    bases = {}
    for i, layer in enumerate(model.model.layers):
        if not layer.is_moe:
            continue
        prefix = f"model.layers.{i}.mlp"
        bases[f"{prefix}.text.experts"] = (prefix, 0)
        if layer.mlp.vision is not None:
            bases[f"{prefix}.vision.experts"] = (prefix, layer.mlp.text.experts.num_experts)
    return bases


def write_export(model: nn.Module, fmt: str, directory: Path, tokenizer_dir: Path, symmetric: bool) -> Path:
    """Write `model` (already quantized) in `fmt` into `directory`; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = quantized_tensors(model)
    tensors = _float_tensors(model, {w.prefix for w in weights})
    for w in weights:
        tensors |= _gptq_tensors(w, symmetric) if fmt == "gptq" else _compressed_tensors(w, symmetric)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors", {"format": "pt"})
    config = to_hf_config(model.config, "bfloat16")
    layers = _linear_prefixes(tensors, weights)
    group_size = weights[0].group_size
    if fmt == "gptq":
        config["quantization_config"] = gptq_config(group_size, symmetric, layers)
    else:
        config["quantization_config"] = compressed_tensors_config(group_size, symmetric, layers)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for item in tokenizer_dir.iterdir():  # vLLM looks for the tokenizer beside the weights
        if item.is_file():
            shutil.copy2(item, directory / item.name)
    return directory


def _float_tensors(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """The published state dict without the quantized weights (or our packed buffers), floats in bf16
    except the routers and their bias (fp32, as published)."""
    out = {}
    for name, tensor in to_hub_state_dict(model).items():
        prefix = name.rsplit(".", 1)[0]
        if prefix in quantized:
            continue
        keep_fp32 = ".gate.weight" in name or "e_score_correction_bias" in name
        if tensor.is_floating_point() and not keep_fp32:
            tensor = tensor.to(torch.bfloat16)
        out[name] = tensor.detach().cpu()
    return out


def _linear_prefixes(tensors: dict, weights: list[QuantizedTensor]) -> dict[str, int]:
    """Published prefix of every linear layer -> its code bits, 0 when kept in full precision (2-D `.weight`s
    that are not embeddings, norms or routers are linear)."""
    layers = {w.prefix: w.bits for w in weights}
    for name, tensor in tensors.items():
        if not name.endswith(".weight") or tensor.ndim != 2:
            continue
        prefix = name.removesuffix(".weight")
        if "embed_tokens" in prefix or prefix.endswith(".gate") or "norm" in prefix.rsplit(".", 1)[-1]:
            continue
        layers.setdefault(prefix, 0)
    return layers


_FUSED = (
    (re.compile(r"^(.*\.self_attn)\.[qkv]_proj$"), r"\1.qkv_proj"),
    (re.compile(r"^(.*\.mlp\.experts)\.\d+\.(?:gate|up|down)_proj$"), r"\1"),
    (re.compile(r"^(.*\.(?:mlp|shared_experts))\.(?:gate|up)_proj$"), r"\1.gate_up_proj"),
)


def vllm_layer(prefix: str) -> str:
    """The layer vLLM builds for a published linear: q/k/v and gate/up fused, a block's experts one FusedMoE
    (vLLM matches quantization rules against these names)."""
    for pattern, fused in _FUSED:
        if pattern.match(prefix):
            return pattern.sub(fused, prefix)
    return prefix


def _by_vllm_layer(layers: dict[str, int]) -> dict[str, tuple[int, list[str]]]:
    """vLLM layer -> (its one width, the published prefixes it fuses). A fused layer has one width: published
    linears that vLLM fuses but were quantized at different widths (or some not at all) are refused."""
    fused: dict[str, dict[str, int]] = {}
    for prefix, bits in layers.items():
        fused.setdefault(vllm_layer(prefix), {})[prefix] = bits
    out = {}
    for layer, members in fused.items():
        widths = set(members.values())
        if len(widths) > 1:
            detail = ", ".join(f"{p}: {b or 'full precision'}" for p, b in sorted(members.items()))
            raise UserError(
                f"vLLM runs {sorted(members)} as one layer {layer}, which has one width; they were quantized at "
                f"different widths ({detail}): give them one in quantize.module_bits / quantize.skip"
            )
        out[layer] = (widths.pop(), sorted(members))
    return out


def default_bits(layers: dict[str, int]) -> int:
    """The width most quantized linears share (ties: the narrower); the others are written as overrides."""
    counts: dict[int, int] = {}
    for bits in layers.values():
        if bits:
            counts[bits] = counts.get(bits, 0) + 1
    return max(counts, key=lambda b: (counts[b], -b))


def _names_rule(names: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


# ---------------------------------------------------------------------- packing
def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] unsigned codes -> int32 [rows, cols * bits / 32]: value j of a word at bits j * bits."""
    per_word = 32 // bits
    rows, cols = values.shape
    if cols % per_word:
        raise ValueError(f"{cols} values per row do not fill whole {per_word}-value words")
    v = values.to(torch.int64).reshape(rows, cols // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)  # < 2**32: the fields do not overlap
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_rows`: int32 [rows, n] -> codes int64 [rows, n * 32 / bits]."""
    per_word = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    return ((w[..., None] >> shifts) & (2**bits - 1)).reshape(words.shape[0], -1)


def _check_packable(w: QuantizedTensor) -> None:
    per_word = 32 // w.bits
    out_features, in_features = w.codes.shape
    if in_features % per_word or out_features % per_word:
        raise UserError(
            f"{w.prefix} ({out_features} x {in_features}) cannot be exported at {w.bits} bits: both dims must be "
            f"multiples of {per_word} (32 / bits); skip it with quantize.skip"
        )


def _gptq_tensors(w: QuantizedTensor, symmetric: bool) -> dict[str, torch.Tensor]:
    _check_packable(w)
    in_features = w.codes.shape[1]
    zeros = w.zeros.to(torch.int64).T  # [groups, out]
    if symmetric:  # the original layout: zero point minus one
        zeros = (zeros - 1) & (2**w.bits - 1)
    out = {
        f"{w.prefix}.qweight": pack_rows(w.codes, w.bits).T,  # packed along the input dim
        f"{w.prefix}.qzeros": pack_rows(zeros.contiguous(), w.bits),
        f"{w.prefix}.scales": w.scales.T.to(torch.float16).contiguous(),
        f"{w.prefix}.g_idx": torch.arange(in_features, dtype=torch.int32) // w.group_size,
    }
    if w.bias is not None:
        out[f"{w.prefix}.bias"] = w.bias.to(torch.bfloat16)
    return out


def _compressed_tensors(w: QuantizedTensor, symmetric: bool) -> dict[str, torch.Tensor]:
    _check_packable(w)
    out = {
        f"{w.prefix}.weight_packed": pack_rows(w.codes, w.bits),
        f"{w.prefix}.weight_scale": w.scales.to(torch.bfloat16 if w.scales.dtype == torch.bfloat16 else torch.float16),
        f"{w.prefix}.weight_shape": torch.tensor(list(w.codes.shape), dtype=torch.int64),
    }
    if not symmetric:
        out[f"{w.prefix}.weight_zero_point"] = pack_rows(w.zeros.to(torch.int64).T.contiguous(), w.bits).T.contiguous()
    if w.bias is not None:
        out[f"{w.prefix}.bias"] = w.bias.to(torch.bfloat16)
    return out


# ---------------------------------------------------------------------- quantization_config
def gptq_config(group_size: int, symmetric: bool, layers: dict[str, int]) -> dict:
    """`layers`: published prefix -> bits (0: full precision). Layers at another width than the default get a
    vLLM `dynamic` override ("+:" rule, bits) and full-precision ones a "-:" rule, each matching the published
    names and vLLM's fused layer."""
    bits = default_bits(layers)
    dynamic = {}
    for layer, (width, members) in sorted(_by_vllm_layer(layers).items()):
        if layer == "lm_head" or width == bits:
            continue
        rule = _names_rule(sorted({layer, *members}))
        dynamic[f"-:{rule}" if width == 0 else f"+:{rule}"] = {} if width == 0 else {"bits": width}
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": symmetric,
        "desc_act": False,
        "lm_head": bool(layers.get("lm_head", 0)),
        "checkpoint_format": "gptq" if symmetric else "gptq_v2",
        "dynamic": dynamic,
    }


def compressed_tensors_config(group_size: int, symmetric: bool, layers: dict[str, int]) -> dict:
    """One config group per width: the default width's targets every Linear, each other width's its layers by
    name (a name match wins over a class match in vLLM)."""
    bits = default_bits(layers)
    by_layer = _by_vllm_layer(layers)

    def group(width: int, targets: list[str]) -> dict:
        weights = {
            "num_bits": width,
            "type": "int",
            "symmetric": symmetric,
            "strategy": "group",
            "group_size": group_size,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        return {"targets": targets, "weights": weights, "input_activations": None, "format": "pack-quantized"}

    groups = {"group_0": group(bits, ["Linear"])}
    for width in sorted({w for w, _ in by_layer.values()} - {0, bits}):
        names = sorted({n for layer, (w, members) in by_layer.items() if w == width for n in (layer, *members)})
        groups[f"group_{len(groups)}"] = group(width, ["re:" + _names_rule(names)])
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(prefix for prefix, width in layers.items() if not width),
        "kv_cache_scheme": None,
    }
