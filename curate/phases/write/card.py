"""RUN/shards/README.md: a Hugging Face dataset card, generated from stats.json and the config.

Nothing in it is typed by hand: the funnel, buckets and shard counts are stats.json's, the
thresholds are the config's values of the keys the rules table names (manifests/rules.py), the
models and weight checksums models.json's (as stats.json repeats it), and the sample-JSON columns
come from the manifest schema. Written by every write, beside the shards, so the data never travels
without its description.
"""
from __future__ import annotations

import json

from curate.config import Config
from curate.phases.write.sample import SAMPLE_EXCLUDE, hex_in_json
from curate.run.rundir import RunDir
from curate.run.storage import join
from manifests import ranks
from manifests.funnel import Funnel
from manifests.rules import REASONS, RULES
from manifests.schema import ALL

CARD = "README.md"
# Hugging Face's size_categories, by upper bound of the sample count.
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"))
LICENSE_WARNING = ("**Licence: unknown.** Every image and caption keeps the licence and terms of the source it was "
                   "downloaded from (the `url` of each sample); this curation adds none and clears none. Check "
                   "the sources' terms before training on or redistributing this data.")


def size_category(n: int) -> str:
    return next((label for bound, label in SIZE_CATEGORIES if n < bound), "n>10B")


def card_uri(run: RunDir) -> str:
    return run.out_shard(CARD)


def write_card(run: RunDir, cfg: Config, stats: dict) -> str:
    """Write the card beside the shards and return its URI."""
    uri = card_uri(run)
    sources = run.storage.read_json(run.plan).get("sources") if run.storage.exists(run.plan) else None
    run.storage.write_text(uri, render(cfg, stats, sources or list(cfg.input.paths), run.uri("shards")))
    return uri


