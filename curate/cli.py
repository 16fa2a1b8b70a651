"""The `curate` command line: run the pipeline or one phase, the demo, and inspect manifests."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from curate import config as config_mod
from curate.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Curate Chinese image-text pairs: download, score, decide, write.")
console = Console(soft_wrap=True)

SET_HELP = "Override a config key, e.g. --set filters.min_side=256 (repeatable)."
# URIs are strings: typer's Path would turn s3://bucket/run into s3:/bucket/run.
CONFIG_ARG = typer.Argument(..., help="Config YAML: a path or a URI (s3://bucket/run/config.yaml).")


def _load(config: str, overrides: list[str]) -> config_mod.Config:
    try:
        return config_mod.load(config, overrides)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _finish(outcome, run_dir: str) -> None:
    from curate.inspect import funnel_table

    funnel = outcome.stats.get("funnel") or outcome.funnel
    if funnel:
        console.print(funnel_table(funnel, not_requested=(outcome.stats.get("before_download") or {}).get("rows", 0)))
    if outcome.stats:
        console.print(f"shards written: {outcome.stats['shards']['count']} "
                      f"({outcome.stats['shards']['samples']:,} samples)")
        from curate.run.storage import join

        for label, name in (("shards", "shards/"), ("manifest", "manifest/"), ("stats", "stats.json"),
                            ("config", "config.yaml"), ("report", "report.html")):
            console.print(f"  {label:9s} {join(run_dir, name)}", highlight=False)
    from curate.run.failures import describe

    for f in outcome.failures:
        console.print(f"[red]failed:[/red] {describe(f)}", highlight=False)
    if outcome.failures:
        console.print("[red]the run is not complete (failures.json lists what failed); `curate run` again retries "
                      "it[/red]", highlight=False)
        raise typer.Exit(1)


def _phases(config: str, overrides: list[str], phases: tuple[str, ...], dry_run: bool = False) -> None:
    from curate.pipeline import run_phases
    from curate.run.rundir import RunBusy

    cfg = _load(config, overrides)
    try:
        outcome = run_phases(cfg, phases, dry_run=dry_run)
    except (ConfigError, FileNotFoundError, RunBusy) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    _finish(outcome, cfg.run_dir)


@app.command()
def run(config: str = CONFIG_ARG, overrides: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Run every phase (recaption only with recaption.enabled); each skips the shards it has already done."""
    from curate.run.rundir import PHASES

    _phases(config, overrides, PHASES)


