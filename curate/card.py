"""The dataset card: shards/README.md in the Hugging Face dataset-card format, made from the run.

Everything in it comes from stats.json, the resolved config, the plan and the weights registry,
so the card cannot disagree with the run it describes; nobody edits it by hand.
"""
from __future__ import annotations

import json

import yaml

from curate.config import Config
from manifests.schema import REASONS

SIZE_BINS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
             (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
LICENSE_WARNING = ("The images and captions were collected from the web and keep the rights of their "
                   "owners: this card cannot grant a licence. Check the terms of every source before use; "
                   "rows whose servers sent X-Robots-Tag noai/noimageai were excluded.")


def size_category(n: int) -> str:
    return next((name for limit, name in SIZE_BINS if n < limit), "1B<n<10B")


def _header(stats: dict, cfg: Config) -> str:
    meta = {
        "language": ["zh"],
        "task_categories": ["text-to-image"],
        "size_categories": [size_category(stats["shards"]["samples"])],
        "license": "other",
        "license_name": "unknown-inherited",
        "license_details": LICENSE_WARNING,
        "tags": ["webdataset", "image-text", "curate-zh"],
        "pretty_name": f"{cfg.write.prefix} (curated Chinese image-text pairs)",
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{cfg.write.prefix}-*.tar"}]}],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _funnel(stats: dict) -> list[str]:
    funnel = stats["funnel"]
    lines = ["| step | rows |", "|---|---:|", f"| input rows | {funnel['rows_in']:,} |"]
    lines += [f"| dropped: `{r}` | {funnel['dropped'][r]:,} |" for r in REASONS if r in funnel["dropped"]]
    lines.append(f"| **kept** | **{funnel['kept']:,}** |")
    return lines


def _settings(cfg: Config) -> list[str]:
    """Every rule setting, as the decide phase applied it."""
    dump = cfg.model_dump(mode="json")
    lines = ["| setting | value |", "|---|---|"]
    for section in ("filters", "text", "dedupe", "rebalance"):
        for key, value in dump[section].items():
            if section == "text" and key.endswith("_file"):
                value = value or "shipped default"
            lines.append(f"| `{section}.{key}` | `{json.dumps(value, ensure_ascii=False)}` |")
    return lines


def _models(stats: dict, checksums: dict[str, str | None]) -> list[str]:
    models = stats.get("models") or {}
    enabled = models.get("enabled") or []
    if not enabled:
        return ["No model scorer ran: no score below comes from a model."]
    lines = [f"Scorers that ran: {', '.join(f'`{s}`' for s in enabled)}; weights: `{models.get('weights')}`."]
    if models.get("warning"):
        lines.append(f"\n> **Warning:** {models['warning']}.")
    for scorer, why in (models.get("skipped") or {}).items():
        lines.append(f"- `{scorer}` was skipped: {why}")
    if checksums:
        lines += ["", "| weights file | sha256 |", "|---|---|"]
        lines += [f"| `{name}` | `{digest or 'not pinned'}` |" for name, digest in sorted(checksums.items())]
    return lines


def _loading(prefix: str) -> list[str]:
    pattern = f"{prefix}-{{000000..NNNNNN}}.tar"
    return [
        "```python",
        "import webdataset as wds",
        f'ds = wds.WebDataset("{pattern}").decode("pil").to_tuple("jpg", "txt", "json")',
        "",
        "from datasets import load_dataset",
        f'ds = load_dataset("webdataset", data_files={{"train": "{prefix}-*.tar"}}, split="train")',
        "",
        "import ray",
        f'ds = ray.data.read_webdataset("{prefix}-*.tar")  # or the shards folder, local or s3://',
        "```",
        "",
        f"`{pattern}`: put the last shard number for NNNNNN (stats.json lists every shard).",
    ]


def dataset_card(stats: dict, cfg: Config, sources: list[str], checksums: dict[str, str | None]) -> str:
    """The card's full text."""
    columns = stats.get("columns") or {}
    sample_keys = stats.get("sample_json_keys") or sorted(columns)
    body = [
        f"# {cfg.write.prefix}: curated Chinese image-text pairs",
        "",
        f"{stats['shards']['samples']:,} image-caption pairs in {stats['shards']['count']:,} WebDataset shards, "
        f"kept from {stats['funnel']['rows_in']:,} input rows by `curate-zh`. Every input row, kept or not, "
        "is accounted for in `../manifest/` (one parquet file per input shard) with its scores and the "
        "reason it was dropped.",
        "",
        f"> **Licence:** {LICENSE_WARNING}",
        "",
        "## Sources", "",
        *[f"- `{s}`" for s in sources],
        "", "## Funnel", "", *_funnel(stats),
        "", "## Thresholds and rules", "", *_settings(cfg),
        "", "## Models", "", *_models(stats, checksums),
    ]
    if stats.get("buckets"):
        body += ["", "## Aspect-ratio buckets", "", "| bucket | samples |", "|---|---:|",
                 *[f"| {b} | {n:,} |" for b, n in stats["buckets"].items()]]
    body += [
        "", "## Each sample", "",
        "`{key}.jpg`: the image as downloaded (not resized to its bucket; that is the trainer's job). "
        "`{key}.txt`: the normalised caption. `{key}.json`: these fields:", "",
        "| field | meaning |", "|---|---|",
        *[f"| `{k}` | {columns.get(k, 'input column carried through')} |" for k in sample_keys],
        "", "## Loading", "", *_loading(cfg.write.prefix), "",
    ]
    return _header(stats, cfg) + "\n" + "\n".join(body)
