"""Train micro-batches streamed from the dataset's shards, resumable from the step count alone.

Each worker reads its own shards of the train split through `pipeline.shards.ShardStream`
(disjoint across ranks, shuffled through a buffer of `pretrain.shuffle_buffer` rows) and takes
consecutive micro-batches of batch_size // num_workers rows (the loop may run each in smaller
pieces of `pretrain.micro_batch_size` rows, accumulating gradients; the data order is the same).
Epoch `e` gives every rank `rows_per_epoch() // micro_batch` steps, the same count on all ranks
by construction; the rows past that are left out of this epoch only, as the next one deals the
shards anew. The data cursor, (epoch, rows consumed in it), is a function of the step count: a
resumed run walks the epochs' step counts to it and continues with the very next micro-batch on
every rank.

VL datasets are ordered by the data stage so that every `data.balance.group_rows` consecutive
train rows have a balanced text:vision share; when the micro-batch is a multiple of that, the
groups pass the shuffle buffer as whole units (`unit_rows`) and micro-batches stay balanced.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.shards import IMAGE_LAYOUT, ShardIndex, ShardStream, iter_rows

Row = dict[str, np.ndarray]


class TrainReader:
    """Worker `rank`'s micro-batches of the train split in `directory`, from any step on.

    The split is dealt into `streams` independent row streams (`ShardStream`s of a world of
    `streams`); worker `rank` of `world` reads the consecutive block of streams/world of them and
    its micro-batch is their rows side by side, each stream giving micro_batch / (streams/world)
    rows a step. The rows of a step, taken over the workers in rank order, depend on `streams`
    only, so a run resumes under any worker count that divides `streams` and continues with the
    very rows it would have read, and runs of 1, 2 or 4 workers with the same streams train on the
    same global batches. Default: one stream per worker.
    """

    def __init__(
        self,
        directory: str,
        rank: int,
        world: int,
        seed: int,
        shuffle_buffer: int,
        micro_batch: int,
        unit_rows: int = 1,
        streams: int | None = None,
    ) -> None:
        streams = streams or world
        if streams % world or micro_batch % (streams // world):
            raise ValueError(
                f"{streams} data streams cannot be split over {world} workers with micro-batches of {micro_batch} "
                "rows: the worker count must divide the streams, and the streams per worker the micro-batch"
            )
        self.directory, self.rank, self.world, self.seed = directory, rank, world, seed
        self.shuffle_buffer, self.micro_batch, self.unit_rows = shuffle_buffer, micro_batch, unit_rows
        self.streams = streams
        per_worker = streams // world
        self.my_streams = range(rank * per_worker, (rank + 1) * per_worker)
        self.stream_rows = micro_batch // per_worker
        """Rows each stream gives a step."""
        self._steps: dict[int, int] = {}

    def stream(self, epoch: int, start_row: int = 0, index: int | None = None) -> ShardStream:
        """Stream `index` (default: this worker's first) of `epoch`, from its row `start_row`."""
        return ShardStream(
            self.directory,
            self.my_streams[0] if index is None else index,
            self.streams,
            self.seed,
            self.shuffle_buffer,
            epoch=epoch,
            start_row=start_row,
            unit_rows=self.unit_rows,
        )

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps every worker takes in `epoch` (each epoch deals the shards anew, so counts may differ)."""
        if epoch not in self._steps:
            steps = self.stream(epoch).rows_per_epoch() // self.stream_rows
            if steps == 0:
                raise ValueError(
                    f"epoch {epoch} of {self.directory} gives each of the {self.streams} data streams fewer rows "
                    f"than the {self.stream_rows} it gives a step: lower the batch size or write smaller shards"
                )
            self._steps[epoch] = steps
        return self._steps[epoch]

    def cursor(self, step: int) -> tuple[int, int]:
        """(epoch, rows of each stream consumed) after `step` optimizer steps."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step * self.stream_rows

    def batches(self, step: int) -> Iterator[list[Row]]:
        """The micro-batches of steps step + 1, step + 2, ... (endless)."""
        epoch, start_row = self.cursor(step)
        while True:
            streams = [iter(self.stream(epoch, start_row, v)) for v in self.my_streams]
            for _ in range(self.steps_in_epoch(epoch) - start_row // self.stream_rows):
                yield [row for rows in streams for row in itertools.islice(rows, self.stream_rows)]
            epoch, start_row = epoch + 1, 0


def unit_rows_for(dataset_dir: Path, train: ShardIndex, micro_batch: int) -> tuple[int, str | None]:
    """Rows that move through the shuffle buffer together, and a note when balance groups cannot be kept.

    Only image (VL) train splits are ordered in balance groups; their size is the data stage's
    `data.balance.group_rows`, recorded in stats.json.
    """
    if train.fields != IMAGE_LAYOUT:
        return 1, None
    stats_file = dataset_dir / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    group_rows = int(stats.get("splits", {}).get("train", {}).get("micro_batches", {}).get("group_rows", 1))
    if micro_batch % group_rows == 0:
        return group_rows, None
    return 1, (
        f"the micro-batch of {micro_batch} rows per worker is not a multiple of the dataset's balance groups of "
        f"{group_rows} rows (data.balance.group_rows): rows are shuffled one by one and micro-batches lose "
        "their text:vision balance"
    )


def load_val_rows(directory: str, limit: int) -> list[Row]:
    """The first `limit` rows of the val split (0 = all); eval sets are small enough to hold."""
    return list(itertools.islice(iter_rows(directory), limit or None))
