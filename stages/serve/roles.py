"""Which worker does prefill and which decodes: the policy of PD serving's dynamic roles (no Ray here).

    policy = RoleSwitchPolicy(prefill_high=4, decode_high=32, min_dwell_s=30)
    move = decide(policy, workers, now, ttft_s, tpot_s)   # None, or (worker, new role, reason)

Prefill is compute-bound and runs one request at a time; decode batches, so one decode worker carries
many streams. A fixed split fits one load mix only: long prompts with short answers queue at the
prefill workers while decode workers idle, long answers pile streams onto the decode workers while
prefill workers idle. `decide` moves one worker toward the side under pressure, but only when the side
that gives it up still has room afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PREFILL, DECODE = "prefill", "decode"
ROLES = (PREFILL, DECODE)


@dataclass
class RoleSwitchPolicy:
    """When a worker changes role. Loads are requests sent to workers and not done yet (queued +
    running) as the router counts them: prefills per prefill worker, decode streams per decode worker.
    A switch needs pressure on one side (its `_high` mark, or its latency over its SLO while the other
    side's is not) and room on the other after the switch (its `_low` mark, below its `_high`): that
    gap is the hysteresis, so no switch makes the reverse one due at once. A worker keeps a role at
    least `min_dwell_s` (its first role excepted), and each role keeps one worker."""

    enabled: bool = True
    """Off: roles change only by `PDEngine.set_role`."""
    interval_s: float = 1.0
    """How often the controller looks at the load (one switch at most per look)."""
    min_dwell_s: float = 30.0
    """Least time a worker keeps a role before it may switch again (no flapping)."""
    prefill_high: float = 4.0
    """Prefills in flight per prefill worker from which a decode worker is wanted for prefill."""
    prefill_low: float = 1.0
    """Most prefills in flight per prefill worker left after one of them turns to decode."""
    decode_high: float = 32.0
    """Decode streams per decode worker from which a prefill worker is wanted for decode."""
    decode_low: float = 8.0
    """Most decode streams per decode worker left after one of them turns to prefill."""
    ttft_slo_s: float | None = None
    """Median time to first token (recent requests) above this is prefill pressure; None: not used."""
    tpot_slo_s: float | None = None
    """Median time per output token (recent requests) above this is decode pressure; None: not used."""
    window_s: float = 30.0
    """The TTFT / TPOT medians are over requests of this many seconds back."""

    def __post_init__(self) -> None:
        if not (0 <= self.prefill_low < self.prefill_high and 0 <= self.decode_low < self.decode_high):
            raise ValueError(
                "RoleSwitchPolicy needs 0 <= prefill_low < prefill_high and 0 <= decode_low < decode_high "
                f"(got {self.prefill_low}, {self.prefill_high}, {self.decode_low}, {self.decode_high})"
            )
        if self.interval_s <= 0 or self.min_dwell_s < 0 or self.window_s <= 0:
            raise ValueError("RoleSwitchPolicy needs interval_s > 0, min_dwell_s >= 0, window_s > 0")


@dataclass
class PDSettings:
    """serve.mode=pd: the workers behind the replica and their roles."""

    workers: int = 2
    """Worker actors, each holding the model; at least one prefills and one decodes."""
    prefill_workers: int = 1
    """Workers that start as prefill workers (the rest decode); role switching moves them."""
    worker_cpus: float = 1.0
    """CPUs per worker (torch threads: their whole part)."""
    worker_gpus: float = 0.0
    """GPUs per worker (a worker with one runs its model on CUDA)."""
    roles: RoleSwitchPolicy = field(default_factory=RoleSwitchPolicy)
    """When a worker changes role (enabled=false: never by itself)."""


@dataclass
class WorkerLoad:
    """A worker as the router sees it."""

    index: int
    role: str
    since: float = -math.inf
    """When it took its role (time.monotonic); -inf: its first role, which any dwell allows to change."""
    prefills: int = 0
    """Prefills sent to it and not returned yet."""
    decodes: int = 0
    """Decode streams sent to it and not ended yet."""

    @property
    def load(self) -> int:
        return self.prefills + self.decodes


@dataclass(frozen=True)
class RoleSwitch:
    time: float
    """time.time() of the switch."""
    worker: int
    from_role: str
    to_role: str
    reason: str


def decide(
    policy: RoleSwitchPolicy, workers: list[WorkerLoad], now: float, ttft_s: float | None, tpot_s: float | None
) -> tuple[WorkerLoad, str, str] | None:
    """The worker to move, its new role and why; None: the roles fit the load. The least-loaded worker
    that has dwelt long enough moves (it has the least old-role work to finish)."""
    if not policy.enabled:
        return None
    count = {role: sum(w.role == role for w in workers) for role in ROLES}
    if not (count[PREFILL] and count[DECODE]):
        return None
    prefills, decodes = sum(w.prefills for w in workers), sum(w.decodes for w in workers)
    per = {PREFILL: prefills / count[PREFILL], DECODE: decodes / count[DECODE]}
    slow = {
        PREFILL: policy.ttft_slo_s is not None and ttft_s is not None and ttft_s > policy.ttft_slo_s,
        DECODE: policy.tpot_slo_s is not None and tpot_s is not None and tpot_s > policy.tpot_slo_s,
    }
    high = {PREFILL: policy.prefill_high, DECODE: policy.decode_high}
    low = {PREFILL: policy.prefill_low, DECODE: policy.decode_low}
    total = {PREFILL: prefills, DECODE: decodes}
    latency = {PREFILL: ("TTFT", ttft_s, policy.ttft_slo_s), DECODE: ("TPOT", tpot_s, policy.tpot_slo_s)}
    for want, give in ((PREFILL, DECODE), (DECODE, PREFILL)):
        pressed = per[want] >= high[want] or (slow[want] and not slow[give])
        if not pressed or count[give] < 2:
            continue
        left = total[give] / (count[give] - 1)
        if left > low[give]:
            continue
        movable = [w for w in workers if w.role == give and now - w.since >= policy.min_dwell_s]
        if not movable:
            continue
        worker = min(movable, key=lambda w: (w.load, w.index))
        if per[want] >= high[want]:
            why = f"{total[want]} {want}s in flight over {count[want]} {want} workers (>= {high[want]:g} each)"
        else:
            name, value, slo = latency[want]
            why = f"{name} {value:.3f}s over its SLO {slo:g}s"
        room = f"{total[give]} {give}s fit {count[give] - 1} {give} workers (<= {low[give]:g} each)"
        return worker, want, f"{why}; {room}"
    return None
