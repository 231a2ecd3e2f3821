"""Command line of the inspection core: ``agent enroll``, ``agent recipes list|show|export-model``, ``agent inspect``.

The spec's inspection output (capture-format.md, "Inspection output") is written by agent.artifacts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer

from agent import __version__
from agent.artifacts import write_inspection_output
from agent.capture import CaptureError, load_capture
from agent.contract import Placement, Timings, Verdict, VerdictDefect
from agent.inspection import InspectionResult, ViewResult
from agent.recipe import RecipeError, check_recipe_name, default_recipes_dir, list_recipes, load_recipe

RECIPES_DIR_HELP = "Recipes folder (default: $AGENT_RECIPES_DIR or ./recipes)."
recipes_app = typer.Typer(help="Enrolled recipes.", no_args_is_help=True)


def _recipes_dir(value: Path | None) -> Path:
    return value if value is not None else default_recipes_dir()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def threshold_summary(recipe) -> str:
    """One line per scoring path: where its threshold came from and the nominal scores on the verdict scale."""
    cal = recipe.calibration
    paths = [("features", cal.raw_threshold, cal.teach_in_part_scores, cal.nominal_part_scores)]
    if cal.surface_raw_threshold is not None:
        paths.insert(0, ("surface", cal.surface_raw_threshold, cal.surface_teach_in_part_scores, cal.surface_nominal_part_scores))
    lines = []
    for path, raw, teach_in, pseudo in paths:
        source = cal.threshold_source(path == "surface")
        scores = teach_in if teach_in else pseudo
        shown = ", ".join(f"{v / raw:.2f}" for v in sorted(scores)[-8:])
        what = f"teach-in parts ({len(scores)})" if teach_in else f"leave-views-out pseudo-parts ({len(scores)}, highest 8)"
        if path == "surface" and recipe.references is not None:
            what = f"teach-in parts ({len(scores)}, each scored against the other parts' views; {len(recipe.references)} reference views)"
        line = f"threshold ({path} path): {source}, raw {raw:.4g}; {what} on the verdict scale: {shown}"
        lvo = cal.notes.get("surface_leave_views_out_raw_threshold" if path == "surface" else "leave_views_out_raw_threshold")
        if teach_in and isinstance(lvo, (int, float)):
            line += f" (the leave-views-out threshold was {lvo / raw:.2f}x this)"
        lines.append(line)
    excluded = cal.notes.get("teach_in_excluded")  # from calibration.json: only a list is read
    for odd in excluded if isinstance(excluded, list) else []:
        where = f" ({odd['capture']})" if odd.get("capture") else ""
        lines.append(f"teach-in part {odd['teach_in_part']}{where} left out of the calibration: it scored {odd['raw_score']:.3g}, "
                     f"{odd['raw_score'] / odd['others_median']:.1f}x the other parts' median; check its placement in the "
                     "fixture, or the part itself")  # fmt: skip
    return "\n".join(lines)


@recipes_app.command("list")
def recipes_list(recipes_dir: Path = typer.Option(None, "--recipes-dir", help=RECIPES_DIR_HELP)) -> None:
    """Every recipe with its verified version (or why it cannot be used)."""
    from rich.console import Console
    from rich.table import Table

    infos = list_recipes(_recipes_dir(recipes_dir))
    table = Table("recipe", "version", "views", "voxel mm", "backbone", "status")
    for info in infos:
        s = info.settings
        table.add_row(
            info.name, info.version or "-", f"{s.expected_views} (min {s.min_views})" if s else "-",
            f"{s.voxel_size_m * 1000:g}" if s else "-", s.backbone if s else "-", "ok" if info.error is None else f"[red]{info.error}[/red]",
        )  # fmt: skip
    Console(width=200).print(table)
    if not infos:
        typer.echo(f"no recipes in {_recipes_dir(recipes_dir)}")


@recipes_app.command("show")
def recipes_show(
    name: str = typer.Argument(..., help="Recipe name."),
    recipes_dir: Path = typer.Option(None, "--recipes-dir", help=RECIPES_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Settings, calibration and artefacts of one recipe (loaded and verified)."""
    try:
        check_recipe_name(name)
        recipe = load_recipe(_recipes_dir(recipes_dir) / name)
    except (RecipeError, ValueError) as e:
        _fail(str(e))
    cal = recipe.calibration.to_json()
    cal.pop("enrollment_poses")
    info = {
        "name": recipe.name,
        "version": recipe.version,
        "path": str(recipe.root),
        "settings": recipe.settings.to_toml(),
        "calibration": cal,
        "threshold": threshold_summary(recipe).splitlines(),
        "model": {"gaussians": len(recipe.model), "sh_degree": recipe.model.sh_degree},
        "memory_bank": {"rows": len(recipe.bank), "dim": recipe.bank.dim, "metadata": recipe.bank.metadata},
        "reference_views": None if recipe.references is None else {"views": len(recipe.references), "teach_in_parts": recipe.references.parts},
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.pretty import Pretty

    Console().print(Pretty(info))


@recipes_app.command("export-model")
def recipes_export_model(
    name: str = typer.Argument(..., help="Recipe name."),
    out: Path = typer.Argument(..., help="PLY file to write (replaced)."),
    recipes_dir: Path = typer.Option(None, "--recipes-dir", help=RECIPES_DIR_HELP),
) -> None:
    """Write the recipe's Gaussian reference model as a standard 3DGS PLY (INRIA layout; opens in splat viewers)."""
    import shutil

    from agent.recipe import MODEL_FILE, verify_recipe_files
    from agent.splat.ply import load_ply

    try:
        check_recipe_name(name)
        root = _recipes_dir(recipes_dir) / name
        version = verify_recipe_files(root)  # the model is the one the manifest names
        n = len(load_ply(root / MODEL_FILE))  # and in the 3DGS layout
    except (RecipeError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if out.is_dir():
        typer.echo(f"error: {out} is a directory; give the PLY file to write", err=True)
        raise typer.Exit(2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(root / MODEL_FILE, tmp)
    tmp.replace(out)
    typer.echo(f"wrote {n} Gaussians of recipe {name} ({version}) to {out}")


def enroll_command(
    recipe: str = typer.Option(..., "--recipe", help="Recipe name (an id: [A-Za-z0-9._-])."),
    captures: Path = typer.Option(..., "--captures", help="The golden capture folder (transforms.json, images, depth)."),
    teach_in: list[Path] = typer.Option([], "--teach-in", help="A teach-in capture folder (repeatable): a nominal part run "
                                        "through the cell like any part. With teach-in parts the threshold is set from their "
                                        "scores; without, from leave-views-out golden views (2-5x more cautious)."),
    recipes_dir: Path = typer.Option(None, "--recipes-dir", help=RECIPES_DIR_HELP),
    fast: bool = typer.Option(False, "--fast", help="Reference from init_from_depth only (no training)."),
    iterations: int = typer.Option(1500, "--iterations", min=1, help="Training iterations of the reference."),
    backbone: str = typer.Option("efficientnet-lite0", "--backbone", help="Feature backbone."),
    expected_views: int = typer.Option(12, "--expected-views", min=1, help="Views per inspected part."),
    voxel_size_mm: float = typer.Option(0.0, "--voxel-mm", min=0.0, help="Voxel size; 0 = automatic."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Enroll a recipe from one golden capture: reference model, memory bank, calibration (threshold from the
    teach-in parts when given)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.pipeline import EnrollConfig, enroll
    from agent.recipe import save_recipe

    try:
        check_recipe_name(recipe)
        capture = load_capture(captures)
        teach_in_captures = [load_capture(d) for d in teach_in]
        config = EnrollConfig(backbone=backbone, model_mode="fast" if fast else "train", train_iterations=iterations,
                              expected_views=expected_views, voxel_size_m=voxel_size_mm / 1000 or None, seed=seed)  # fmt: skip
    except (CaptureError, ValueError) as e:
        _fail(str(e))
    console = Console()
    tasks: dict[str, int] = {}
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            result = enroll(capture, recipe, config, progress, teach_in=teach_in_captures)
        except ValueError as e:
            _fail(str(e))
    root = save_recipe(result, _recipes_dir(recipes_dir))
    console.print(f"enrolled {recipe} -> {root} ({result.version}) in {time.perf_counter() - t0:.1f} s")
    console.print(threshold_summary(result))


def verdict_of(part_id: str, recipe_name: str, version: str, result: InspectionResult, views: list[ViewResult], total_ms: float) -> Verdict:
    """The MQTT verdict object of an inspection result (also written as verdict.json)."""
    placement = None
    if result.placement_translation_m is not None and result.placement_rotation_deg is not None:
        placement = Placement(tuple(result.placement_translation_m), float(result.placement_rotation_deg))
    return Verdict(
        part_id=part_id, recipe=recipe_name, recipe_version=version, verdict=result.verdict, score=result.score,
        threshold=result.threshold,
        defects=[VerdictDefect.from_region(d) for d in result.defects],
        n_views=result.n_views, placement=placement,
        timings_ms=Timings(total_ms, float(np.mean([v.latency_ms for v in views])) if views else 0.0, result.finalise_ms),
        ts=time.time(), agent_version=__version__,
    )  # fmt: skip


def inspect_command(
    capture_dir: Path = typer.Argument(..., help="Capture folder (transforms.json with poses)."),
    recipe: str = typer.Option(..., "--recipe", help="Recipe name."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    recipes_dir: Path = typer.Option(None, "--recipes-dir", help=RECIPES_DIR_HELP),
    part_id: str = typer.Option(None, "--part-id", help="Part id in the verdict (default: the capture folder name)."),
    no_placement: bool = typer.Option(False, "--no-placement", help="Skip placement refinement (part exactly in the fixture)."),
) -> None:
    """Inspect one capture offline; writes the spec's inspection output and prints the verdict."""
    from agent.pipeline import RecipeInspector, inspect_capture

    try:
        check_recipe_name(recipe)
        rec = load_recipe(_recipes_dir(recipes_dir) / recipe)
        capture = load_capture(capture_dir)
    except (RecipeError, CaptureError, ValueError) as e:
        _fail(str(e))
    part_id = part_id or capture_dir.resolve().name
    t0 = time.perf_counter()
    inspector = RecipeInspector(rec, refine=not no_placement)
    result, session = inspect_capture(inspector, capture, part_id)
    total_ms = (time.perf_counter() - t0) * 1000
    verdict = verdict_of(part_id, rec.name, rec.version, result, session.view_results, total_ms)
    write_inspection_output(out, verdict, result, session.view_results, {f.name: f.image for f in capture.frames})
    typer.echo(json.dumps(verdict.to_dict()))