def render(cfg: Config, stats: dict, sources: list[str], shards_uri: str) -> str:
    kept = stats["funnel"]["kept"]
    header = {"language": ["zh"], "task_categories": ["text-to-image"], "size_categories": [size_category(kept)],
              "license": "unknown", "tags": ["webdataset", "image-text", "curate-zh"],
              "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "*.tar"}]}]}
    parts = ["---", _yaml(header), "---", "",
             f"# {cfg.write.prefix}: curated Chinese image-text pairs", "",
             f"{kept:,} image-caption pairs in {stats['shards']['count']} WebDataset shards, curated by curate-zh "
             f"from {stats['funnel']['rows_in']:,} input rows (download, score, decide, write). Every input row's "
             f"fate is in the run's parquet manifest (`manifest/`), with the reason of each drop.", "",
             f"> {LICENSE_WARNING}", "",
             *_failures_warning(stats),
             *_models_warning(stats.get("models") or {}),
             "## Funnel", "", *_funnel(stats["funnel"]), *_spared(stats.get("before_download")), "",
             "## Shards and buckets", "", *_shards(cfg, stats), "",
             "## Thresholds", "", *_thresholds(cfg, stats.get("thresholds") or {}), "",
             "## Models", "", *_models(stats.get("models") or {}), "",
             *_recaptions(stats.get("recaption")),
             "## Sources", "", *[f"- `{s}`" for s in sources], "",
             "## Sample format", "", *_columns(cfg, stats), "",
             "## Loading", "", *_loading(cfg, stats, shards_uri), ""]
    return "\n".join(parts)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip()


def _table(head: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|",
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def _share(n: int, total: int) -> str:
    return f"{100 * n / max(total, 1):.2f}%"


def _funnel(funnel: dict) -> list[str]:
    """stats.json's funnel, its reasons in the rules table's order, each with the rule's meaning."""
    f = Funnel.from_dict(funnel)
    total = f.rows_in
    rows = [["rows in", total, _share(total, total), ""]]
    rows += [[f"dropped: `{r}`", f.dropped[r], _share(f.dropped[r], total), REASONS.get(r, "")] for r in f.reasons()]
    rows.append(["**kept**", f.kept, _share(f.kept, total), ""])
    return _table(["step", "rows", "share", "rule"], rows)


def _spared(spared: dict | None) -> list[str]:
    """What the rules before download saved: rows never requested, and the raw bytes they would have cost."""
    if not spared or not spared["rows"]:
        return []
    reasons = ", ".join(f"`{r}` {n:,}" for r, n in spared["reasons"].items())
    return ["", f"{spared['rows']:,} of these rows were never downloaded: rules that need no image dropped them "
                f"before download ({reasons}), sparing about {spared_bytes(spared)} of raw images."]


def spared_bytes(spared: dict) -> str:
    """The estimated raw bytes as a person reads them ("unknown" before anything was downloaded)."""
    n = spared.get("raw_bytes_estimate")
    if n is None:
        return "an unknown number of bytes"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _shards(cfg: Config, stats: dict) -> list[str]:
    w = cfg.write
    layout = (f"each shard holds one bucket: `{w.prefix}-{{w}}x{{h}}-{{n:06d}}.tar`, numbered per bucket"
              if w.group_by_bucket else f"`{w.prefix}-{{n:06d}}.tar`, buckets mixed")
    lines = [f"{stats['shards']['samples']:,} samples in {stats['shards']['count']} shards of "
             f"{w.samples_per_shard} (the last of each sequence may be shorter); {layout}. Each sample is "
             f"`{{key}}.jpg` (the image bytes as downloaded), `{{key}}.txt` (the caption) and `{{key}}.json`.", ""]
    buckets = stats.get("buckets")
    if buckets is None:
        return lines + ["Aspect-ratio bucketing was off (`write.buckets: null`)."]
    kept = sum(buckets.values())
    lines += ["Aspect-ratio buckets (`write.buckets`): each sample's `bucket` is the training resolution whose "
              "aspect ratio is nearest its stored image's (on a log scale). The images are not resized: the "
              "trainer resizes and crops to the bucket, from `width`/`height` (stored) and "
              "`original_width`/`original_height` (as served).", ""]
    return lines + _table(["bucket", "samples", "share"], [[f"`{b}`", n, _share(n, kept)] for b, n in buckets.items()])


def _flat(prefix: str, value) -> list[tuple[str, object]]:
    if isinstance(value, dict) and value:
        return [kv for k, v in value.items() for kv in _flat(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def _thresholds(cfg: Config, resolved: dict) -> list[str]:
    """Every config key a rule of the table reads (its threshold and other keys, sections flattened), in
    rule order, with the reasons of the rules that read it; a rank (pNN) with the value decide resolved it
    to over the run."""
    data = cfg.model_dump(mode="json")
    rows: dict[str, tuple[object, list[str]]] = {}
    for rule in RULES:
        for dotted in rule.config_keys:
            node = data
            for part in dotted.split("."):
                node = node[part]
            for key, value in _flat(dotted, node):
                reasons = rows.setdefault(key, (value, []))[1]
                reasons += [] if rule.reason in reasons else [rule.reason]

    def shown(key: str, value) -> str:
        if value is None:
            return "null (off)"
        text = f"`{json.dumps(value, ensure_ascii=False)}`"
        return f"{text} = {ranks.describe(resolved[key])}" if key in resolved else text

    return _table(["key", "value", "rule"],
                  [[f"`{k}`", shown(k, v), ", ".join(f"`{r}`" for r in reasons)] for k, (v, reasons) in rows.items()])


def _failures_warning(stats: dict) -> list[str]:
    """An unfinished run says so first: what failed, and that the counts below cover only what was written."""
    failures = stats.get("failures") or []
    if not failures:
        return []
    shards = sorted({f["shard"] for f in failures if f["shard"] is not None})
    phases = sorted({f["phase"] for f in failures})
    listed = ", ".join(f"`{s}`" for s in shards[:10]) + (", ..." if len(shards) > 10 else "")
    return [f"> **Incomplete: {len(failures)} failure(s) in {', '.join(phases)}"
            + (f" (input shards {listed})" if shards else "") + ".** The funnel and the shards below count only "
            "what was written. `failures.json` in the run directory has the errors; `curate run` again "
            "retries them.", ""]


def _models_warning(models: dict) -> list[str]:
    return [f"> **{models['warning']}**", ""] if models.get("warning") else []


def _models(models: dict) -> list[str]:
    if not models:
        return ["No models.json: no model scorer ran."]
    lines = [f"- scorers that ran: {', '.join(models.get('enabled') or []) or 'none'}",
             f"- weights: {models.get('weights', 'unknown')}"]
    lines += [f"- skipped: {s}: {why}" for s, why in (models.get("skipped") or {}).items()]
    clip = models.get("clip_score")
    if clip:
        lines.append(f"- clip_score: {clip['backend']}, {clip['model']} (image side: {clip['image']}); {clip['score']}")
    files = models.get("files") or []
    if files:
        lines += ["", *_table(["weights", "file", "sha256", "checksum"],
                              [[f["name"], f"`{f['file']}`", f"`{f['sha256']}`" if f["sha256"] else "-", f["pin"]]
                               for f in files])]
    return lines


def recaption_lines(info: dict) -> list[str]:
    """Which model and prompt wrote the recaptions (per settings, from the recaption markers), how many rows
    have one, and what the .txt holds: the card's and the report's words."""
    rows = info["rows"]
    lines = [f"{rows['recaptioned']:,} of {rows['kept']:,} kept rows have a `recaption`; {rows['rejected']:,} "
             f"were rejected by the caption rules and {rows['failed']:,} failed (`recaption_error` says why; those "
             f"rows keep their original caption)."]
    for p in info["producers"]:
        lines.append(f"Written by `{p.get('model', '?')}`" + (f" at `{p['revision']}`" if p.get("revision") else "")
                     + f" ({p.get('engine', '?')}, weights {p.get('weights', '?')}: {p.get('source', '?')}; image "
                       f"side {p.get('image_side', '?')}, at most {p.get('max_new_tokens', '?')} new tokens) on "
                       f"{p['shards']} shard(s), with the prompt: {p.get('prompt', '?')}"
                     + (f" (OCR hint: {p['ocr_hint']})" if p.get("ocr_hint") else ""))
    share = f", {100 * info['recaption_share']:.0f}% of rows by a stable hash of the key" \
        if info["caption"] == "mix" else ""
    lines.append(f"The `.txt` holds: {CAPTION_CHOICE[info['caption']]}{share} (`write.caption: {info['caption']}`).")
    return lines


CAPTION_CHOICE = {"original": "the normalised original caption",
                  "recaption": "the recaption where there is one, else the normalised original",
                  "mix": "the recaption (where there is one) or the normalised original"}


def _recaptions(info: dict | None) -> list[str]:
    if not info:
        return []
    warn = ["> **The recaptions come from RANDOM weights: they are meaningless.**", ""] \
        if any(p.get("weights") == "random" for p in info["producers"]) else []
    pairs = _table(["key", "original (caption_norm)", "recaption"],
                   [[f"`{e['key']}`", e.get("caption_norm") or "", e["recaption"]] for e in info["examples"]])
    return ["## Recaptions", "", *warn, *(f"{line}\n" for line in recaption_lines(info)),
            *(pairs if info["examples"] else []), ""]


def _columns(cfg: Config, stats: dict) -> list[str]:
    docs = {**{c: "input column (input.extra_cols), carried as given" for c in cfg.input.extra_cols},
            **stats["columns"]}
    for c in docs:
        if c in ALL and hex_in_json(ALL[c].type):
            docs[c] += "; in the JSON as 16 hex digits"
    rows = [[f"`{c}`", docs[c]] for c in sorted(docs) if c not in SAMPLE_EXCLUDE]
    return ["Captions for trainers: `caption` is the original, `caption_norm` the normalised one (the `.txt` "
            + ("holds it with the OCR template `write.ocr_caption` filled in" if cfg.write.ocr_caption else "holds it")
            + "), and `ocr_text` and `style` are there when those scorers ran: choose among them without re-running "
              "anything. Scores that were not computed are null. The `.json` holds these keys:", "",
            *_table(["key", "meaning"], rows)]


def _loading(cfg: Config, stats: dict, shards_uri: str) -> list[str]:
    prefix = cfg.write.prefix
    buckets = {b: n for b, n in (stats.get("buckets") or {}).items() if n}
    one = [f'one_bucket = sorted(glob.glob(f"{{SHARDS}}/{prefix}-{max(buckets, key=buckets.get)}-*.tar"))   '
           f"# the shards of one bucket"] if cfg.write.group_by_bucket and buckets else []
    return [f"`SHARDS` is this folder (written as `{shards_uri}`).", "",
            "With `webdataset`:", "", "```python", "import glob", "", "import webdataset as wds", "",
            f'SHARDS = "{shards_uri}"',
            'urls = sorted(glob.glob(f"{SHARDS}/*.tar"))',
            'for image, caption, meta in wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"):',  # noqa: E501 (the card's code, as users copy it)
            '    print(image.size, caption, meta["bucket"])',
            "    break", *one, "```", "",
            "With Hugging Face `datasets` (its webdataset builder; columns `__key__`, `jpg`, `txt`, `json`):", "",
            "```python", "from datasets import load_dataset", "",
            f'ds = load_dataset("webdataset", data_files={{"train": "{join(shards_uri, "*.tar")}"}}, split="train")',
            'print(ds[0]["txt"], ds[0]["json"]["bucket"])', "```", "",
            "With Ray Data (`decoder=None` keeps the image bytes as stored):", "",
            "```python", "import ray", "",
            f'ds = ray.data.read_webdataset("{shards_uri}", file_extensions=["tar"], decoder=None)',
            "```"]
