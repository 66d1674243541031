"""docs/troubleshooting.md lists every error message the code raises: generated, and kept current here."""

from __future__ import annotations

from pathlib import Path

from pipeline.troubleshooting import messages, render

DOC = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"


def test_the_troubleshooting_index_is_the_one_the_code_generates():
    assert DOC.read_text() == render(), "regenerate it: python -m pipeline.troubleshooting > docs/troubleshooting.md"


def test_the_index_holds_the_messages_users_meet_first():
    found = {(module, name, template) for module, _function, name, template in messages()}
    assert (
        "pipeline.config",
        "UserError",
        "unknown preset conf={name}; available presets: {', '.join(presets())} (files in {CONF_DIR})",
    ) in found
    assert any(m == "pipeline.contract" and "but the Ray cluster has" in t for m, _, t in found)
    assert sum(1 for _, name, _ in found if name == "UserError") > 100
