"""The README keeps every config key and every reason; the docs cannot drift from the code silently."""
from __future__ import annotations

from pathlib import Path

from curate.config import reference
from manifests.schema import REASONS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_documents_every_config_key():
    missing = [key for key, _, _ in reference() if f"`{key}`" not in README]
    assert not missing, f"README.md lacks config keys: {missing}"


def test_readme_lists_every_reason_in_rule_order():
    positions = [README.find(f"`{r}`") for r in REASONS]
    assert -1 not in positions
    assert positions == sorted(positions)


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README
