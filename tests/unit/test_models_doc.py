"""docs/models.md is generated from the tests' table of families: it may not drift from the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_models_doc_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_models_doc", ROOT / "scripts" / "gen_models_doc.py")
    gen = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(gen)  # type: ignore[union-attr]
    assert (ROOT / "docs" / "models.md").read_text() == gen.render(), \
        "docs/models.md is out of date: run python scripts/gen_models_doc.py"
