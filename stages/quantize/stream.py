"""Layer-by-layer quantization: a checkpoint is read, calibrated, quantized and written one decoder layer at a
time, so a model larger than memory quantizes in bounded memory; the validation loss before and after comes out of
the same pass.

    result = stream_quantize(ckpt_dir, val_batches, calibration_batches, quantize_part, writer, skip, sequential=True)

The model is built on the meta device. `ernie.checkpoint.load_checkpoint_part` fills what lies outside the decoder
layers (embeddings, final norm, head; for VL the vision encoder and adapter), then one decoder layer at a time, each
read from the safetensors shards by name. Hidden states go through the layers as `ErnieForCausalLM.forward` takes
them (`embed`: vision merge, positions, document masks, the vision-token mask; `run_layer`; `batch_loss`), in three
streams kept batch by batch at the input of the next layer:
- val_fp: the validation rows through the full-precision layers (the loss before);
- val_q: the same rows through the quantized layers, the model that is written (the loss after);
- calibration (gptq, tcq): the calibration rows. A part's statistics are recorded from this stream
  (`calibration.recording`; a routed expert's from the tokens its router sends it, routed on the layer's own
  inputs), then the part is quantized. With `sequential` the stream goes on through the *quantized* part, so each
  layer is calibrated on the inputs it will see once the layers before it are quantized (GPTQ's sequential
  setting, Frantar et al. 2022); without it, through the full-precision part, which gives the statistics of one
  whole-model pass (every layer calibrated on full-precision inputs).

Per decoder layer: load -> val_fp through it -> record the calibration stream -> quantize -> calibration and val_q
through it -> write its shard (`ernie.quant.QuantizedWriter`) -> free it. Quantized targets outside the decoder
layers: the vision encoder and adapter (when not skipped) are calibrated while the rows are embedded, the head
(when not skipped) on the final hidden states. What is held at once: the parts outside the decoder layers, one
decoder layer (about twice its bytes while it is read and its experts stacked), its Hessians, and the streams
(rows x sequence x hidden each).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ernie.attention import AttentionMask
from ernie.checkpoint import checkpoint_weight_map, layer_of, load_checkpoint_part, load_config
from ernie.losses import shifted_targets
from ernie.model import DecoderLayer, ErnieForCausalLM
from ernie.positions import vision_token_mask
from ernie.quant import QuantizedWriter, quantized_modules
from ernie.rope import rope_cos_sin

from .calibration import Calibration, recording
from .rtn import LayerQuantStats, quantization_targets

PartQuantizer = Callable[[ErnieForCausalLM, dict[str, nn.Module], Calibration | None], list[LayerQuantStats]]
"""(model, targets by name, their calibration statistics or None for rtn) -> one `LayerQuantStats` per target,
each target replaced in `model` by its quantized module."""


@dataclass
class LayerInputs:
    """What every decoder layer takes besides the hidden states, for one batch, and what the loss needs."""

    cos_sin: tuple[torch.Tensor, torch.Tensor]
    mask: AttentionMask
    vision_mask: torch.Tensor | None
    labels: torch.Tensor
    document_ids: torch.Tensor


@dataclass
class StreamResult:
    loss_before: float
    loss_after: float
    eval_tokens: int
    stats: list[LayerQuantStats]
    layer_output_errors: list[float]
    """Per decoder layer: ||h_q - h_fp|| / ||h_fp|| of the val rows' hidden states after it (the quantized
    prefix's drift)."""
    model_bytes_before: int
    model_bytes_after: int
    largest_layer_bytes: int
    """Full-precision bytes of the largest decoder layer (what loading a model part by part adds to its size)."""
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    dtype: str = "float32"


def skeleton(ckpt_dir: str | Path) -> ErnieForCausalLM:
    """The checkpoint's model on the meta device, in eval mode: every part is loaded on demand."""
    with torch.device("meta"):
        return ErnieForCausalLM(load_config(ckpt_dir)).eval()


def load_by_parts(ckpt_dir: str | Path) -> ErnieForCausalLM:
    """The whole full-precision model, read part by part (peak: its bytes and one layer's assembly), not through
    `load_pretrained`'s one dictionary of every tensor."""
    model, weight_map = skeleton(ckpt_dir), checkpoint_weight_map(ckpt_dir)
    load_checkpoint_part(model, ckpt_dir, None, weight_map)
    for i in range(model.config.num_layers):
        load_checkpoint_part(model, ckpt_dir, i, weight_map)
    return model


