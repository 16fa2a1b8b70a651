"""The docs cannot drift from the code silently: the config reference is generated, and the README,
the manual's links, commands, config keys and rule order are checked against the code."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from curate.config import Config
from curate.config_doc import LABEL, REQUIRED, RULES_BEGIN, RULES_END, keys, render, rules_table
from manifests.rules import RULES
from manifests.schema import REASONS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MANUAL = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *MANUAL, ROOT / "bench" / "README.md", ROOT / "jobs" / "README.md"]
SECTIONS = {k.key.split(".")[0] for k in keys() if "." in k.key}
FILE_SUFFIXES = {"json", "yaml", "py", "md", "parquet", "html", "tar", "npy", "txt"}


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _code(text: str) -> str:
    """The fenced code blocks and inline code spans of a page, one per line."""
    fenced = re.findall(r"^```.*?^```", text, flags=re.S | re.M)
    return "\n".join(fenced + re.findall(r"`([^`\n]+)`", _prose(text)))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", _prose(_text(path)), flags=re.M)}


def _links(path: Path) -> list[str]:
    prose = _prose(_text(path))
    return re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(r"^\[[^\]]+\]: (\S+)$", prose, flags=re.M)


def test_config_reference_is_generated_from_the_model():
    assert _text(ROOT / "docs" / "config.md") == render(), (
        "docs/config.md differs from the config model: run `python -m curate.config_doc > docs/config.md`")


def _value(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _dumped(**sections) -> dict:
    """A minimal valid config with `sections` on top, as model_dump writes it."""
    data = {"run_dir": "r", "input": {"paths": ["u.parquet"]}}
    for dotted, value in sections.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return Config.model_validate(data).model_dump(mode="json")


def test_reference_keys_and_defaults_are_the_models():
    documented = keys()
    assert {k.key for k in documented if k.default is REQUIRED} == {"run_dir", "input.paths"}
    plain = _dumped()
    for k in documented:
        if k.default is not REQUIRED and LABEL not in k.key:
            assert _value(plain, k.key) == k.default, k.key
    mappings = {k.key.split(f".{LABEL}.")[0] for k in documented if LABEL in k.key}
    labelled = _dumped(**{m: {"x": {}} for m in mappings})
    for k in documented:
        if LABEL in k.key:
            assert _value(labelled, k.key.replace(LABEL, "x")) == k.default, k.key

    names = {k.key for k in documented}

    def undocumented(node: dict, prefix: str = "") -> list[str]:
        out = []
        for name, value in node.items():
            key = f"{prefix}{name}"
            if key not in names:
                out += undocumented(value, key + ".") if isinstance(value, dict) else [key]
        return out

    assert not undocumented(plain)


def test_phases_rules_table_is_generated_from_the_rules():
    text = _text(ROOT / "docs" / "phases.md")
    assert text.count(RULES_BEGIN) == 1 and text.count(RULES_END) == 1
    block = RULES_BEGIN + text.split(RULES_BEGIN, 1)[1].split(RULES_END, 1)[0] + RULES_END
    assert block == rules_table(), (
        "docs/phases.md's rules table differs from manifests/rules.py: run `python -m curate.config_doc --write`")


def test_the_rules_table_follows_a_changed_rule():
    changed = tuple(replace(r, drops="above") if r.reason == "too_small" else r for r in RULES)
    assert "min(original_width, original_height) > filters.min_side" in rules_table(changed)
    assert rules_table(changed) != rules_table()


def test_phases_list_every_reason_in_rule_order():
    text = _text(ROOT / "docs" / "phases.md")
    positions = [text.find(f"`{r}`") for r in REASONS]
    assert -1 not in positions, [r for r in REASONS if f"`{r}`" not in text]
    assert positions == sorted(positions)


def test_readme_is_a_front_door():
    text = _text(README)
    assert "make demo" in text and "make test" in text
    lines = text.splitlines()
    assert len(lines) <= 250
    assert not [i for i, line in enumerate(lines, 1) if len(line) > 120]


def test_readme_links_every_manual_page():
    linked = {(README.parent / link.split("#")[0]).resolve() for link in _links(README)}
    assert not [p.name for p in MANUAL if p.resolve() not in linked]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_are_relative_and_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if link.startswith("/") or not path.exists() or (anchor and path.suffix == ".md"
                                                          and anchor not in _anchors(path)):
            broken.append(link)
    assert not broken


def test_commands_in_the_docs_exist():
    from curate.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    commands |= {g.name for g in app.registered_groups}
    targets = set(re.findall(r"^([a-z-]+):", _text(ROOT / "Makefile"), flags=re.M))
    for page in PAGES:
        text = _code(_text(page))
        used = set(re.findall(r"(?<![\w/.-])curate ([a-z][a-z|-]*)", text))
        used = {w for part in used for w in part.split("|")}
        assert used <= commands, (page.name, used - commands)
        made = set(re.findall(r"\bmake ([a-z][a-z-]*)", text))
        assert made <= targets, (page.name, made - targets)


def test_config_keys_named_in_the_docs_exist():
    known = {k.key for k in keys()}
    pattern = re.compile(rf"(?<![\w./])({'|'.join(sorted(SECTIONS))})\.([a-z_0-9]+)(?![\w(])")
    unknown = []
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", _prose(_text(page))):
            for section, key in pattern.findall(span):
                if key not in FILE_SUFFIXES and f"{section}.{key}" not in known:
                    unknown.append(f"{page.name}: {section}.{key}")
    assert not unknown


def test_config_doc_command_prints_the_reference():
    from typer.testing import CliRunner

    from curate.cli import app

    result = CliRunner().invoke(app, ["config-doc"])
    assert result.exit_code == 0 and result.stdout == render()
