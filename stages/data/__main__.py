"""`python -m stages.data OUT_DIR [seed=N] [field=value ...]`: build a dataset without the pipeline."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from pipeline.contract import StageContext, UserError

from .config import Config
from .stage import run


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip())
        return 2
    overrides = dict(arg.split("=", 1) for arg in argv[1:])
    seed = int(overrides.pop("seed", 0))
    types = {f.name: f.type for f in dataclasses.fields(Config) if f.type in ("int", "float")}
    try:
        unknown = sorted(set(overrides) - set(types))
        if unknown:
            raise UserError(f"unknown data config keys {unknown}; known: {sorted(types)} and seed")
        casts = {"int": int, "float": float}
        config = Config(**{k: casts[types[k]](v) for k, v in overrides.items()})
        ctx = StageContext("data", config, None, {}, Path(argv[0]), seed=seed)
        started = time.perf_counter()
        result = run(ctx)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.metrics, indent=2))
    print(f"{result.summary} [{time.perf_counter() - started:.1f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