@app.command()
def download(config: str = CONFIG_ARG, overrides: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Phase 1: fetch images into RUN/raw."""
    _phases(config, overrides, ("download",))


@app.command()
def score(config: str = CONFIG_ARG, overrides: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Phase 2: compute every score column into RUN/scores."""
    _phases(config, overrides, ("score",))


@app.command()
def decide(config: str = CONFIG_ARG, overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the funnel; write nothing.")) -> None:
    """Phase 3: keep or drop every row from the scores; reads no image, loads no model."""
    _phases(config, overrides, ("decide",), dry_run=dry_run)


@app.command()
def recaption(config: str = CONFIG_ARG, overrides: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Recaption the kept rows with the vision-language model (recaption.*); cached per image and settings."""
    _phases(config, overrides, ("recaption",))


@app.command()
def write(config: str = CONFIG_ARG, overrides: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Phase 4: write changed WebDataset shards, manifest.parquet and stats.json."""
    _phases(config, overrides, ("write",))


@app.command()
def demo(out: str = typer.Option("runs/demo", help="Run directory: a local path or s3://bucket/prefix."),
         n: int = typer.Option(2000, help="Number of synthetic samples."),
         seed: int = typer.Option(0, help="Seed of the corpus generator."),
         overrides: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Generate a nasty synthetic corpus, serve it on 127.0.0.1 and curate it end to end."""
    from curate.demo.run import run_demo
    from curate.run.rundir import RunBusy
    from curate.run.runtime import setup_logging
    from curate.run.storage import absolute

    setup_logging()
    try:
        config_mod.refuse_relative_in_job(out, "--out")
        outcome = run_demo(out, n=n, seed=seed, overrides=overrides)
    except (ConfigError, FileExistsError, RunBusy) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    _finish(outcome, absolute(out))


@app.command()
def inspect(target: str = typer.Argument(..., help="Run directory or manifest parquet (path or URL)."),
            where: str | None = typer.Option(None, help="Row filter, e.g. \"aesthetic < 5 and style == 'cartoon'\"."),
            show: int = typer.Option(0, help="Print N sample rows."),
            bucket: str | None = typer.Option(None, help="Only rows of this bucket, e.g. 1152x896."),
            as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Summarise a manifest: funnel by reason, quantiles of every score, styles, buckets, sample rows."""
    from curate.inspect import render, summarize

    try:
        summary = summarize(target, where=where, show=show, bucket=bucket)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(summary, ensure_ascii=False, indent=2, default=str) + "\n")
    else:
        render(summary, console)


def _options(config: str | None):
    """The config's sections when one is given, else every default (no run directory needed)."""
    if config is not None:
        return _load(config, [])
    from filters.models import SCORERS, ModelOptions
    from filters.models.recaption import RecaptionOptions
    from filters.text import TextOptions

    return config_mod.Config.model_construct(models=ModelOptions(enabled=list(SCORERS)), text=TextOptions(),
                                             recaption=RecaptionOptions())


CONFIG_OPT = typer.Option(None, "--config", help="Config whose settings to use (default: built-in defaults).")


@app.command()
def text(caption: str | None = typer.Argument(None, help="One caption (omit with --file)."),
         file: Path | None = typer.Option(None, "--file", help="Captions, one per line; prints JSON lines."),
         config: str | None = CONFIG_OPT) -> None:
    """Normalise captions and apply the text rules, exactly as the pipeline does; prints JSON."""
    from manifests.rules import explain

    opts = _options(config).text
    if (caption is None) == (file is None):
        console.print("[red]error:[/red] give one CAPTION or --file FILE")
        raise typer.Exit(2)
    if caption is not None:
        sys.stdout.write(json.dumps(explain(caption, opts), ensure_ascii=False, indent=2) + "\n")
        return
    if not file.is_file():
        console.print(f"[red]error:[/red] no such file: {file}", highlight=False)
        raise typer.Exit(2)
    with file.open(encoding="utf-8") as lines:
        for line in lines:
            sys.stdout.write(json.dumps(explain(line.rstrip("\r\n"), opts), ensure_ascii=False) + "\n")


models_app = typer.Typer(no_args_is_help=True, help="Model weights: what each scorer needs, fetch it, verify it.")
app.add_typer(models_app, name="models")


def _weights_table(rows: list[dict], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("scorer", "file", "present", "checksum", "source"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r.get("scorer", "")), str(r.get("file", r.get("name", ""))),
                      "yes" if r.get("present") else "[red]no[/red]", str(r.get("checksum") or ""),
                      str(r.get("source", r.get("url", ""))))
    console.print(table)


@models_app.command("list")
def models_list(config: str | None = CONFIG_OPT,
                verify: bool = typer.Option(False, help="Also verify checksums (reads every file).")) -> None:
    """Show every scorer's declaration (filters/registry.py), then what the enabled scorers need and whether it
    is present."""
    from rich.table import Table

    from filters.models import weights
    from filters.registry import declarations

    cfg = _options(config)
    opts = cfg.models
    towers = weights.towers_needed(opts)
    files = {n: w.filename for n, w in (*weights.REGISTRY.items(), *weights.SHIPPED.items())}
    scorers = Table(title="scorers, as declared (filters/registry.py)", show_header=False)
    scorers.add_column("field", no_wrap=True, style="dim")
    scorers.add_column("value", overflow="fold")
    for d in declarations(cfg):
        state = "always runs" if not d["optional"] else ("enabled" if d["enabled"] else "not enabled")
        tower = d["tower"] and (f"{d['tower']} ({' / '.join(towers[d['tower']])})" if d["tower"] in towers
                                else d["tower"])
        scorers.add_row(f"[bold]{d['scorer']}[/bold]", f"[bold]{state}[/bold]: {d['doc']}", end_section=False)
        scorers.add_row("writes", ", ".join(f"{c} ({t})" for c, t in d["columns"].items()) or "embeddings/{shard}.npy")
        scorers.add_row("reads", f"{', '.join(d['reads'])}; runs in the {d['stage']} stage"
                        + (f"; tower {tower}" if tower else "") + (f"; {d['resources']}" if d["resources"] else ""))
        scorers.add_row("config keys", ", ".join(d["keys"]) or "-")
        loads = [*(f"{w} ({files.get(w, '?')})" for w in d["weights"]), *d["files"]]
        scorers.add_row("weights, files", ", ".join(loads) or "-", end_section=True)
    console.print(scorers)
    console.print(f"style labels for rebalance: rebalance.style_source = {cfg.rebalance.style_source} "
                  f"({type(cfg.rebalance).model_fields['style_source'].description})", highlight=False)
    from filters.models import recaption

    rows = weights.list_weights(opts, verify=verify)
    if cfg.recaption.enabled and opts.weights != "random":
        rows.append(recaption.status(cfg.recaption, opts, verify))
    _weights_table(rows, f"weights in {weights.models_dir(opts)}")


@models_app.command("pull")
def models_pull(config: str | None = CONFIG_OPT) -> None:
    """Download (and convert) the weights the enabled scorers lack. Needs internet."""
    from filters.models import recaption, weights

    cfg = _options(config)
    say = lambda line: console.print(line, highlight=False)  # noqa: E731
    undone = weights.pull(cfg.models, log=say) + recaption.pull(cfg.recaption, cfg.models, log=say)
    for line in undone:
        console.print(f"[yellow]not done:[/yellow] {line}", highlight=False)
    raise typer.Exit(1 if undone else 0)


@models_app.command("check")
def models_check(config: str | None = CONFIG_OPT) -> None:
    """Verify the checksum of every weights file present; exit 1 on a mismatch."""
    from filters.models import recaption, weights

    cfg = _options(config)
    rows = weights.check(cfg.models)
    if cfg.recaption.enabled and recaption.status(cfg.recaption, cfg.models)["present"]:
        rows.append(recaption.status(cfg.recaption, cfg.models, verify_files=True))
    _weights_table(rows, "checksums")
    if any(r.get("checksum") == "mismatch" for r in rows):
        raise typer.Exit(1)


@app.command()
def report(run_dir: str = typer.Argument(..., help="Run directory: a path or a URI (s3://bucket/run).")) -> None:
    """Write RUN_DIR/report.html: funnel, score histograms with thresholds, styles, image grids."""
    from curate.report import build_report

    try:
        path = build_report(run_dir)
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"report: {path}", highlight=False)


@app.command("config-doc")
def config_doc() -> None:
    """Print the config reference (docs/config.md), generated from the config model."""
    from curate.config_doc import render

    sys.stdout.write(render())


def main() -> None:
    from curate.run.runtime import setup_logging

    setup_logging()
    app()
