"""Rasterizer speed on the CPU: forward and forward+backward at 256x256 with 50k Gaussians.

Backends: "cpu" (C++ tile kernel, hand-written backward), "torch" (tile-vectorised pure torch),
"naive" (one Gaussian at a time over the whole image). The naive reference is timed on a subset of
the Gaussians (its cost is linear in their number: one whole-image pass each) and extrapolated;
the JSON says so. Writes bench/results/rasterizer.json.

    .venv/bin/python bench/bench_rasterizer.py [--gaussians 50000] [--size 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from agent.splat import cpu_kernel, rasterize
from agent.splat.scenes import Scene, surface_scene
from agent.machine import machine_details  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "rasterizer.json"


def subset(scene: Scene, n: int) -> Scene:
    keep = torch.randperm(scene.means.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    return Scene(
        scene.means[keep], scene.quats[keep], scene.scales[keep], scene.opacities[keep], scene.colors[keep],
        scene.viewmats, scene.Ks, scene.width, scene.height,
    )  # fmt: skip


def time_backend(scene: Scene, backend: str, backward: bool, repeats: int, warmup: int = 1) -> dict:
    """Seconds per call (min and median over ``repeats``) of a render, optionally with the backward pass."""

    def once() -> float:
        params = [t.detach().clone().requires_grad_(backward) for t in scene.args()[:5]]
        start = time.perf_counter()
        out = rasterize(*params, scene.viewmats, scene.Ks, scene.width, scene.height, backend=backend)
        if backward:
            (out.rgb.sum() + out.depth.sum() + out.alpha.sum()).backward()
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    times = [once() for _ in range(repeats)]
    return {"min_ms": 1000 * min(times), "median_ms": 1000 * statistics.median(times), "repeats": repeats}


def measure_compile_seconds() -> float | None:
    """Time a cold JIT build of the C++ kernel in a fresh cache directory (a separate process)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, AGENT_TORCH_EXTENSIONS_DIR=tmp)
        code = "from agent.splat import cpu_kernel; m = cpu_kernel.load_kernel(); print(cpu_kernel.kernel_load_seconds() if m else -1)"
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
        try:
            value = float(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return None
        return value if value >= 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--naive-gaussians", type=int, default=500, help="subset timed for the naive reference")
    parser.add_argument("--skip-compile", action="store_true", help="do not time a cold build of the C++ kernel")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    compile_s = None if args.skip_compile else measure_compile_seconds()
    start = time.perf_counter()
    kernel = cpu_kernel.load_kernel()
    load_s = time.perf_counter() - start

    scene = surface_scene(args.gaussians, args.size, args.size)
    probe = rasterize(*scene.args(), backend="cpu" if kernel else "torch")
    results: dict[str, dict] = {}
    for backend in ("cpu", "torch"):
        if backend == "cpu" and kernel is None:
            continue
        repeats = args.repeats if backend == "cpu" else max(2, args.repeats // 3)
        results[backend] = {
            "gaussians": args.gaussians,
            "forward": time_backend(scene, backend, False, repeats),
            "forward_backward": time_backend(scene, backend, True, repeats),
        }
        print(backend, json.dumps(results[backend]))
    if kernel is not None:  # heavier splats (2-6 px): more overlap per pixel
        heavy = surface_scene(args.gaussians, args.size, args.size)
        heavy.scales = heavy.scales * 2.0
        results["cpu_scales_x2"] = {
            "gaussians": args.gaussians,
            "forward": time_backend(heavy, "cpu", False, args.repeats),
            "forward_backward": time_backend(heavy, "cpu", True, args.repeats),
            "tile_intersections": rasterize(*heavy.args()).meta["n_isects"],
        }
        print("cpu_scales_x2", json.dumps(results["cpu_scales_x2"]))
    small = subset(scene, min(args.naive_gaussians, args.gaussians))
    naive = {
        "gaussians_timed": small.means.shape[0],
        "forward": time_backend(small, "naive", False, 2, warmup=0),
        "forward_backward": time_backend(small, "naive", True, 2, warmup=0),
        "note": "timed on a random subset; *_extrapolated_ms scale the min linearly to the full count "
        "(one whole-image pass per Gaussian). Full-size forward+backward would need ~100 GB for its autograd graph (about 2.5 MB per Gaussian at 256x256).",
    }
    factor = args.gaussians / small.means.shape[0]
    for key in ("forward", "forward_backward"):
        naive[key]["extrapolated_ms"] = naive[key]["min_ms"] * factor
    results["naive"] = naive
    print("naive", json.dumps(naive))

    speedup = {}
    for backend in ("cpu", "torch"):
        if backend in results:
            speedup[backend] = {
                key: naive[key]["extrapolated_ms"] / results[backend][key]["median_ms"] for key in ("forward", "forward_backward")
            }
    report = {
        "benchmark": "rasterizer",
        "scene": "agent.splat.scenes.surface_scene: flat Gaussians 1-3 px on a bumpy closed surface filling the view",
        "image_size": [args.size, args.size],
        "gaussians": args.gaussians,
        "visible_gaussians": int((probe.meta["radii"] > 0).all(-1).sum()),
        "tile_intersections": probe.meta["n_isects"],
        "mean_alpha": float(probe.alpha.mean()),
        "results": results,
        "speedup_over_naive": speedup,
        "targets_ms": {"forward": 60, "forward_backward": 150},
        "cpp_kernel": {
            "available": kernel is not None,
            "cold_compile_seconds": compile_s,
            "load_seconds_this_run": load_s,
        },
        "machine": {
            **machine_details(),
            "load_average": list(os.getloadavg()),
        },
        "dtype": "float32",
        "note": "the 2 cores were shared with other jobs while this ran; times are noisy (see load_average)",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
