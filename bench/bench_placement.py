"""Placement refinement accuracy and speed on simulator data; writes bench/results/placement.json.

Per recipe: a golden enrollment capture (no jitter; it defines the recipe frame), a Gaussian model trained on it
(agent.splat.train, cached under --cache), then inspection parts (good and defective) placed with +-jitter_mm in
x, y and +-jitter_deg about z. Errors are against Capture.gt.T_world_part.

- Incremental (the service's protocol): views arrive one by one; after view k the estimate is updated by
  refine_placement(model, views[:k], init=previous estimate). Time per update is reported per k.
- Joint: one refinement over all views from the recipe placement (the other parts, to cover more parts in the
  time this shared machine allows).
- Single image (MAD protocol): estimate_single_image_pose of a few inspection views of the first part against
  the enrollment views; the camera pose error in the recipe frame.

Example: .venv/bin/python bench/bench_placement.py --products stool,vase,bracket --parts 4 --incremental-parts 1
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import typer

from agent import geometry
from agent.sim import SimConfig, enrollment_poses, inspection_poses, simulate_part
from agent.splat.placement import PlacementConfig, SingleImagePoseConfig, estimate_single_image_pose, refine_placement
from agent.splat.train import TrainConfig, train_gaussians
from agent.machine import machine_details  # noqa: E402

DEFECTS = [None, "stain", "missing", "dent", None, "scratch", "burr"]


def errors(T: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {
        "translation_error_mm": float(np.linalg.norm(T[:3, 3] - truth[:3, 3]) * 1000),
        "rotation_error_deg": geometry.rotation_angle_deg(T[:3, :3].T @ truth[:3, :3]),
    }


def trained_model(product: str, sim: SimConfig, iterations: int, cache: Path):
    path = cache / f"model_{product}_{sim.width}_{iterations}.pt"
    golden = simulate_part(product, None, enrollment_poses(product, sim), sim, np.random.default_rng(123), jitter=False)
    if path.is_file():
        return torch.load(path, weights_only=False), golden, None
    t = time.perf_counter()
    model, _ = train_gaussians(golden, TrainConfig(iterations=iterations))
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return model, golden, time.perf_counter() - t


def main(
    products: str = "stool,vase,bracket",
    parts: int = 4,
    incremental_parts: int = 1,
    single_images: int = 2,
    size: int = 256,
    views: int = 12,
    jitter_mm: float = 5.0,
    jitter_deg: float = 5.0,
    train_iterations: int = 1000,
    cache: Path = Path("/tmp/placement_bench_cache"),
    out: Path = Path(__file__).parent / "results" / "placement.json",
) -> None:
    config = PlacementConfig()
    load_before = os.getloadavg()[0]
    runs = []
    for product in products.split(","):
        sim = SimConfig(width=size, height=size, n_views=views, jitter_mm=jitter_mm, jitter_deg=jitter_deg)
        model, golden, train_s = trained_model(product, sim, train_iterations, cache)
        poses = inspection_poses(product, sim)
        record = {"recipe": product, "gaussians": len(model), "train_seconds": train_s, "parts": []}
        for i in range(parts):
            defect = DEFECTS[i % len(DEFECTS)]
            capture = simulate_part(product, defect, poses, sim, np.random.default_rng(1000 + i))
            truth = capture.gt.T_world_part
            entry = {
                "label": capture.gt.label,
                "true_offset_mm": float(np.linalg.norm(truth[:3, 3]) * 1000),
                "true_offset_deg": geometry.rotation_angle_deg(truth[:3, :3]),
            }
            if i < incremental_parts:
                previous, updates = None, []
                for k in range(1, len(capture.frames) + 1):
                    res = refine_placement(model, capture.frames[:k], previous, config)
                    previous = res.T_world_part
                    updates.append({"views": k, "ms": res.ms, "iterations": res.iterations, **errors(res.T_world_part, truth)})
                    print(product, capture.gt.label, updates[-1], flush=True)
                entry.update({"protocol": "incremental", "updates": updates, **errors(previous, truth)})
            else:
                res = refine_placement(model, capture.frames, None, config)
                entry.update({"protocol": "joint", "ms": res.ms, "iterations": res.iterations, **errors(res.T_world_part, truth)})
            print(product, entry["label"], entry["protocol"], entry["translation_error_mm"], entry["rotation_error_deg"], flush=True)
            record["parts"].append(entry)
            if i == 0:
                singles = []
                for f in capture.frames[: single_images * 3 : 3]:
                    true_c2w = geometry.invert_rigid(truth) @ f.c2w  # the camera in the recipe frame
                    est = estimate_single_image_pose(model, f.image, f.intrinsics, golden.frames, SingleImagePoseConfig())
                    distance = float(np.linalg.norm(true_c2w[:3, 3] - model.means.detach().double().mean(0).numpy()))
                    singles.append({
                        "frame": f.name, "ms": est.ms, "candidate": est.candidate,
                        "camera_rotation_error_deg": geometry.rotation_angle_deg(est.c2w[:3, :3].T @ true_c2w[:3, :3]),
                        "camera_position_error_mm": float(np.linalg.norm(est.c2w[:3, 3] - true_c2w[:3, 3]) * 1000),
                        "camera_distance_mm": distance * 1000,
                    })  # fmt: skip
                    print(product, "single image", singles[-1], flush=True)
                record["single_image"] = singles
        t_err = [p["translation_error_mm"] for p in record["parts"]]
        r_err = [p["rotation_error_deg"] for p in record["parts"]]
        record["median_translation_error_mm"] = float(np.median(t_err))
        record["median_rotation_error_deg"] = float(np.median(r_err))
        runs.append(record)
    all_t = [p["translation_error_mm"] for r in runs for p in r["parts"]]
    all_r = [p["rotation_error_deg"] for r in runs for p in r["parts"]]
    per_k: dict[int, list[float]] = {}
    for r in runs:
        for p in r["parts"]:
            for u in p.get("updates", []):
                per_k.setdefault(u["views"], []).append(u["ms"])
    result = {
        "benchmark": "placement refinement through the Gaussian rasterizer (agent/splat/placement.py)",
        "machine": {
            **machine_details(),
            "torch_threads": config.torch_threads,
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0],
            "note": "development machine shared with other jobs (several helpers' tests and benchmarks running)",
        },
        "config": {
            "image_size": [size, size],
            "views_per_part": views,
            "jitter_mm": jitter_mm,
            "jitter_deg": jitter_deg,
            "train_iterations": train_iterations,
            "placement": {k: v for k, v in config.__dict__.items()},
        },
        "summary": {
            "parts": len(all_t),
            "median_translation_error_mm": float(np.median(all_t)),
            "median_rotation_error_deg": float(np.median(all_r)),
            "max_translation_error_mm": float(np.max(all_t)),
            "max_rotation_error_deg": float(np.max(all_r)),
            "meets_1mm_0.5deg": bool(np.median(all_t) <= 1.0 and np.median(all_r) <= 0.5),
            "incremental_update_ms_median_by_views": {k: float(np.median(v)) for k, v in sorted(per_k.items())},
        },
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    typer.run(main)
