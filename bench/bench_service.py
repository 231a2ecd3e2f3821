"""Sustained throughput of the MQTT service: views per second, RSS over time, verdict latency.

Two inspectors:

- ``--inspector test`` (default): the TEST inspector (tests/test_service_doubles.py: red-pixel fraction,
  no real inspection), so this measures the service shell only: MQTT in, decoding, pairing by timestamp,
  queues, worker thread, SQLite writes, MQTT out. Runs for ``--seconds``. Writes bench/results/service.json.
- ``--inspector real``: the real inspection (agent.pipeline.RecipeInspector: placement refinement, reference
  render, anomaly maps, voxel fusion) of an enrolled simulated recipe: the one `agent demo` enrols and caches
  (``--demo-out``, enrolled there first when missing or stale), at its image size (256 px by default).
  ``--parts`` simulated parts (half defective) are rendered and encoded before the clock starts, then played,
  and replayed under new part ids until ``--seconds`` have passed. Writes bench/results/service_real.json.

The broker is the local Mosquitto (127.0.0.1:1883); the publisher runs in this process and keeps at most
``--ahead`` parts unanswered (RSS is this whole process: agent, publisher and the test client, which keeps
every message it receives; in real mode also the pre-rendered parts). It waits for each PUBACK, so on a
shared 2-core machine it is part of what limits the rate. Verdict latency is measured twice: by the agent
(``agent_verdict_latency_seconds``: finalise + publish, mean) and by the client (last ``progress`` message
of a part -> its ``verdict`` message, p50/p95).

    .venv/bin/python bench/bench_service.py --seconds 30 --size 64
    .venv/bin/python bench/bench_service.py --inspector real --parts 8 --seconds 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


from agent.contract import FrameMessage, PartEnd, PartStart, RobotPose  # noqa: E402
from agent.geometry import Intrinsics  # noqa: E402
from agent.machine import machine_details  # noqa: E402
from agent.service import CellConfig, InspectionService, MqttConfig, ServiceConfig  # noqa: E402
from storage import ResultStore  # noqa: E402
from test_service_doubles import Cell, RedPixelInspector, ServiceThread, c2w_at, factory_for, forget_sessions  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """RSS of this process once a second: [(seconds since start, MB)]."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stopping.is_set():
            self.samples.append((round(time.monotonic() - t0, 2), round(rss_mb(), 1)))
            self.stopping.wait(1.0)

    def stop(self) -> list[tuple[float, float]]:
        self.stopping.set()
        self.join()
        return self.samples


class TimedCell(Cell):
    """The test harness's cell, also noting when (monotonic) each message arrived."""

    def __init__(self, cell: str, **kwargs) -> None:
        self.arrivals: list[tuple[str, object, float]] = []
        super().__init__(cell, **kwargs)

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        super()._on_message(client, userdata, msg)
        if msg.payload:
            with self._lock:
                kind, message = self.messages[-1]
                self.arrivals.append((kind, message, time.monotonic()))

    def verdict_after_last_view_ms(self) -> list[float]:
        """Per part: its verdict's arrival minus its last progress message's arrival."""
        last_view: dict[str, float] = {}
        out = []
        with self._lock:
            for kind, message, at in self.arrivals:
                if kind == "progress":
                    last_view[message.part_id] = at
                elif kind == "verdict" and message.part_id in last_view:
                    out.append((at - last_view[message.part_id]) * 1000)
        return out


