"""``agent eval DATASET --protocol cell|mad``: evaluate a whole dataset (agent.eval.run) and report it."""

from __future__ import annotations

import enum
import time
from pathlib import Path

import typer


class ProtocolChoice(str, enum.Enum):
    cell = "cell"
    mad = "mad"


class BaselineChoice(str, enum.Enum):
    patchcore_max = "patchcore-max"


def eval_command(
    dataset: Path = typer.Argument(..., help="Dataset root (cell or mad layout, see spec/capture-format.md)."),
    protocol: ProtocolChoice = typer.Option(ProtocolChoice.cell, "--protocol", help="cell: multi-view parts; mad: single images of unknown pose."),
    objects: str = typer.Option("", "--objects", help="Comma-separated objects to evaluate (default: all)."),
    baseline: BaselineChoice = typer.Option(None, "--baseline", help="Also run this baseline in the same run."),
    fast: bool = typer.Option(False, "--fast", help="Fast enrollment: reference from depth / visual hull, no training."),
    out: Path = typer.Option(Path("eval_report.json"), "--out", help="JSON report (everything, per-part scores included)."),
    work_dir: Path = typer.Option(Path("eval-work"), "--work-dir", help="Enrolled recipes (reused while the train capture is unchanged)."),
    voxel_mm: float = typer.Option(0.0, "--voxel-mm", min=0.0, help="V-AUPRO evaluation voxel size; 0 = the recipe's."),
    expected_views: int = typer.Option(0, "--expected-views", min=0, help="Views per part for enrollment; 0 = the test captures' count."),
    iterations: int = typer.Option(1500, "--iterations", min=1, help="Training iterations of the reference (not with --fast)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Enrol and inspect a whole dataset; every metric of spec/metrics.md plus latency, per object and defect type."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.capture import CaptureError
    from agent.eval.report import print_report, write_report
    from agent.eval.run import EvalOptions, evaluate_dataset
    from agent.pipeline import EnrollConfig

    try:
        options = EvalOptions(
            objects=[o.strip() for o in objects.split(",") if o.strip()] or None,
            baseline=baseline.value if baseline is not None else None, fast=fast, work_dir=work_dir,
            voxel_size_m=voxel_mm / 1000 or None, expected_views=expected_views or None,
            enroll=EnrollConfig(train_iterations=iterations, seed=seed),
        )  # fmt: skip
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    console = Console()
    tasks: dict[str, int] = {}
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            report = evaluate_dataset(dataset, protocol.value, options, progress)
        except (CaptureError, ValueError) as e:
            bar.stop()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)
    path = write_report(report, out)
    print_report(report)
    console.print(f"report: {path} ({time.perf_counter() - t0:.0f} s)")
