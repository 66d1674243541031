"""Trellis-coded quantization (TCQ): 2 bits per weight through a bit-shift convolutional code, with GPTQ's
error feedback.

The format is `ernie.quant_tcq`'s: along each row, weight t reads its value from the window of the
last L code bits (its own k-bit code on top), so a code sequence is a path through a trellis of
2**(L-k) states and the 2**L values of the table are reachable from the stream at k bits a
weight. The idea is CCQ's (Zhou et al. 2025, arXiv:2507.07145: overlapping bit windows of a
convolutional code map 2-bit stored codes into a larger value space, decoded by bit shifts);
the value table (a normal's quantiles in a hashed order, no stored codebook) and the Viterbi
search under GPTQ's feedback follow QTIP (Tseng et al. 2024, arXiv:2406.11235) and GPTQ
(Frantar et al. 2022). On i.i.d. normal data, L = 10 leaves a mean squared error of 0.073 of the
variance at 2 bits a weight (and a scale per 32), where the best scalar 2-bit grid (Lloyd-Max)
leaves 0.1175.

For a weight W [out, in] with input Hessian H (`gptq.HessianAccumulator`) and U the upper
Cholesky factor of H^-1:
1. Columns are coded in blocks of `block_size`, left to right. A block's scales (one per row and
   group of `group_size` inputs) start at the RMS of its weights as updated so far.
2. Viterbi over the block, each row a separate trellis, with per-survivor feedback: every state
   keeps its own copy of the block's remaining weights, updated with GPTQ's rule (the error of
   column j, divided by U_jj, spread along row j of U) for the path that reaches it; a step
   costs the squared scaled error, so a path's cost is GPTQ's objective for its codes. The search
   runs 2L/k columns past the block (a code shapes the next L/k weights), then the row's cheapest
   path fixes the block's codes and the next block's start state. The first block may start in
   any state; the row's lead-in codes record which.
3. `scale_updates` times: with the codes fixed, the block's scales are refitted by least squares
   to the same objective, ||(W_blk - Q_blk) U_blk^-1||^2, and the block coded again; the cheapest
   (codes, scales) is kept.
4. The block's error is fed to every later column (GPTQ's lazy block update).
Scales are used as stored (fp16 by default), so the feedback sees the weights the model runs.

Not as published: CCQ's own value mapping ("linear" codebook, Hybrid Encoding, Code Cluster) is
not described in enough detail to reproduce, and the plain linear mapping (window read as an
integer on a uniform grid) gains nothing over scalar 2-bit in our measurements, hence the
hashed normal table; no incoherence processing (QTIP's random Hadamard transforms); the trellis
runs along the input dim of each row so that GPTQ's column order is kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from ernie.moe import GroupedExperts
from ernie.quant_tcq import TCQGroupedExperts, TCQLinear, lead_in, trellis_values

from .config import TCQSettings
from .gptq import GPTQLog, _upper_cholesky_of_inverse
from .rtn import LayerQuantStats, _combine, _rel_error

if TYPE_CHECKING:
    from .calibration import Calibration


def tcq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, settings: TCQSettings, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] and H [in, in] -> (codes uint8 [out, lead-in + in], scales [out, in/group_size]), `ernie.quant_tcq`'s
    layout: each row's stream starts in the trellis state that serves it best (its lead-in codes)."""
    out_features, in_features = weight.shape
    if settings.problem():
        raise ValueError(settings.problem())
    if in_features % settings.group_size:
        raise ValueError(f"group_size={settings.group_size} does not divide the input dim {in_features}")
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"the Hessian is {tuple(hessian.shape)}, the weight's input dim is {in_features}")
    with _one_thread_on_cpu(weight.device):
        return _tcq_quantize(weight, hessian, settings, scale_dtype)