def histogram_means(scrape: str) -> dict[str, float]:
    """Mean view and verdict latency (ms) from the agent's Prometheus histograms."""
    sums: dict[str, float] = {}
    for line in scrape.splitlines():
        for name in ("agent_verdict_latency_seconds", "agent_view_latency_seconds"):
            if line.startswith(f"{name}_sum") or line.startswith(f"{name}_count"):
                sums[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return {
        "mean_view_latency_ms": round(1000 * sums["agent_view_latency_seconds_sum"] / max(1, sums["agent_view_latency_seconds_count"]), 2),
        "mean_last_view_to_verdict_ms": round(1000 * sums["agent_verdict_latency_seconds_sum"] / max(1, sums["agent_verdict_latency_seconds_count"]), 2),
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {"p50": round(float(np.percentile(values, 50)), 1), "p95": round(float(np.percentile(values, 95)), 1), "max": round(float(np.max(values)), 1)}


def play(cell: TimedCell, part_messages: Callable[[int], list], ahead: int, keep_going: Callable[[int], bool]) -> int:
    """Publish part n's messages (``part_messages(n)``: start, pose, frame, ...) while ``keep_going(n)``, with at
    most ``ahead`` parts without a verdict; returns how many parts were published."""
    n = 0
    while keep_going(n):
        while n - len(cell.of("verdict")) >= ahead:
            time.sleep(0.002)
        for message in part_messages(n):
            cell.publish(message)
        n += 1
    return n


def run_test_inspector(args: argparse.Namespace) -> dict:
    cell_id = f"bench{uuid.uuid4().hex[:8]}"
    size = args.size
    K = Intrinsics(size * 1.2, size * 1.2, size / 2, size / 2, size, size)
    inspector = RedPixelInspector(intrinsics=K, retain=False)
    tmp = tempfile.TemporaryDirectory()
    store = ResultStore(f"sqlite:///{tmp.name}/results.db")
    config = ServiceConfig(cells=(CellConfig(cell_id),), mqtt=MqttConfig(client_id=f"agent-{cell_id}"), metrics_port=None, workers=args.workers)
    service = InspectionService(config, factory_for(inspector), store, recipe_names=lambda: ["redtest"])
    img = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    cell = TimedCell(cell_id)
    clock = [time.time()]

    def part(n: int) -> list:
        messages: list = [PartStart(f"p{n}", "redtest", time.time(), args.views)]
        for v in range(args.views):
            clock[0] += 0.1
            messages += [RobotPose(clock[0], "cam0", c2w_at(v)), FrameMessage.from_arrays(f"p{n}", f"f{v}", "cam0", clock[0] + 0.003, img, intrinsics=K)]
        return messages

    with ServiceThread(service):
        sampler = RssSampler()
        sampler.start()
        t_start = time.monotonic()
        n_parts = play(cell, part, args.ahead, lambda n: time.monotonic() - t_start < args.seconds)
        cell.wait_for("verdict", count=n_parts, timeout=120)
        elapsed = time.monotonic() - t_start
        rss = sampler.stop()
    result = summary(cell, service, n_parts, elapsed, rss)
    cell.close()
    forget_sessions([f"agent-{cell_id}.{cell_id}"])
    store.close()
    return {
        "benchmark": "service throughput with the TEST inspector (red-pixel fraction; no real inspection)",
        "machine": machine_details(note="2-core machine shared with other jobs while measured"),
        "image_size": [size, size],
        "encoding": "png",
        "payload_bytes_per_frame": len(FrameMessage.from_arrays("p", "f", "cam0", 0.0, img, intrinsics=K).to_payload()),
        "views_per_part": args.views,
        "workers": args.workers,
        **result,
    }


def run_real_inspector(args: argparse.Namespace) -> dict:
    from rich.console import Console

    import agent.demo as demo
    from agent.pipeline import RecipeInspector
    from agent.recipe import load_recipe
    from agent.sim.dataset import simulate_job

    console = Console(stderr=True)
    config = demo.DEMO_ENROLL_CONFIG
    options = demo.DemoOptions(parts=args.parts, defective_fraction=0.5, out=args.demo_out, size=args.size, seed=args.seed)
    version, reused, enroll_s = demo.prepare_recipe(options, config, console)
    recipe = load_recipe(options.recipes_dir / options.recipe)
    inspector = RecipeInspector(recipe)
    _, planned = demo.plan_demo(options)
    sim = demo.sim_config(options, config)
    t_render = time.perf_counter()
    rendered = []  # (truth, [(c2w, image, depth, intrinsics)]) per part: rendered (and below encoded) before the clock starts
    for p in planned:
        capture = simulate_job(p.job, sim)
        frames = [(f.c2w, f.image, f.depth, f.intrinsics) for f in capture.frames]
        rendered.append((p.truth, frames))
    console.print(f"rendered {len(rendered)} parts x {len(rendered[0][1])} views in {time.perf_counter() - t_render:.0f} s")
    cell_id = f"benchreal{uuid.uuid4().hex[:6]}"
    tmp = tempfile.TemporaryDirectory()
    store = ResultStore(f"sqlite:///{tmp.name}/results.db")
    service_config = ServiceConfig(cells=(CellConfig(cell_id),), mqtt=MqttConfig(client_id=f"agent-{cell_id}"), metrics_port=None, workers=args.workers)
    service = InspectionService(service_config, lambda name: inspector, store, recipe_names=lambda: [inspector.name])
    cell = TimedCell(cell_id)
    # encoding (png image, npy depth) is the cell's work: done before the clock starts; a replayed part gets
    # a new part id and new time stamps only
    encoded = [[(c2w, FrameMessage.from_arrays("p", f"{v:03d}", "cam0", 0.0, image, intrinsics=K, depth=depth)) for v, (c2w, image, depth, K) in enumerate(frames)]
               for _, frames in rendered]  # fmt: skip
    payload_bytes = len(encoded[0][0][1].to_payload())
    clock = [time.time()]

    def part(n: int) -> list:
        messages: list = [PartStart(f"p{n}", inspector.name, time.time(), len(encoded[n % len(encoded)]))]
        for c2w, frame in encoded[n % len(encoded)]:
            clock[0] += 0.5
            messages += [RobotPose(clock[0], "cam0", c2w), dataclasses.replace(frame, part_id=f"p{n}", ts=clock[0] + 0.003)]
        return [*messages, PartEnd(f"p{n}", time.time())]

    with ServiceThread(service):
        sampler = RssSampler()
        sampler.start()
        t_start = time.monotonic()
        n_parts = play(cell, part, args.ahead, lambda n: n < len(encoded) or time.monotonic() - t_start < args.seconds)
        cell.wait_for("verdict", count=n_parts, timeout=60 * 60)
        elapsed = time.monotonic() - t_start
        rss = sampler.stop()
    result = summary(cell, service, n_parts, elapsed, rss)
    truth = {f"p{n}": rendered[n % len(rendered)][0] for n in range(n_parts)}
    verdicts = {v.part_id: v for v in cell.of("verdict")}
    view_ms = [v.timings_ms.per_view_mean for v in verdicts.values()]
    stages: dict[str, list[float]] = {}
    for p in store.list_parts(cell=cell_id, limit=10_000):
        for w in store.get_part(p.part_id, cell=cell_id).views:
            for k, ms in w.timings_ms.items():
                stages.setdefault(k, []).append(ms)
    cell.close()
    forget_sessions([f"agent-{cell_id}.{cell_id}"])
    store.close()
    return {
        "benchmark": "service throughput with the REAL inspector (RecipeInspector of an enrolled simulated recipe)",
        "machine": machine_details(note="2-core machine shared with other jobs while measured"),
        "recipe": {"name": inspector.name, "version": version, "image_size": [args.size, args.size], "cached": reused,
                   "enroll_seconds": round(enroll_s, 1), "model_mode": recipe.settings.model_mode,
                   "gaussians": len(recipe.model), "bank_rows": len(recipe.bank)},  # fmt: skip
        "encoding": "png image + npy depth",
        "payload_bytes_per_frame": payload_bytes,
        "views_per_part": len(rendered[0][1]),
        "workers": args.workers,
        **result,
        "per_view_processing_ms": percentiles(view_ms) | {"mean": round(float(np.mean(view_ms)), 1)},
        "stage_ms_mean": {k: round(float(np.mean(v)), 1) for k, v in sorted(stages.items())},
        "outcomes_vs_truth": {k: sum(1 for p, v in verdicts.items() if demo.outcome(truth[p], v.verdict) == k) for k in ("correct", "escape", "false reject", "incomplete")},
        "first_round": [{"part": f"p{n}", "truth": truth[f"p{n}"], "verdict": verdicts[f"p{n}"].verdict, "score": verdicts[f"p{n}"].score} for n in range(len(rendered))],
    }


def summary(cell: TimedCell, service: InspectionService, n_parts: int, elapsed: float, rss: list[tuple[float, float]]) -> dict:
    """What both modes report: rate, verdicts, latencies, RSS."""
    verdicts = cell.of("verdict")
    views_done = sum(v.n_views for v in verdicts)
    view_latency = [p.latency_ms for p in cell.of("progress")]
    return {
        "parts": n_parts,
        "views": views_done,
        "seconds": round(elapsed, 2),
        "views_per_second": round(views_done / elapsed, 2),
        "verdicts": {v: sum(1 for x in verdicts if x.verdict == v) for v in ("pass", "fail", "incomplete")},
        "errors": len(cell.of("error")),
        **histogram_means(service.metrics.scrape()),
        "view_latency_ms": percentiles(view_latency),  # frame received -> view processed (progress messages)
        "last_view_to_verdict_ms_client": percentiles(cell.verdict_after_last_view_ms()),
        "rss_mb_over_time": rss,
        "rss_mb_first_last_max": [rss[0][1], rss[-1][1], max(r for _, r in rss)] if rss else None,
        "max_rss_mb_getrusage": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inspector", choices=("test", "real"), default="test")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to publish (real mode: at least --parts parts)")
    ap.add_argument("--size", type=int, default=None, help="image width and height (test: 64, real: 256)")
    ap.add_argument("--views", type=int, default=12, help="test mode: views per part (real: the recipe's)")
    ap.add_argument("--parts", type=int, default=8, help="real mode: simulated parts to play")
    ap.add_argument("--seed", type=int, default=0, help="real mode: seed of the demo recipe and parts")
    ap.add_argument("--demo-out", type=Path, default=REPO / "out/demo", help="real mode: `agent demo --out` folder whose cached recipe is used")
    ap.add_argument("--ahead", type=int, default=None, help="parts published ahead of their verdicts (test: 3, real: 2)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/service.json or service_real.json)")
    args = ap.parse_args()
    real = args.inspector == "real"
    args.size = args.size or (256 if real else 64)
    args.ahead = args.ahead or (2 if real else 3)
    result = run_real_inspector(args) if real else run_test_inspector(args)
    out = args.out or REPO / ("bench/results/service_real.json" if real else "bench/results/service.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb_over_time"}, indent=2))


if __name__ == "__main__":
    main()
