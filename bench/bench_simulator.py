"""Simulator speed: one recipe's dataset (golden enrollment capture + 20 test parts) at 256 x 256.

Target: under 2 minutes per recipe on the 2-core development machine. Writes bench/results/simulator.json
with wall time, CPU time of this process and its workers, and the load average (the machine may be shared).

    .venv/bin/python bench/bench_simulator.py [--recipe stool --recipe vase ...] [--workers 2]
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from agent.sim.config import SimConfig
from agent.sim.dataset import write_dataset
from agent.machine import machine_details  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "simulator.json"


def main(
    recipe: list[str] = typer.Option(["stool", "vase", "bracket"], "--recipe", help="Recipes to time (repeatable)."),
    good: int = typer.Option(10, "--good"),
    defective: int = typer.Option(10, "--defective"),
    size: int = typer.Option(256, "--size"),
    workers: int = typer.Option(2, "--workers"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(RESULTS, "--out", help="JSON result file."),
) -> None:
    config = SimConfig(width=size, height=size)
    runs = []
    for name in recipe:
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            usage_before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
            start = time.perf_counter()
            write_dataset(tmp, name, good, defective, seed, config, "cell", workers)
            seconds = time.perf_counter() - start
            usage_after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
            cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(usage_after, usage_before))
            size_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
        views = config.enroll_views + (good + defective) * config.n_views
        parallel = max(1, min(workers, os.cpu_count() or 1))
        runs.append({
            "recipe": name, "parts": 1 + good + defective, "views": views, "seconds": round(seconds, 2),
            "seconds_per_view": round(seconds / views, 4), "under_2_min": seconds < 120.0,
            "cpu_seconds": round(cpu, 1), "cpu_seconds_per_view": round(cpu / views, 4),
            "seconds_if_uncontended": round(cpu / parallel, 1),
            "dataset_mb": round(size_mb, 1), "load_average_1min_before": round(load_before, 2),
            "load_average_1min_after": round(os.getloadavg()[0], 2),
        })
        typer.echo(f"{name}: {seconds:.1f} s wall, {cpu:.1f} CPU s for {1 + good + defective} parts ({views} views), "
                   f"load average {load_before:.2f} before")
    result = {
        "benchmark": "simulator: golden enrollment capture + test parts of one recipe, cell layout written to disk",
        "machine": {**machine_details(), "numpy": np.__version__,
                    "note": "development machine shared with other jobs: wall time depends on the load (see "
                            "load_average_*); cpu_seconds counts this process and its workers, and "
                            "seconds_if_uncontended = cpu_seconds / min(workers, cores)"},
        "config": {"image_size": [size, size], "supersample": config.supersample, "shadows": config.shadows,
                   "enroll_views": config.enroll_views, "views_per_part": config.n_views, "good": good,
                   "defective": defective, "workers": workers, "surface_points": config.surface_points},
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
