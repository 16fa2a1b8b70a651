"""The `curate` command line: run the pipeline or one phase, the demo, and inspect manifests."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from curate import config as config_mod
from curate.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Curate Chinese image-text pairs: download, score, decide, write.")
console = Console()

SET_HELP = "Override a config key, e.g. --set filters.min_side=256 (repeatable)."


def _load(config: Path, overrides: list[str]) -> config_mod.Config:
    try:
        return config_mod.load(config, overrides)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _finish(outcome, run_dir: str) -> None:
    from manifests.inspect import funnel_table

    funnel = outcome.stats.get("funnel") or outcome.funnel
    if funnel:
        console.print(funnel_table(funnel))
    if outcome.stats:
        console.print(f"shards written: {outcome.stats['shards']['count']} "
                      f"({outcome.stats['shards']['samples']:,} samples)")
        root = Path(run_dir)
        for label, path in (("shards", root / "shards"), ("manifest", root / "manifest.parquet"),
                            ("stats", root / "stats.json"), ("config", root / "config.yaml")):
            console.print(f"  {label:9s} {path}", highlight=False)
    for f in outcome.failures:
        console.print(f"[red]failed:[/red] {f['phase']} shard {f['shard']}: {f['error']}", highlight=False)
    if outcome.failures:
        console.print("[red]some shards failed; run the same command again to retry only those[/red]")
        raise typer.Exit(1)


def _phases(config: Path, overrides: list[str], phases: tuple[str, ...], dry_run: bool = False) -> None:
    from curate.pipeline import run_phases

    cfg = _load(config, overrides)
    try:
        outcome = run_phases(cfg, phases, dry_run=dry_run)
    except (ConfigError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    _finish(outcome, cfg.run_dir)


@app.command()
def run(config: Path, overrides: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Run all four phases; each skips the shards it has already done."""
    _phases(config, overrides, ("download", "score", "decide", "write"))


@app.command()
def download(config: Path, overrides: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Phase 1: fetch images into RUN/raw."""
    _phases(config, overrides, ("download",))


@app.command()
def score(config: Path, overrides: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Phase 2: compute every score column into RUN/scores."""
    _phases(config, overrides, ("score",))


@app.command()
def decide(config: Path, overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the funnel; write nothing.")) -> None:
    """Phase 3: keep or drop every row from the scores; reads no image, loads no model."""
    _phases(config, overrides, ("decide",), dry_run=dry_run)


@app.command()
def write(config: Path, overrides: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Phase 4: write changed WebDataset shards, manifest.parquet and stats.json."""
    _phases(config, overrides, ("write",))


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="Run directory."),
         n: int = typer.Option(2000, help="Number of synthetic samples."),
         seed: int = typer.Option(0, help="Seed of the corpus generator."),
         overrides: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Generate a nasty synthetic corpus, serve it on 127.0.0.1 and curate it end to end."""
    from curate.demo import run_demo
    from curate.runtime import setup_logging

    setup_logging()
    try:
        outcome = run_demo(out, n=n, seed=seed, overrides=overrides)
    except (ConfigError, FileExistsError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    _finish(outcome, str(out.resolve()))


@app.command()
def inspect(target: str = typer.Argument(..., help="Run directory or manifest parquet (path or URL)."),
            where: Optional[str] = typer.Option(None, help="Row filter, e.g. \"aesthetic < 5 and style == 'cartoon'\"."),
            show: int = typer.Option(0, help="Print N sample rows."),
            as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Summarise a manifest: funnel by reason, quantiles of every score, sample rows."""
    from manifests.inspect import render, summarize

    try:
        summary = summarize(target, where=where, show=show)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(summary, ensure_ascii=False, indent=2, default=str) + "\n")
    else:
        render(summary, console)


def main() -> None:
    from curate.runtime import setup_logging

    setup_logging()
    app()
