"""Checkpoints in the HF transformers / published ERNIE 4.5 layout.

    save_pretrained(model, "out/ckpt")          # config.json, model*.safetensors (+ index)
    model = load_pretrained("out/ckpt")         # ours, or a HF `save_pretrained` dir
    load_checkpoint_part(meta_model, "out/ckpt", layer=3)   # one decoder layer's tensors only

Tensor names and shapes are those of the published "-PT" checkpoints (ERNIE_FACTS §3):
per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, `mlp.gate.weight` [E, H] and
`mlp.moe_statics.e_score_correction_bias` [1, E] (fp32) for text MoE; for VL the text and
vision experts share one index space (vision from E on), the routers are stored
transposed as `mlp.gate.weight` / `mlp.gate.weight_1` [H, E] and the bias is [2, E].
Only safetensors are read, so loading never unpickles.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ErnieConfig
from .hf_config import from_hf_config, to_hf_config
from .model import ErnieForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_IGNORED = re.compile(r"(^|\.)mtp")  # multi-token-prediction heads of release checkpoints


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensors."""


# ---------------------------------------------------------------------- name mapping
def to_hub_state_dict(model: ErnieForCausalLM) -> dict[str, torch.Tensor]:
    """Our parameters under the published tensor names and shapes."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if ".mlp.text." in name or ".mlp.vision." in name:
            continue  # expert pools are written below
        out[to_hub_name(name)] = tensor
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            out.update(_moe_to_hub(f"model.layers.{i}.mlp", layer.mlp, cfg))
    return out


def to_hub_name(name: str) -> str:
    if name.startswith("vision_encoder."):
        return "model.vision_model." + name[len("vision_encoder.") :]
    if name.startswith("adapter."):
        return "model.resampler_model." + name[len("adapter.") :]
    return name


def _moe_to_hub(prefix: str, moe, cfg: ErnieConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    pools = [moe.text] + ([moe.vision] if moe.vision is not None else [])
    first_expert = 0
    for pool in pools:
        gate_up, down = pool.experts.gate_up_proj.detach(), pool.experts.down_proj.detach()
        inter = pool.experts.intermediate
        for e in range(gate_up.shape[0]):
            key = f"{prefix}.experts.{first_expert + e}"
            out[f"{key}.gate_proj.weight"] = gate_up[e, :inter].contiguous()
            out[f"{key}.up_proj.weight"] = gate_up[e, inter:].contiguous()
            out[f"{key}.down_proj.weight"] = down[e].contiguous()
        first_expert += gate_up.shape[0]
    bias = torch.stack([p.gate.e_score_correction_bias.detach().float() for p in pools])
    out[f"{prefix}.moe_statics.e_score_correction_bias"] = bias
    if moe.vision is None:
        out[f"{prefix}.gate.weight"] = moe.text.gate.weight.detach().float()
    else:
        out[f"{prefix}.gate.weight"] = moe.text.gate.weight.detach().float().T.contiguous()
        out[f"{prefix}.gate.weight_1"] = moe.vision.gate.weight.detach().float().T.contiguous()
    return out


def from_hub_state_dict(
    hub: dict[str, torch.Tensor], cfg: ErnieConfig, source: str = "checkpoint", moe_layers: Iterable[int] | None = None
) -> dict[str, torch.Tensor]:
    """Published names -> our state-dict names; the inverse of `to_hub_state_dict`.

    `moe_layers`: the MoE blocks `hub` holds (default: every one of `cfg`); `read_checkpoint_part`
    passes the one layer it read.

    The MoE tensors are checked here, under their published names: a missing or mis-shaped
    expert / router tensor raises `CheckpointError` naming it. Tensors under an MoE block
    that are not part of it (an expert beyond E, a stray router bias) keep their published
    name, so `check_state_dict` reports them as unexpected instead of dropping them.
    """
    hub = {_normalise_hf5_name(k): v for k, v in hub.items() if not _IGNORED.search(k)}
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []
    for i in cfg.moe_layers if moe_layers is None else moe_layers:
        ours.update(_moe_from_hub(f"model.layers.{i}.mlp", hub, cfg, used, missing, wrong))
    problems = []
    if missing:
        problems.append(f"missing tensors {_first_names(missing)}")
    if wrong:
        problems.append(f"mis-shaped tensors {_first_names(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {cfg.name}: " + "; ".join(problems))
    for name, tensor in hub.items():
        if name not in used:
            ours[_from_hub_name(name)] = tensor
    if cfg.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    return ours


def _normalise_hf5_name(name: str) -> str:
    # transformers 5 VL `save_pretrained` renames back to the hub layout; older exports may
    # carry the in-memory names of the VL model.
    name = name.replace("model.language_model.", "model.")
    name = name.replace("model.vision_tower.", "model.vision_model.")
    for part in ("spatial_linear", "temporal_linear"):
        name = name.replace(f"{part}.fc1.", f"{part}.0.").replace(f"{part}.fc2.", f"{part}.2.")
        name = name.replace(f"{part}.ln.", f"{part}.3.")
    return name


def _from_hub_name(name: str) -> str:
    if name.startswith("model.vision_model."):
        return "vision_encoder." + name[len("model.vision_model.") :]
    if name.startswith("model.resampler_model."):
        return "adapter." + name[len("model.resampler_model.") :]
    return name


def _moe_from_hub(
    prefix: str,
    hub: dict[str, torch.Tensor],
    cfg: ErnieConfig,
    used: set[str],
    missing: list[str],
    wrong: list[str],
) -> dict[str, torch.Tensor]:
    """One MoE block's routers and stacked experts; adds the hub names it reads to `used`
    and the names of absent / mis-shaped tensors to `missing` / `wrong`."""
    m, H = cfg.moe, cfg.hidden_size
    pools = [("text", m.num_experts, 0, m.intermediate_size)]
    if cfg.vision is not None:
        pools.append(("vision", m.vision_num_experts, m.num_experts, m.vision_intermediate_size))

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        used.add(key)
        tensor = hub.get(key)
        if tensor is None:
            missing.append(key)
        elif tuple(tensor.shape) != shape:
            wrong.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {shape}")
            return None
        return tensor

    ours: dict[str, torch.Tensor] = {}
    bias_key = f"{prefix}.moe_statics.e_score_correction_bias"
    used.add(bias_key)
    bias = hub.get(bias_key)
    bias_shape = (len(pools), pools[0][1])
    if bias is None:
        missing.append(bias_key)
    elif bias.numel() != len(pools) * pools[0][1] or bias.shape[-1] != pools[0][1]:
        wrong.append(f"{bias_key}: checkpoint {tuple(bias.shape)} vs model {bias_shape} (one row per expert pool)")
        bias = None
    for row, (pool, count, first, inter) in enumerate(pools):
        gate_up, down = [], []
        for e in range(first, first + count):
            key = f"{prefix}.experts.{e}"
            gate = take(f"{key}.gate_proj.weight", (inter, H))
            up = take(f"{key}.up_proj.weight", (inter, H))
            gate_up.append([gate, up] if gate is not None and up is not None else None)
            down.append(take(f"{key}.down_proj.weight", (H, inter)))
        if all(t is not None for t in gate_up + down):
            ours[f"{prefix}.{pool}.experts.gate_up_proj"] = _stacked([t for pair in gate_up for t in pair], count)
            ours[f"{prefix}.{pool}.experts.down_proj"] = _stacked(down, count)
        # VL routers are stored transposed [H, E]; the vision one as `gate.weight_1`.
        gate_key = f"{prefix}.gate.weight" + ("_1" if pool == "vision" else "")
        router = take(gate_key, (H, count) if cfg.vision is not None else (count, H))
        if router is not None:
            ours[f"{prefix}.{pool}.gate.weight"] = router.T.contiguous() if cfg.vision is not None else router
        if bias is not None:
            ours[f"{prefix}.{pool}.gate.e_score_correction_bias"] = bias.reshape(bias_shape)[row]
    return ours


def _stacked(tensors: list[torch.Tensor], count: int) -> torch.Tensor:
    """`count` experts' tensors (gate_up: each expert's gate then up) stacked [count, ...], copied once into the
    result (no per-expert concatenation first: loading holds the published tensors and the stack, no more)."""
    per_expert = len(tensors) // count
    rows = sum(t.shape[0] for t in tensors[:per_expert])
    out = torch.empty(count, rows, *tensors[0].shape[1:], dtype=tensors[0].dtype)
    for e in range(count):
        torch.cat(tensors[e * per_expert : (e + 1) * per_expert], out=out[e])
    return out


def _first_names(names: list[str], limit: int = 20) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


# ---------------------------------------------------------------------- save
def save_pretrained(model: ErnieForCausalLM, directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json, generation_config.json and safetensors shards (+ index when > 1)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_hub_state_dict(model).items()}
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})
        (directory / INDEX_FILE).unlink(missing_ok=True)
    else:
        weight_map = {}
        for n, names in enumerate(shards, start=1):
            file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in names}, directory / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(directory / INDEX_FILE, index)
        (directory / SINGLE_FILE).unlink(missing_ok=True)
    _write_json(directory / "config.json", to_hf_config(cfg, dtype))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    _write_json(directory / "generation_config.json", generation)
    return directory


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------- load
def load_config(directory: str | os.PathLike) -> ErnieConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it an ERNIE checkpoint directory?")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} holds a JSON {type(hf).__name__}, not an object")
    return from_hf_config(hf, name=Path(directory).name)


def iter_checkpoint_tensors(directory: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, safetensors only."""
    directory = Path(directory)
    for file in _weight_files(directory):
        _check_inside(directory, file)
        if not (directory / file).is_file():
            raise CheckpointError(f"{directory / file} is listed in {INDEX_FILE} but missing")
        with safe_open(directory / file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _weight_files(directory: Path) -> list[str]:
    """The safetensors files of a checkpoint: the index's, or the single file."""
    if (directory / INDEX_FILE).is_file():
        try:
            return sorted(set(_read_index(directory)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{directory / INDEX_FILE} is not a safetensors index ({err!r})") from None
    if (directory / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = f" (found {pickles}: pickled weights are never loaded; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _read_index(directory: Path) -> dict:
    try:
        index = json.loads((directory / INDEX_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{directory / INDEX_FILE} is not a safetensors index ({err!r})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{directory / INDEX_FILE} is not a safetensors index (a JSON {type(index).__name__})")
    return index


def _check_inside(directory: Path, file) -> None:
    """A weight file named by the index must be a file of the checkpoint directory (no absolute path,
    no `..`, no symlink out): a checkpoint never reads weights from elsewhere on the machine."""
    if not isinstance(file, str) or not file or file.startswith("/") or ".." in file.split("/") or "\0" in file:
        raise CheckpointError(f"{directory / INDEX_FILE} lists weight file {file!r}, outside {directory}")
    resolved = (directory / file).resolve()
    if not resolved.is_relative_to(directory.resolve()):
        raise CheckpointError(f"{directory / INDEX_FILE} lists weight file {file!r}, which resolves to {resolved}")


_DECODER_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to (our name or the published one); None outside the decoder layers."""
    found = _DECODER_LAYER.match(_normalise_hf5_name(name))
    return int(found.group(1)) if found else None


def checkpoint_weight_map(directory: str | os.PathLike) -> dict[str, str]:
    """Published tensor name -> the safetensors file of `directory` holding it: the index's weight_map, or the
    single file's names (its header only is read)."""
    directory = Path(directory)
    if not (directory / INDEX_FILE).is_file():
        return {name: file for file in _weight_files(directory) for name in _file_keys(directory, file)}
    weight_map = _read_index(directory).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{directory / INDEX_FILE} has no weight_map of tensor names to files")
    return weight_map


def read_checkpoint_part(
    directory: str | os.PathLike, cfg: ErnieConfig, layer: int | None, weight_map: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """One part of the checkpoint under our names: decoder layer `layer`, or (None) every tensor outside the
    decoder layers (embeddings, final norm, head, vision encoder and adapter). Only the part's own tensors are
    read (`safe_open` per file, `get_tensor` per name), so a model larger than memory loads a layer at a time."""
    directory = Path(directory)
    weight_map = checkpoint_weight_map(directory) if weight_map is None else weight_map
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, file in weight_map.items():
        if not _IGNORED.search(name) and layer_of(name) == layer:
            by_file[file].append(name)
    hub = {}
    for file, names in sorted(by_file.items()):
        _check_inside(directory, file)
        if not (directory / file).is_file():
            raise CheckpointError(f"{directory / file} is listed in {INDEX_FILE} but missing")
        # pread: each tensor read into its own memory; a memory map would keep every page read resident while any
        # tensor of the file lives (the layer's norms and attention weights), so a layer would cost twice its bytes
        with safe_open(directory / file, framework="pt", backend="pread") as f:
            held = set(f.keys())
            for name in names:
                if name not in held:
                    raise CheckpointError(f"{directory / INDEX_FILE} places {name} in {file}, which does not hold it")
                hub[name] = f.get_tensor(name)
    moe_layers = [layer] if layer in cfg.moe_layers else []
    return from_hub_state_dict(hub, cfg, source=str(directory), moe_layers=moe_layers)


def load_checkpoint_part(
    model: ErnieForCausalLM, directory: str | os.PathLike, layer: int | None, weight_map: dict[str, str] | None = None
) -> None:
    """Fill decoder layer `layer` (None: everything outside the decoder layers, and the buffers) of a model built on
    the meta device, from that part's tensors alone (`read_checkpoint_part`), checked as `load_pretrained` checks a
    whole checkpoint. The other parts stay on the meta device."""
    cfg = model.config
    state = {k: _cast(k, v, None) for k, v in read_checkpoint_part(directory, cfg, layer, weight_map).items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if layer_of(k) == layer}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    problems = _state_problems(expected, state, to_hub_name)
    if problems:
        part = f"layer {layer}" if layer is not None else "the tensors outside the decoder layers"
        raise CheckpointError(f"{directory} ({part}) does not fit {cfg.name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False, assign=True)
    if layer is None:
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        _materialise_buffers(model, "cpu")


def _file_keys(directory: Path, file: str) -> list[str]:
    with safe_open(directory / file, framework="pt") as f:
        return list(f.keys())


def load_pretrained(
    directory: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> ErnieForCausalLM:
    """Build the model on the meta device and fill it from the checkpoint, checking every tensor."""
    cfg = load_config(directory)
    state = from_hub_state_dict(dict(iter_checkpoint_tensors(directory)), cfg, source=str(directory))
    return model_from_state_dict(cfg, state, str(directory), dtype, device)


def model_from_state_dict(
    cfg: ErnieConfig,
    state: dict[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> ErnieForCausalLM:
    """A model holding exactly `state` (our names), built on the meta device: no weight is initialised twice."""
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    if cfg.tie_word_embeddings:  # a model's own state_dict lists the tied head too
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    check_state_dict(model, state, source=source)
    state = {k: _cast(k, v, dtype).to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialise_buffers(model, device)
    return model


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    keep_fp32 = name.endswith(".gate.weight") or name.endswith("e_score_correction_bias")
    if dtype is None or keep_fp32 or not tensor.is_floating_point():
        return tensor.float() if keep_fp32 else tensor
    return tensor.to(dtype)


def state_dict_problems(model, state: dict[str, torch.Tensor], display=lambda name: name) -> list[str]:
    """Missing, unexpected and mis-shaped tensors of `state` against `model`, named by `display`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return _state_problems(expected, state, display)


def _state_problems(expected: dict[str, tuple], state: dict[str, torch.Tensor], display) -> list[str]:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{display(k)}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {_first_names([display(k) for k in missing])}")
    if unexpected:
        problems.append(f"unexpected tensors {_first_names([display(k) for k in unexpected])}")
    if wrong:
        problems.append(f"mis-shaped tensors {_first_names(wrong)}")
    return problems


def check_state_dict(model: ErnieForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise `CheckpointError` listing missing, unexpected and mis-shaped tensors (published names)."""
    problems = state_dict_problems(model, state, to_hub_name)
    if problems:
        raise CheckpointError(f"{source} does not fit {model.config.name}: " + "; ".join(problems))


def _materialise_buffers(model: ErnieForCausalLM, device) -> None:
    """Non-persistent buffers stayed on meta; rebuild them."""
    from .rope import frequency_axes, inv_frequencies

    cfg = model.config
    model.rope_inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta).to(device)
    mrope = cfg.mrope_section if cfg.vision is not None else None
    model.rope_axes = frequency_axes(cfg.head_dim, mrope).to(device)
    for module in model.modules():
        if hasattr(module, "expert_load") and module.expert_load.is_meta:
            module.expert_load = torch.zeros(module.expert_load.shape, device=device)