@torch.no_grad()
def embed(model: ErnieForCausalLM, batch: dict) -> tuple[torch.Tensor, LayerInputs]:
    """Hidden states at the first decoder layer and the layers' other inputs, as `ErnieForCausalLM.forward` builds
    them from `collate`'s batch (the call `ernie.evaluation.val_loss` makes: positions and documents given)."""
    cfg, ids = model.config, batch["input_ids"]
    x = model.model.embed_tokens(ids)
    x = model._merge_vision(x, ids, batch.get("pixel_values"), batch.get("image_grid_thw"), None, None)
    B, S = ids.shape
    mask = AttentionMask(past=0, q_len=S, kv_len=S, document_ids=batch["document_ids"].long(), impl=model.attn_impl)
    cos, sin = rope_cos_sin(batch["position_ids"], model.rope_inv_freq, model.rope_axes)
    return x, LayerInputs(
        cos_sin=(cos.to(x.device), sin.to(x.device)),
        mask=mask.prepare(B, x.device),
        vision_mask=vision_token_mask(ids, cfg) if cfg.vision is not None else None,
        labels=batch["labels"],
        document_ids=batch["document_ids"],
    )


@torch.no_grad()
def run_layer(model: ErnieForCausalLM, layer: DecoderLayer, x: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
    return layer(x, inputs.cos_sin, inputs.mask, None, inputs.vision_mask, model.experts_impl)[0]


@torch.no_grad()
def batch_loss(model: ErnieForCausalLM, x: torch.Tensor, inputs: LayerInputs) -> tuple[float, int]:
    """(summed next-token loss, supervised tokens) from the last layer's hidden states: `val_loss`'s definition."""
    logits = model.lm_head(model.model.norm(x))
    targets, weight = shifted_targets(inputs.labels, None, inputs.document_ids)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return float((ce * weight.flatten()).sum()), int(weight.sum())


def state_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensors of a module's state that are loaded (not on the meta device)."""
    seen, total = set(), 0
    for t in module.state_dict().values():
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def stream_quantize(
    ckpt_dir: str | Path,
    val_batches: list[dict],
    calibration_batches: list[dict] | None,
    quantize_part: PartQuantizer,
    writer: QuantizedWriter,
    skip: list[str],
    sequential: bool = True,
    on_part: Callable[[str], None] | None = None,
) -> StreamResult:
    """Quantize the checkpoint's targets (those `skip` leaves) layer by layer into `writer`, one shard per decoder
    layer and a last one for the rest; `calibration_batches` None: no statistics (rtn). `on_part` hears each part
    written ("layer 0", ..., "head"). The caller closes `writer`."""
    return _Pass(ckpt_dir, quantize_part, skip, sequential, on_part or (lambda _label: None)).run(
        val_batches, calibration_batches, writer
    )


class _Pass:
    """One streaming pass; its fields are the streams and what the report needs."""

    def __init__(self, ckpt_dir, quantize_part: PartQuantizer, skip: list[str], sequential: bool, on_part) -> None:
        self.ckpt_dir, self.quantize_part, self.on_part = Path(ckpt_dir), quantize_part, on_part
        self.sequential = sequential
        self.model = skeleton(ckpt_dir)
        self.weight_map = checkpoint_weight_map(ckpt_dir)
        self.target_names = list(quantization_targets(self.model, skip))
        self.stats: list[LayerQuantStats] = []
        self.expert_tokens: dict[str, list[int]] = {}
        self.val_fp: list[torch.Tensor] = []
        self.val_q: list[torch.Tensor] = []
        self.calibration: list[torch.Tensor] = []
        self.val_inputs: list[LayerInputs] = []
        self.calibration_inputs: list[LayerInputs] = []
        self.calibrating = False

    def targets(self, part: Callable[[str], bool]) -> dict[str, nn.Module]:
        return {name: self.model.get_submodule(name) for name in self.target_names if part(name)}

    def run(self, val_batches, calibration_batches, writer: QuantizedWriter) -> StreamResult:
        model = self.model
        load_checkpoint_part(model, self.ckpt_dir, None, self.weight_map)
        outside_before = state_bytes(model)
        self.calibrating = calibration_batches is not None
        self._embed(val_batches, calibration_batches or [])
        errors, layers_before, layers_after, largest = [], 0, 0, 0
        for i in range(model.config.num_layers):
            before, after, error = self._layer(i, writer)
            _return_freed_memory()
            layers_before, layers_after, largest = layers_before + before, layers_after + after, max(largest, before)
            errors.append(error)
            self.on_part(f"layer {i}")
        (loss_before, tokens), (loss_after, _) = self._head()
        writer.write(*_outside_part(model))
        self.on_part("head")
        return StreamResult(
            loss_before=loss_before,
            loss_after=loss_after,
            eval_tokens=tokens,
            stats=self.stats,
            layer_output_errors=errors,
            model_bytes_before=outside_before + layers_before,
            model_bytes_after=state_bytes(model) + layers_after,
            largest_layer_bytes=largest,
            expert_tokens=self.expert_tokens,
            dtype=str(model.model.embed_tokens.weight.dtype).removeprefix("torch."),
        )

    def _layer(self, i: int, writer: QuantizedWriter) -> tuple[int, int, float]:
        """Load decoder layer i, move the streams through it while its targets are quantized, write it, free it:
        (its bytes before, after, the val rows' hidden-state error after it)."""
        model = self.model
        load_checkpoint_part(model, self.ckpt_dir, i, self.weight_map)
        _return_freed_memory()  # the published tensors the experts were stacked from
        layer = model.model.layers[i]
        before = state_bytes(layer)
        self._through(self.targets(lambda n: layer_of(n) == i), lambda x, inputs: run_layer(model, layer, x, inputs))
        specs = {f"model.layers.{i}.{n}": m.spec() for n, m in quantized_modules(layer).items()}
        writer.write(layer.state_dict(prefix=f"model.layers.{i}."), specs)
        after = state_bytes(layer)
        with torch.device("meta"):
            model.model.layers[i] = DecoderLayer(model.config, i).eval()  # frees the layer
        return before, after, _relative_error(self.val_q, self.val_fp)

    def _embed(self, val_batches: list[dict], calibration_batches: list[dict]) -> None:
        """The streams at the first decoder layer; quantized targets of the vision encoder and adapter (when not
        skipped) are calibrated and quantized here, where they run."""
        model = self.model
        val = [embed(model, b) for b in val_batches]
        self.val_fp, self.val_inputs = [x for x, _ in val], [inp for _, inp in val]
        vision = self.targets(lambda n: layer_of(n) is None and n != "lm_head")
        with recording(vision if self.calibrating else {}) as calibration:
            embedded = [embed(model, b) for b in calibration_batches]
        self.calibration, self.calibration_inputs = [x for x, _ in embedded], [inp for _, inp in embedded]
        if not vision:
            self.val_q = list(self.val_fp)
            return
        self._quantize(vision, calibration if self.calibrating else None)
        self.val_q = [embed(model, b)[0] for b in val_batches]
        if self.sequential:
            self.calibration = [embed(model, b)[0] for b in calibration_batches]

    def _through(self, targets: dict[str, nn.Module], forward) -> None:
        """Move every stream through one part: val_fp before its targets are quantized, calibration recorded then
        (sequential) again through the quantized part, val_q after."""
        self.val_fp = [forward(x, inp) for x, inp in zip(self.val_fp, self.val_inputs, strict=True)]
        with recording(targets if self.calibrating else {}) as calibration:
            moved = [forward(x, inp) for x, inp in zip(self.calibration, self.calibration_inputs, strict=True)]
        if targets:
            self._quantize(targets, calibration if self.calibrating else None)
            if self.sequential:
                moved = [forward(x, inp) for x, inp in zip(self.calibration, self.calibration_inputs, strict=True)]
        self.calibration = moved
        self.val_q = [forward(x, inp) for x, inp in zip(self.val_q, self.val_inputs, strict=True)]

    def _head(self) -> tuple[tuple[float, int], tuple[float, int]]:
        """((loss before, tokens), (loss after, tokens)) from the final hidden states; the head quantized in between
        when it is a target, calibrated on the calibration stream's final norm."""
        model = self.model
        before = _mean_loss(model, self.val_fp, self.val_inputs)
        head = self.targets(lambda n: n == "lm_head")
        if head:
            with recording(head if self.calibrating else {}) as calibration:
                for x in self.calibration:
                    model.lm_head(model.model.norm(x))
            self._quantize(head, calibration if self.calibrating else None)
        self.calibration = []
        return before, _mean_loss(model, self.val_q, self.val_inputs)

    def _quantize(self, targets: dict[str, nn.Module], calibration: Calibration | None) -> None:
        """Replace `targets` in the model by their quantized modules; the full-precision ones go (`targets` is
        emptied) before the streams move on through the quantized part."""
        self.stats += self.quantize_part(self.model, targets, calibration)
        targets.clear()
        if calibration is not None:
            self.expert_tokens |= {name: stats.tokens for name, stats in calibration.experts.items()}


def _return_freed_memory() -> None:
    """Hand the freed layer's heap back to the system (glibc keeps freed chunks below its mmap threshold, which
    grows to 32 MiB as large blocks are freed, so the process would otherwise keep a layer's worth of small
    tensors, such as one expert's, in its resident size). No-op where the C library has no malloc_trim."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _outside_part(model: ErnieForCausalLM) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors and quantized-module specs outside the decoder layers (a tied head left out)."""
    tensors = {k: v for k, v in model.state_dict().items() if layer_of(k) is None}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    specs = {name: m.spec() for name, m in quantized_modules(model).items() if layer_of(name) is None}
    return tensors, specs


def _mean_loss(model, hidden: list[torch.Tensor], inputs: list[LayerInputs]) -> tuple[float, int]:
    total, count = 0.0, 0
    for x, inp in zip(hidden, inputs, strict=True):
        loss, tokens = batch_loss(model, x, inp)
        total, count = total + loss, count + tokens
    if count == 0:
        raise ValueError("the validation rows have no supervised tokens (all labels are -100)")
    return total / count, count


def _relative_error(approx: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    err = sum(float((a.float() - e.float()).pow(2).sum()) for a, e in zip(approx, exact, strict=True))
    norm = sum(float(e.float().pow(2).sum()) for e in exact)
    return (err / norm) ** 0.5 if norm > 0 else 0.0
