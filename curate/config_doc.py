"""The generated parts of the manual: docs/config.md from the config model, and docs/phases.md's table
of rules from the rules table (manifests/rules.py).

Keys, types, limits, defaults and descriptions are read from the pydantic fields of `Config`
and the sections it embeds, and each rule's reason, test and meaning from its `Rule`, so the pages
cannot say anything the code does not. tests/curate/test_docs.py regenerates both and fails when a file
differs: `python -m curate.config_doc --write` writes them again (`python -m curate.config_doc`, or
`curate config-doc`, prints the config reference; `--rules` prints the rules table).
"""
from __future__ import annotations

import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from curate.config import Config, Rank
from manifests.rules import RULES, Rule

REQUIRED = object()   # the default of a key that has none
INLINE_MAX = 60       # longer defaults are shown as YAML under the section's table
LABEL = "<label>"     # stands for the free key of a mapping of sections (rebalance.styles.<label>.max_share)

HEADER = """\
# Configuration reference

<!-- Generated from the config model by `python -m curate.config_doc > docs/config.md`; do not edit by hand.
     tests/curate/test_docs.py fails when this file and the model differ. -->

One YAML file drives every phase. [`jobs/demo.yaml`](../jobs/demo.yaml) is the demo's;
[`jobs/zh_web.yaml`](../jobs/zh_web.yaml) is a realistic preset for a Chinese web crawl with published
thresholds, each cited in a comment. Loading is strict: an unknown key, a value of the wrong type or out of
its limits stops the command before Ray starts, naming the key, what it expected and what it got.
`--set key=value` overrides any key on the command line (values are read as YAML: `5.5`, `true`, `null`,
`[a, b]`). The resolved config, with every default spelled out, is saved as `RUN/config.yaml`.

The defaults live in the config model (`curate/config.py` and the sections it embeds:
`curate/run/storage.py` `StorageOptions`, `filters/text.py` `TextOptions`,
`filters/models/options.py` `ModelOptions`), nowhere else; this page is generated from them.
"""


@dataclass(frozen=True)
class Key:
    """One documented config key."""

    key: str              # dotted name, LABEL where a mapping's key is free
    type: str             # the value's type as written in YAML terms
    limits: str           # bounds and patterns the model enforces, "" if none
    default: Any          # the default value (JSON-like), or REQUIRED
    description: str


def _type_name(tp: Any) -> str:
    """A field annotation in YAML words: int, list of str, one of a / b, map str -> ..., or null."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp == Rank:
        return "rank (`pNN` or `pNN by COLUMN`)"
    if origin is typing.Annotated:   # a union member with its own limits: float (≥ 0, ≤ 1)
        limits = ", ".join(filter(None, (_limits(m) for m in args[1:] if isinstance(m, FieldInfo))))
        return f"{_type_name(args[0])} ({limits})" if limits else _type_name(args[0])
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is typing.Literal:
        return "one of " + " / ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "{" + ", ".join(tp.model_fields) + "}"
    return {str: "str", int: "int", float: "float", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _limits(field: FieldInfo) -> str:
    bounds = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"),
              (annotated_types.Le, "le", "≤"), (annotated_types.Lt, "lt", "<"))
    out = []
    for meta in field.metadata:
        for kind, attr, sign in bounds:
            if isinstance(meta, kind):
                out.append(f"{sign} {getattr(meta, attr)}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def _section_of(tp: Any) -> type[BaseModel] | None:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _mapped_section(tp: Any) -> type[BaseModel] | None:
    """The section type of a `dict[str, Section]` field (a mapping of free labels to sections)."""
    if typing.get_origin(tp) is dict:
        return _section_of(typing.get_args(tp)[1])
    return None


def keys(model: type[BaseModel] = Config, prefix: str = "") -> list[Key]:
    """Every key of `model`, depth first in declaration order; sections are walked, not listed."""
    out: list[Key] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _section_of(field.annotation)
        if sub is not None:
            out += keys(sub, dotted + ".")
            continue
        default = REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
        out.append(Key(dotted, _type_name(field.annotation), _limits(field), _jsonable(default),
                       field.description or ""))
        mapped = _mapped_section(field.annotation)
        if mapped is not None:
            out += keys(mapped, f"{dotted}.{LABEL}.")
    return out


def sections(model: type[BaseModel] = Config) -> list[tuple[str, type[BaseModel] | None]]:
    """(name, section model) for each top-level section, after ("", None) for the top-level keys."""
    return [("", None)] + [(name, sub) for name, field in model.model_fields.items()
                           if (sub := _section_of(field.annotation)) is not None]


def _jsonable(value: Any) -> Any:
    if value is REQUIRED:
        return value
    return json.loads(json.dumps(value, ensure_ascii=False))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _inline(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _table(rows: list[Key]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    blocks: list[str] = []
    for k in rows:
        kind = f"{k.type} ({k.limits})" if k.limits else k.type
        if k.default is REQUIRED:
            default = "*required*"
        elif len(_inline(k.default)) <= INLINE_MAX:
            default = f"`{_cell(_inline(k.default))}`"
        else:
            default = "see below"
            dumped = yaml.safe_dump({k.key.rsplit(".", 1)[-1]: k.default}, allow_unicode=True,
                                    sort_keys=False, default_flow_style=None, width=100)
            blocks += ["", f"Default of `{k.key}`:", "", "```yaml", dumped.rstrip("\n"), "```"]
        lines.append(f"| `{_cell(k.key)}` | {_cell(kind)} | {default} | {_cell(k.description)} |")
    return lines + blocks


def render(model: type[BaseModel] = Config) -> str:
    """docs/config.md: the header, then one headed table per section, in the model's order."""
    every = keys(model)
    out = [HEADER]
    for name, sub in sections(model):
        if sub is None:
            rows = [k for k in every if "." not in k.key]
            out.append("## Top level\n")
        else:
            rows = [k for k in every if k.key.startswith(name + ".")]
            out.append(f"## `{name}`\n")
            doc = (sub.__doc__ or "").strip()
            if doc:
                out.append(" ".join(doc.split()) + "\n")
        out.append("\n".join(_table(rows)) + "\n")
    return "\n".join(out)


