"""Patch features and memory bank speed on the CPU at 256x256.

Times: feature extraction per image (batch 1 and batch 8; EfficientNet-Lite0/Lite2 with their packaged
weights, WideResNet-50-2 with random weights, which cost the same), the greedy coreset build for the
patches of 36 images (10 %), kNN scoring of one image against that bank, the image-size anomaly map
(upsampling + blur), and the observed-vs-rendered feature difference map. Images are random textures:
speed does not depend on content. Writes bench/results/features.json.

    .venv/bin/python bench/bench_features.py [--repeats 7] [--threads N]

On a shared machine torch's OpenMP threads spin-wait badly when another process holds a core;
``OMP_WAIT_POLICY=PASSIVE`` in the environment avoids that (the JSON records the setting and the load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from agent.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchFeatureExtractor,
    WideResNet50Trunk,
    feature_difference_map,
    get_extractor,
    stage_difference_map,
)
from agent.memory_bank import MemoryBank, anomaly_maps
from agent.machine import machine_details  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "features.json"
SIZE = 256
N_IMAGES = 36


def load_average() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def timed(fn, repeats: int, warmup: int = 1) -> dict:
    """Milliseconds per call: min and median over ``repeats`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min_ms": 1000 * min(times), "median_ms": 1000 * statistics.median(times), "repeats": repeats}


def per_image(result: dict, batch: int) -> dict:
    return {**result, "batch": batch, "per_image_median_ms": result["median_ms"] / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    images = (rng.random((N_IMAGES, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    load_before = load_average()
    results: dict = {"extraction": {}}

    extractors = {
        "efficientnet-lite0": get_extractor("efficientnet-lite0", device="cpu"),
        "efficientnet-lite2": get_extractor("efficientnet-lite2", device="cpu"),
        "wide_resnet50_2 (random weights)": PatchFeatureExtractor(
            "wide_resnet50_2", WideResNet50Trunk(), 1024, IMAGENET_MEAN, IMAGENET_STD, device="cpu"
        ),
    }
    for name, extractor in extractors.items():
        entry = {"out_dim": extractor.out_dim, "stride": extractor.stride}
        entry["batch1"] = per_image(timed(lambda: extractor(images[0]), args.repeats), 1)
        entry["batch8"] = per_image(timed(lambda: extractor(images[:8]), max(2, args.repeats // 2)), 8)
        results["extraction"][name] = entry
        print(f"{name}: {entry['batch1']['median_ms']:.1f} ms/image (b1), "
              f"{entry['batch8']['per_image_median_ms']:.1f} ms/image (b8)")

    lite0 = extractors["efficientnet-lite0"]
    features = torch.cat([lite0(images[i : i + 8]).features for i in range(0, N_IMAGES, 8)])
    start = time.perf_counter()
    bank = MemoryBank.build(features, fraction=0.1)
    results["coreset_build"] = {
        "seconds": time.perf_counter() - start,
        "patches": int(features.shape[0] * features.shape[2] * features.shape[3]),
        "dim": int(features.shape[1]),
        "bank_size": len(bank),
        "projection_dim": 128,
        "images": N_IMAGES,
    }
    print(f"coreset: {results['coreset_build']['seconds']:.2f} s for {results['coreset_build']['patches']} patches "
          f"-> {len(bank)}")

    query = lite0(images[0]).features
    results["knn_score_per_image"] = timed(lambda: bank.score_patches(query), args.repeats)
    scores = bank.score_patches(query)
    results["anomaly_map_per_image"] = timed(lambda: anomaly_maps(scores, (SIZE, SIZE), lite0.stride), args.repeats)
    results["feature_difference_map_per_image"] = timed(
        lambda: feature_difference_map(lite0, images[0], images[1]), args.repeats
    )

    def one_view() -> None:
        observed_stages = lite0.stage_maps(images[0])
        patch_scores = bank.score_patches(lite0.features_from_stages(observed_stages).features)
        anomaly_maps(patch_scores, (SIZE, SIZE), lite0.stride)
        stage_difference_map(observed_stages, lite0.stage_maps(images[1]), lite0.stage_strides, (SIZE, SIZE))

    results["per_view_total"] = {
        **timed(one_view, args.repeats),
        "includes": "lite0 on observed + render, kNN scoring, anomaly map (upsample+blur), feature difference map",
        "budget_ms_all_stages": 1000,
    }
    knn, amap = results["knn_score_per_image"]["median_ms"], results["anomaly_map_per_image"]["median_ms"]
    diff, total = results["feature_difference_map_per_image"]["median_ms"], results["per_view_total"]["median_ms"]
    print(f"kNN {knn:.1f} ms, map {amap:.1f} ms, diff map {diff:.1f} ms; per view {total:.0f} ms")

    results["machine"] = {
        **machine_details(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "note": "development machine shared with other jobs; timings are noisy",
        "image_size": [SIZE, SIZE],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
