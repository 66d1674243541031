"""What every bench script records beside its figures."""

from __future__ import annotations

from importlib import metadata


def package_version(distribution: str) -> str | None:
    """The installed version of `distribution`, None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
