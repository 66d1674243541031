"""docs/configuration.md is generated from the schemas: it must say what the code says, and every key is documented."""

from __future__ import annotations

from pathlib import Path

from pipeline.reference import render, sections, undocumented

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_reference_in_docs_is_the_one_the_schemas_generate():
    assert DOC.read_text() == render(), "regenerate it: python -m pipeline.reference > docs/configuration.md"


def test_every_key_has_a_docstring_under_its_field():
    assert undocumented() == []


def test_the_reference_walks_nested_and_optional_sections():
    paths = {path for path, _cls, _rows in sections()}
    assert {"model.moe", "model.vision", "posttrain.dpo", "quantize.resources", "serve"} <= paths
    keys = {key for _path, _cls, rows in sections() for key, *_ in rows}
    assert {"quantize.module_bits", "model.moe", "posttrain.recipe", "artifacts.root"} <= keys
