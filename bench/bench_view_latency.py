"""Per-view inspection latency on a cell dataset, optionally against another checkout in the same run.

Inspects the test parts of enrolled recipes view by view, as the service does (`RecipeInspector` / `PartSession`),
and reports the latency of every view (mean, p95, max, by view index: a part's first view carries the placement
search, views 2-3 refine the placement, views 4-5 score the first views again at the frozen placement) and of
finalise (last view to verdict). With ``--baseline-tree`` (a checkout of another revision, e.g. made with `git
worktree add`), the two code versions run alternately in subprocesses on the same recipes and parts, ``--rounds``
times each, so that their ratio is measured under the same conditions. Writes JSON with the machine's details.

    .venv/bin/agent simulate dataset --recipe all --out out/lat --good 3 --defective 5 --seed 7001
    (enrol each recipe from out/lat/<recipe>/train/000 with its teach-in parts into out/lat-recipes)
    .venv/bin/python bench/bench_view_latency.py --data out/lat --recipes-dir out/lat-recipes --baseline-tree /tmp/head
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def measure(data: Path, recipes_dir: Path, recipes: list[str], parts: int) -> dict:
    """One pass of the code importable here: per recipe, per test part, each view's latency and stage timings."""
    from agent.capture import load_capture
    from agent.pipeline import RecipeInspector, inspect_capture
    from agent.recipe import load_recipe

    out: dict[str, list] = {}
    for name in recipes:
        inspector = RecipeInspector(load_recipe(recipes_dir / name))
        captures = sorted((data / name / "test").glob("*/*"))[:parts]
        if not captures:
            raise SystemExit(f"no test parts under {data / name / 'test'}")
        inspect_capture(inspector, load_capture(captures[0]))  # warm-up: lazily built structures, caches
        rows = []
        for path in captures:
            capture = load_capture(path)
            session = inspector.start_part(path.name)
            views = [session.add_view(f) for f in capture.frames]
            result = session.finalise()
            rows.append({"part": str(path.relative_to(data / name)), "score": result.score,
                         "views_ms": [v.latency_ms for v in views], "finalise_ms": result.finalise_ms,
                         "stages_ms": [v.timings_ms for v in views]})  # fmt: skip
        out[name] = rows
    return out


def summarise(runs: list[dict]) -> dict:
    """Per recipe and over all: per-view mean / p95 / max, the first view's mean and p95, finalise p95, and the mean
    by view index, pooled over the rounds."""
    summary: dict[str, dict] = {}
    names = list(runs[0])
    pools = {n: [r for run in runs for r in run[n]] for n in names}
    pools["all"] = [r for n in names for r in pools[n]]
    for n, rows in pools.items():
        views = np.array([v for r in rows for v in r["views_ms"]])
        first = np.array([r["views_ms"][0] for r in rows])
        by_index = [float(np.mean([r["views_ms"][i] for r in rows if len(r["views_ms"]) > i])) for i in range(max(len(r["views_ms"]) for r in rows))]
        summary[n] = {
            "views": int(len(views)), "mean_ms": float(views.mean()), "p95_ms": float(np.percentile(views, 95)), "max_ms": float(views.max()),
            "first_view_mean_ms": float(first.mean()), "first_view_p95_ms": float(np.percentile(first, 95)),
            "finalise_p95_ms": float(np.percentile([r["finalise_ms"] for r in rows], 95)),
            "mean_by_view_index_ms": [round(v, 1) for v in by_index],
        }  # fmt: skip
    return summary


def run_tree(tree: Path, args: argparse.Namespace) -> dict:
    """One measuring pass in a subprocess with ``tree``'s `agent` package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--data", str(args.data), "--recipes-dir", str(args.recipes_dir),
           "--recipes", args.recipes, "--parts", str(args.parts)]  # fmt: skip
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="cell dataset root (<recipe>/test/<category>/<part>)")
    ap.add_argument("--recipes-dir", type=Path, required=True, help="the enrolled recipes")
    ap.add_argument("--recipes", default="stool,vase,bracket")
    ap.add_argument("--parts", type=int, default=6, help="test parts per recipe (sorted by category, then name)")
    ap.add_argument("--baseline-tree", type=Path, default=None, help="a checkout of another revision to compare with, run alternately")
    ap.add_argument("--rounds", type=int, default=2, help="passes of each code version")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "view_latency.json")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one pass, JSON on stdout
    args = ap.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.measure:
        print(json.dumps(measure(args.data, args.recipes_dir, recipes, args.parts)))
        return

    from agent.machine import machine_details
    from agent.recipe import load_recipe

    camera = load_recipe(args.recipes_dir / recipes[0]).settings.camera

    this_tree = HERE.parent
    trees = {"current": this_tree} if args.baseline_tree is None else {"baseline": args.baseline_tree.resolve(), "current": this_tree}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    t0 = time.perf_counter()
    for i in range(args.rounds):
        for label, tree in trees.items():
            runs[label].append(run_tree(tree, args))
            print(f"round {i + 1}/{args.rounds}: {label} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def revision(tree: Path) -> str:
        done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return (done.stdout.strip() or "unknown") + ("+changes" if dirty else "")

    report = {
        "benchmark": "view_latency",
        "machine": machine_details(image_size=f"{camera.width}x{camera.height}"),
        "data": str(args.data), "recipes": recipes, "parts_per_recipe": args.parts, "rounds": args.rounds,
        "code": {label: revision(tree) for label, tree in trees.items()},
        "summary": {label: summarise(r) for label, r in runs.items()},
        "runs": runs,
    }  # fmt: skip
    if "baseline" in runs:
        b, c = report["summary"]["baseline"], report["summary"]["current"]
        report["ratio_current_to_baseline"] = {
            n: {k: round(c[n][k] / b[n][k], 3) for k in ("mean_ms", "p95_ms", "max_ms", "first_view_mean_ms", "finalise_p95_ms")} for n in c
        }  # fmt: skip
        scores = [(rb["score"], rc["score"]) for n in recipes for rb, rc in zip(runs["baseline"][0][n], runs["current"][0][n])]
        report["largest_part_score_change"] = float(max(abs(x - y) for x, y in scores))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for label, s in report["summary"].items():
        for n, v in s.items():
            print(f"{label:8s} {n:8s} per view mean {v['mean_ms']:6.0f} ms  p95 {v['p95_ms']:6.0f}  max {v['max_ms']:6.0f}  "
                  f"first view {v['first_view_mean_ms']:6.0f} (p95 {v['first_view_p95_ms']:.0f})  finalise p95 {v['finalise_p95_ms']:.0f}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
