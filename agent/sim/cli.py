"""`agent simulate ...`: simulated datasets and the live simulated cell."""

from __future__ import annotations

import os
import time
from enum import Enum
from pathlib import Path

import typer

from agent.sim.cell import cell_command

simulate_app = typer.Typer(help="The simulated inspection cell: datasets and a live MQTT cell.", no_args_is_help=True)
simulate_app.command("cell")(cell_command)


class Protocol(str, Enum):
    cell = "cell"
    mad = "mad"


@simulate_app.command("products")
def products_command() -> None:
    """List the simulator's products."""
    from agent.sim.products import PRODUCTS

    for name, spec in PRODUCTS.items():
        lo, hi = spec.defect_radius_mm
        typer.echo(f"{name:<10} {spec.description}  (defect radius {lo:g}-{hi:g} mm)")


@simulate_app.command("dataset")
def dataset_command(
    recipe: list[str] = typer.Option(..., "--recipe", help="Product to simulate (repeatable), or 'all'."),
    out: Path = typer.Option(..., "--out", help="Dataset root; each recipe goes to <out>/<recipe>/."),
    good: int = typer.Option(10, "--good", min=0, help="Good test parts per recipe."),
    defective: int = typer.Option(10, "--defective", min=0, help="Defective test parts per recipe (defect types in turn)."),
    teach_in: int = typer.Option(3, "--teach-in", min=0, help="Nominal teach-in parts per recipe (train/001, ...), run "
                                 "through the cell like any part; enrollment sets the threshold from them. Cell layout only."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same data."),
    size: int = typer.Option(256, "--size", min=16, help="Image width and height in pixels."),
    protocol: Protocol = typer.Option(Protocol.cell, "--protocol", help="cell: multi-view captures; mad: single test images."),
    enroll_views: int = typer.Option(36, "--enroll-views", min=1, help="Views of the golden part (enrollment trajectory)."),
    views: int = typer.Option(12, "--views", min=1, help="Views per test part (inspection trajectory)."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers", min=1, help="Worker processes."),
) -> None:
    """Simulate a dataset: a golden enrollment capture, teach-in parts, and good and defective test parts per recipe."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.sim.config import SimConfig
    from agent.sim.dataset import write_dataset
    from agent.sim.products import PRODUCTS

    console = Console()
    recipes = list(PRODUCTS) if "all" in recipe else list(dict.fromkeys(recipe))
    unknown = [r for r in recipes if r not in PRODUCTS]
    if unknown:
        console.print(f"[red]unknown --recipe {', '.join(unknown)}; known: {', '.join(PRODUCTS)} or all[/red]")
        raise typer.Exit(2)
    config = SimConfig(width=size, height=size, enroll_views=enroll_views, n_views=views)
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        for name in recipes:
            n_teach_in = teach_in if protocol == Protocol.cell else 0
            task = bar.add_task(f"{name:<10}", total=1 + n_teach_in + good + defective)
            root = write_dataset(out, name, good, defective, seed, config, protocol.value, workers,
                                 on_part=lambda job, task=task: bar.advance(task), teach_in=n_teach_in)
            bar.console.print(f"{name}: wrote {root} (contact sheet {root / 'contact_sheet.png'})")
    console.print(f"done in {time.perf_counter() - started:.1f} s")
