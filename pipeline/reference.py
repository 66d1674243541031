"""The configuration reference (docs/configuration.md), generated from the schemas so it cannot drift.

    python -m pipeline.reference > docs/configuration.md

Every key of `PipelineConfig`, section by section: its type, its default in the schema (presets under
conf/ set their own) and the docstring written under the field in its dataclass.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from functools import cache

from .config import PipelineConfig

HEADER = """# Configuration reference

Generated from the typed dataclasses by `python -m pipeline.reference > docs/configuration.md`
(tests/test_config_reference.py fails when this file and the schemas disagree). Every key can be set in
a preset (`conf/NAME.yaml` and the groups it includes) or on the command line as `section.key=value`;
each run records its composed configuration as `config.yaml` in its MLflow parent run. Defaults here are
the schema's: the presets set many of them (`conf/tiny.yaml` shrinks everything for CPU rehearsal).
"""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal written right under it in the class body (one paragraph)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:] + [None], strict=True):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(value) -> str:
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if dataclasses.is_dataclass(value):
        return f"`{type(value).__name__}()`"
    try:
        return f"`{json.dumps(value)}`"
    except TypeError:
        return f"`{value!r}`"


def _optional_dataclass(hint) -> type | None:
    """X for a `X | None` hint whose X is a dataclass."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]) and type(None) in typing.get_args(hint):
        return args[0]
    return None


def _list_of_dataclass(hint) -> type | None:
    """X for a `list[X]` hint whose X is a dataclass."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("|", "or").replace("typing.", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sections(cls: type = PipelineConfig, prefix: str = "") -> list[tuple[str, type, list[tuple]]]:
    """(section path, its dataclass, rows (key, type, default, doc)) depth first; nested dataclasses are sections
    of their own, lists of dataclasses (data sources) are shown by their element's fields."""
    rows, nested = [], []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        default = _default(f)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(default):
            nested.append((key, type(default), docs.get(f.name, "")))
            continue
        optional = _optional_dataclass(hints.get(f.name))
        if default is None and optional is not None:
            doc = docs.get(f.name) or f"null, or the keys of `{key}` below"
            rows.append((key, f"{optional.__name__} or None", "`null`", doc))
            nested.append((key, optional, doc))
            continue
        element = _list_of_dataclass(hints.get(f.name))
        if element is not None:
            names = [getattr(item, "name", type(item).__name__) for item in default or []]
            shown = f"`{json.dumps(names)}` (names)" if names else "`[]`"
            rows.append((key, _type_name(f), shown, docs.get(f.name, "")))
            nested.append((key + "[]", element, ""))
            continue
        rows.append((key, _type_name(f), _shown(default), docs.get(f.name, "")))
    out = [(prefix.rstrip(".") or "(top level)", cls, rows)]
    for key, sub, _doc in nested:
        out += sections(sub, key + ".")
    return out


def render() -> str:
    parts = [HEADER]
    for path, cls, rows in sections():
        if not rows:
            continue
        intro = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        parts.append(f"\n## `{path}`\n")
        if intro and not intro.startswith(f"{cls.__name__}("):
            parts.append(f"\n{intro}\n")
        parts.append("\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for key, type_name, default, doc in rows:
            parts.append(f"| `{key}` | {_cell(type_name)} | {_cell(default)} | {_cell(doc)} |\n")
    return "".join(parts)


def undocumented() -> list[str]:
    """Keys with no docstring under their field."""
    return [key for _path, _cls, rows in sections() for key, _t, _d, doc in rows if not doc]


if __name__ == "__main__":
    print(render(), end="")
