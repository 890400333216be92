"""The generated reference pages are current: docs/configuration.md and docs/cli.md equal what
`python -m sdzero.reference docs` writes from the code today."""

from pathlib import Path

import pytest

from sdzero.reference import PAGES, config_sections, field_docstrings, undocumented_fields

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("name", sorted(PAGES))
def test_generated_page_is_current(name):
    committed = (DOCS / name).read_text()
    assert committed == PAGES[name](), (
        f"docs/{name} is stale: run `PYTHONPATH=src python -m sdzero.reference docs` and commit the result")


def test_field_docstrings_are_read_from_the_source():
    from sdzero.distill import DistillConfig

    docs = field_docstrings(DistillConfig)
    assert docs["top_k"].startswith("Support = the teacher's top-k tokens")
    assert "sync_patience" in docs and "\n" not in docs["divergence"]


def test_every_section_of_the_run_config_is_listed():
    names = [name for name, _ in config_sections()]
    assert names[0] == "" and {"sampling", "collect", "srt", "distill", "eval"} <= set(names)


def test_every_config_field_has_a_docstring():
    assert undocumented_fields() == [], "document these fields where they are defined"
