"""FP8 training linears (torchao float8): the decoder layers' matmuls in FP8 with dynamic scales.

ERNIE 4.5 pretrains with FP8 mixed precision. Each eligible `nn.Linear` of a decoder layer becomes
torchao's `Float8Linear`: forward casts input and weight to float8 e4m3 with one scale per tensor
taken from the current values, backward casts the output gradient to e5m2; matmuls accumulate in
higher precision and the master weights stay as they are (fp32 here). Left in bf16: the routers
(their choice decides which experts run), the output projection (103k-vocabulary logits), the
routed experts (grouped matmuls, not linears) and shapes whose dims are not multiples of 16 (FP8
GEMM constraint). Needs torchao (the `gpu` extra; `dev` for the CPU tests, where torch runs FP8
matmuls too, slowly).
"""

from __future__ import annotations

from torch import nn

from pipeline.contract import UserError


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    leaf = fqn.rsplit(".", 1)[-1]
    if leaf in ("gate", "lm_head"):
        return False
    if isinstance(module, nn.Linear):
        return module.in_features % 16 == 0 and module.out_features % 16 == 0
    return True


def apply_fp8(model: nn.Module) -> int:
    """Swap each decoder layer's eligible linears for `Float8Linear` in place; returns how many."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise UserError(f"pretrain.fp8=true needs torchao (pip install torchao==0.18.0): {err}") from None
    for layer in model.model.layers:
        convert_to_float8_training(layer, module_filter_fn=fp8_eligible)
    return sum(type(m).__name__ == "Float8Linear" for m in model.model.layers.modules())