RULES_BEGIN = ("<!-- Generated from manifests/rules.py by `python -m curate.config_doc --write`; do not edit by hand. "
               "tests/curate/test_docs.py fails when this table and the rules differ. -->")
RULES_END = "<!-- End of the generated rules table. -->"
WHEN = {"input": "before download: the caption's or the input's own columns",
        "download": "after download: what the download recorded",
        "score": "after score: the score columns", "run": "over the whole run (decide's global steps)"}


def rules_table(rules: tuple[Rule, ...] = RULES) -> str:
    """One row per reason, in the order decide applies them: what it means, the test it applies (a reason
    with several rules, such as low_texture, drops a row failing any), and what it needs to run."""
    lines = ["| reason | drops a row when | test | needs |", "|---|---|---|---|"]
    by_reason: dict[str, list[Rule]] = {}
    for rule in rules:
        by_reason.setdefault(rule.reason, []).append(rule)
    for reason, group in by_reason.items():
        tests = " or ".join(f"`{_cell(r.describe())}`" for r in group if r.drops and r.when != "run") or "-"
        docs = "; ".join(dict.fromkeys(r.doc for r in group))
        lines.append(f"| `{reason}` | {_cell(docs)} | {tests} | {group[0].when} |")
    legend = "; ".join(f"*{k}*: {v}" for k, v in WHEN.items())
    return "\n".join([RULES_BEGIN, "", *lines, "", f"Needs: {legend}.", RULES_END])


DOCS = Path(__file__).resolve().parents[1] / "docs"


def write(docs: Path = DOCS) -> None:
    """Rewrite docs/config.md and the rules table in docs/phases.md."""
    (docs / "config.md").write_text(render(), encoding="utf-8")
    phases = docs / "phases.md"
    text = phases.read_text(encoding="utf-8")
    if RULES_BEGIN not in text or RULES_END not in text:
        raise ValueError(f"{phases} has lost the markers of its generated rules table "
                         f"({RULES_BEGIN!r} ... {RULES_END!r})")
    head, rest = text.split(RULES_BEGIN, 1)
    phases.write_text(head + rules_table() + rest.split(RULES_END, 1)[1], encoding="utf-8")


def main() -> None:
    if "--write" in sys.argv[1:]:
        write()
    elif "--rules" in sys.argv[1:]:
        print(rules_table())
    else:
        print(render(), end="")


if __name__ == "__main__":
    main()