@contextmanager
def _one_thread_on_cpu(device: torch.device):
    """The Viterbi runs thousands of small steps: on CPU, intra-op threads cost more than they give (a 64 x 64
    weight took 1.8 s with 2 threads, 0.23 s with 1, on a 2-core machine)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tcq_quantize(weight, hessian, settings: TCQSettings, scale_dtype: torch.dtype):
    out_features, in_features = weight.shape
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone().to(W.device)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _upper_cholesky_of_inverse(H, settings.damp)
    trellis = _Trellis(settings.bits, settings.window_bits, W.device)
    g = settings.group_size

    lead = lead_in(settings.bits, settings.window_bits)
    codes = torch.empty(out_features, lead + in_features, dtype=torch.uint8, device=W.device)
    scales = torch.empty(out_features, in_features // g, dtype=scale_dtype, device=W.device)
    state = None  # the first block starts anywhere; the lead-in codes say where
    # a block's last codes also shape the next block's first weights: the search looks this many columns past
    # the block's end before it commits, and the next block codes them again
    lookahead = 2 * (settings.window_bits // settings.bits)
    for start in range(0, in_features, settings.block_size):
        end = min(start + settings.block_size, in_features)
        reach = min(end + lookahead, in_features)
        groups_end = -(-reach // g) * g
        scale = W[:, start:groups_end].pow(2).reshape(out_features, -1, g).mean(-1).sqrt()
        window, U_win = W[:, start:reach], U[start:reach, start:reach]
        block_codes, scale, first, state, error = _code_block(
            trellis, window, U_win, scale, state, end - start, settings, scale_dtype
        )
        if start == 0:
            codes[:, :lead] = trellis.lead_in_codes(first)
        codes[:, lead + start : lead + end] = block_codes
        scales[:, start // g : end // g] = scale.to(scale_dtype)
        W[:, end:] -= error @ U[start:end, end:]
    return codes, scales


def _code_block(trellis, window, U_win, scale, state, n: int, settings: TCQSettings, scale_dtype):
    """Code the first n columns of `window` (the block and its lookahead) from each row's start `state` (None: any):
    (codes [out, n], scales [out, n/g], the state before the first column and after column n, the block's error E
    with E @ U_blk = W_blk - Q_blk), the cheapest of the first search and of those after each scale refit."""
    g = settings.group_size
    best, values = None, None
    for attempt in range(settings.scale_updates + 1):
        if attempt:  # refit to the last search's values
            scale[:, : n // g] = _refit_scales(window[:, :n], values[:, :n], U_win[:n, :n], g)
        scale = scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).float()
        scale_cols = scale.repeat_interleave(g, 1)[:, : window.shape[1]]
        codes, values, states = trellis.search(window, scale_cols, U_win, state)
        q = values[:, :n] * scale_cols[:, :n]
        error = torch.linalg.solve_triangular(U_win[:n, :n], window[:, :n] - q, upper=True, left=False)
        cost = float(error.pow(2).sum())
        if best is None or cost < best[0]:
            best = (cost, codes[:, :n], scale[:, : n // g].clone(), states[:, 0], states[:, n], error)
    return best[1:]


class _Trellis:
    """The code's trellis: state p = the last window_bits - bits bits; code b moves it to b << (L-2k) | p >> k
    through the window b << (L-k) | p."""

    def __init__(self, bits: int, window_bits: int, device) -> None:
        self.codes, self.states = 2**bits, 2 ** (window_bits - bits)
        self.fan = self.states // self.codes  # states sharing a predecessor's high bits
        self.bits, self.lead = bits, lead_in(bits, window_bits)
        code, prior = torch.arange(self.codes, device=device), torch.arange(self.states, device=device)
        self.values = trellis_values(window_bits).to(device)[(code[:, None] << (window_bits - bits)) | prior]  # [K, S]

    def lead_in_codes(self, state: torch.Tensor) -> torch.Tensor:
        """The codes [out, lead-in], oldest first, that leave each row's stream in `state` [out]."""
        shifts = self.bits * torch.arange(self.lead, device=state.device)
        return ((state[:, None] >> shifts) & (self.codes - 1)).to(torch.uint8)

    def search(self, block, scale_cols, U_blk, start_state):
        """Per-survivor Viterbi over a block [out, n] from each row's start state (None: the best of any) ->
        the cheapest path's codes [out, n], unscaled values [out, n] and states [out, n + 1] (before each column,
        then after the last)."""
        out_features, n = block.shape
        K, S, fan = self.codes, self.states, self.fan
        rows = torch.arange(out_features, device=block.device)
        if start_state is None:
            cost = torch.zeros(out_features, S, device=block.device)
        else:
            cost = torch.full((out_features, S), float("inf"), device=block.device)
            cost[rows, start_state] = 0.0
        work = block[:, None, :].expand(out_features, S, n).clone()  # each survivor's feedback-updated columns
        back = torch.empty(n, out_features, S, dtype=torch.int16, device=block.device)  # S <= MAX_STATES
        for j in range(n):
            # candidates [row, code, prior state]; prior = high * K + low, the new state is code * fan + high
            error = (work[:, None, :, 0] - scale_cols[:, j, None, None] * self.values) / U_blk[j, j]
            total = (cost[:, None, :] + error.pow(2)).reshape(out_features, K, fan, K)
            cost, low = total.min(-1)
            cost = cost.reshape(out_features, S)
            prior = (torch.arange(fan, device=block.device) * K + low).reshape(out_features, S)
            back[j] = prior
            chosen = error.reshape(out_features, K, fan, K).gather(-1, low[..., None]).reshape(out_features, S)
            rest = work[:, :, 1:].gather(1, prior[..., None].expand(-1, -1, n - j - 1))
            work = rest - chosen[..., None] * U_blk[j, j + 1 :]
        state = cost.argmin(-1)
        codes = torch.empty(out_features, n, dtype=torch.long, device=block.device)
        values = torch.empty(out_features, n, device=block.device)
        states = torch.empty(out_features, n + 1, dtype=torch.long, device=block.device)
        states[:, n] = state
        for j in reversed(range(n)):
            code, prior = state // self.fan, back[j][rows, state].long()
            codes[:, j], values[:, j], states[:, j] = code, self.values[code, prior], prior
            state = prior
        return codes.to(torch.uint8), values, states


