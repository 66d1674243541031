"""Packed rows in a deterministic, resumable order.

The row stream is an endless sequence of epochs; epoch `e` visits every train row once in
a permutation drawn from (seed, e). Step `t` (0-based) takes stream positions
[t * B, (t + 1) * B) for a global batch of B rows and worker `r` of W takes its contiguous
B / W of them. The data cursor is the number of rows consumed (t * B): from it alone a
resumed run continues with the very next row, across epoch boundaries too, with nothing
replayed or skipped, for any number of workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.contract import UserError
from pipeline.formats import load_rows

TRAIN_FIELDS = ("input_ids", "labels", "document_ids", "position_ids")


class RowStream:
    """Row indices by stream position (see the module docstring)."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows, self.seed = num_rows, seed
        self._permutations: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {k: v for k, v in self._permutations.items() if k >= epoch - 1}
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._permutations[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        positions = np.arange(start, start + count)
        epochs, offsets = np.divmod(positions, self.num_rows)
        return np.array([self._epoch(int(e))[o] for e, o in zip(epochs, offsets, strict=True)], dtype=np.int64)

    def worker_batch(self, step: int, global_batch: int, rank: int, world: int) -> np.ndarray:
        """Row indices of worker `rank` for 0-based step `step`."""
        per_worker = global_batch // world
        return self.take(step * global_batch + rank * per_worker, per_worker)


def load_split(dataset_dir: Path, split: str) -> dict[str, np.ndarray]:
    """{field: [N, S]} of the dataset's `split` shards; a missing split is a `UserError`."""
    directory = dataset_dir / split
    if not any(directory.glob("shard-*.tar")):
        raise UserError(f"the dataset artifact at {dataset_dir} has no {split}/shard-*.tar files; rerun the data stage")
    rows = load_rows(directory)
    return {name: rows[name] for name in TRAIN_FIELDS}


def to_batch(rows: dict[str, np.ndarray], index: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """The selected rows as model inputs (int64 tensors on `device`)."""
    return {name: torch.from_numpy(rows[name][index].astype(np.int64)).to(device) for name in TRAIN_FIELDS}
