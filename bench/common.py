"""What every bench script records beside its figures."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path


def package_version(distribution: str) -> str | None:
    """The installed version of `distribution`, None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def write_report(out: str | Path, report: dict) -> None:
    """The bench's JSON at `out` (its directory made if missing)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