def _refit_scales(block, values, U_blk, group_size: int) -> torch.Tensor:
    """Per row, the scales [out, n/g] minimising ||(w - q) U_blk^-1||^2 for q = scale * values (least squares)."""
    out_features, n = block.shape
    groups = n // group_size
    inverse = torch.linalg.solve_triangular(U_blk, torch.eye(n, device=block.device), upper=True)
    P = inverse @ inverse.T
    member = torch.nn.functional.one_hot(torch.arange(n, device=block.device) // group_size, groups).float()  # [n, G]
    V = values[:, :, None] * member  # [out, n, G]: q = V @ scale
    gram = V.mT @ P @ V
    rhs = (V.mT @ (P @ block.T).T[..., None])[..., 0]
    ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-20)
    eye = torch.eye(groups, device=block.device)
    return torch.linalg.solve(gram + ridge[:, None, None] * eye, rhs).abs()


def tcq_weight_quantizer(
    calibration: Calibration, settings: TCQSettings, min_expert_tokens: int, scale_dtype: torch.dtype, log: GPTQLog
):
    """(name, weight [..., out, in]) -> (codes, scales) from the calibration's Hessians, per expert for expert
    pools, with GPTQ's fallbacks: the pool's Hessian for an expert that saw too few tokens, the identity
    (plain trellis coding of the weights) for a module no calibration token reached."""

    def hessian_of(name: str, expert: int | None, in_features: int) -> torch.Tensor:
        try:
            if expert is None:
                return calibration.linear[name].hessian()
            pool, which = name.rsplit(".", 1)
            hessian, source = calibration.expert_hessian(pool, which, expert, min_expert_tokens)
        except ValueError as err:
            if "no calibration token" not in str(err):
                raise
            if name not in log.uncalibrated:
                log.uncalibrated.append(name)
            return torch.eye(in_features)  # tcq_quantize moves it to the weight's device
        if source == "pooled":
            log.pooled_experts[name] = log.pooled_experts.get(name, 0) + 1
        return hessian

    def quantize(name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if weight.dim() == 2:
            return tcq_quantize(weight, hessian_of(name, None, weight.shape[1]), settings, scale_dtype)
        parts = [
            tcq_quantize(w, hessian_of(name, e, weight.shape[-1]), settings, scale_dtype) for e, w in enumerate(weight)
        ]
        return tuple(torch.stack(p) for p in zip(*parts, strict=True))

    return quantize


def quantize_model_tcq(
    model: nn.Module, targets: dict[str, nn.Module], quantize, settings: TCQSettings, scale_dtype, on_layer=None
) -> list[LayerQuantStats]:
    """Replace every target of `model` (in place) by its `ernie.quant_tcq` module, codes from `quantize`
    (`tcq_weight_quantizer`); one `LayerQuantStats` per module."""
    code = (settings.bits, settings.window_bits)
    stats = []
    for name, module in targets.items():
        if isinstance(module, GroupedExperts):
            E, two_i, H = module.gate_up_proj.shape
            qmodule = TCQGroupedExperts(E, H, two_i // 2, *code, settings.group_size, scale_dtype)
            weights = {"gate_up": module.gate_up_proj, "down": module.down_proj}
            for which, w in weights.items():
                getattr(qmodule, which).fill(*quantize(f"{name}.{which}", w))
            errors = [_rel_error(w, getattr(qmodule, which).dequantize()) for which, w in weights.items()]
            before = sum(w.numel() * w.element_size() for w in weights.values())
            kind = "experts"
        else:
            codes, scales = quantize(name, module.weight)
            qmodule = TCQLinear.from_codes(codes, scales, settings.group_size, *code, module.bias)
            errors = [_rel_error(module.weight, qmodule.dequantize())]
            before = module.weight.numel() * module.weight.element_size()
            kind = "linear"
        qmodule.to(next(iter(module.parameters())).device)
        model.set_submodule(name, qmodule)
        stats.append(LayerQuantStats(name, kind, _combine(errors), before, qmodule.nbytes(), settings.bits))
        if on_layer is not None:
            on_layer(stats[-1])
    return stats
