"""Package attributes that import their module on first use (PEP 562 `__getattr__`).

A package whose `__init__` imports everything makes every importer pay for torch; with this,
`import ernie.config` (or `stages.data.encode` in a Ray Data worker) stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(
    package: str, namespace: dict, exports: dict[str, str], fallback: str | None = None
) -> Callable[[str], object]:
    """`__getattr__` for `package`: `exports` maps a name to the submodule defining it; any other
    name is tried as a submodule, so `import pkg; pkg.sub` works as if `__init__` had imported it,
    and then in the `fallback` submodule (a stage's own module, whose every name the package shows)."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        try:
            return importlib.import_module(f".{name}", package)
        except ModuleNotFoundError as error:
            if error.name != f"{package}.{name}":
                raise
        if fallback is not None and not name.startswith("__"):
            module = importlib.import_module(f".{fallback}", package)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
