"""`python -m stages.data OUT_DIR [seed=N] [model=PRESET] [field=value ...]`: build a dataset without the pipeline.

`model` names an `ernie.presets` preset (default tiny_vl; its vocabulary is set to data.vocab_size);
scalar fields of `stages.data.Config` are set as key=value (sources come from the config's default).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from ernie import get_preset
from pipeline.contract import StageContext, UserError

from .config import Config
from .stage import run

CASTS = {"int": int, "float": float, "str": str}


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip())
        return 2
    overrides = dict(arg.split("=", 1) for arg in argv[1:])
    seed = int(overrides.pop("seed", 0))
    preset = overrides.pop("model", "tiny_vl")
    types = {f.name: f.type for f in dataclasses.fields(Config) if f.type in CASTS}
    try:
        unknown = sorted(set(overrides) - set(types))
        if unknown:
            raise UserError(f"unknown data config keys {unknown}; known: {sorted(types)}, seed and model")
        config = Config(**{k: CASTS[types[k]](v) for k, v in overrides.items()})
        model = get_preset(preset).replace(vocab_size=config.vocab_size)
        ctx = StageContext("data", config, model, {}, Path(argv[0]), seed=seed)
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
