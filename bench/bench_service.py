"""Sustained throughput of the MQTT service: views per second, RSS over time, verdict latency.

Uses the TEST inspector (tests/test_service_doubles.py: red-pixel fraction, no real inspection), so this
measures the service shell only: MQTT in, decoding, pairing by timestamp, queues, worker thread, SQLite
writes, MQTT out. The broker is the local Mosquitto (127.0.0.1:1883); the publisher runs in this process
and keeps at most ``--ahead`` parts unanswered (RSS is this whole process: agent, publisher and the
test client, which keeps every message it receives);
it waits for each PUBACK, so on a shared 2-core machine it is part of what limits the rate. Writes bench/results/service.json.

    .venv/bin/python bench/bench_service.py --seconds 30 --size 64
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


from agent.contract import FrameMessage, PartStart, RobotPose  # noqa: E402
from agent.geometry import Intrinsics  # noqa: E402
from agent.service import CellConfig, InspectionService, MqttConfig, ServiceConfig  # noqa: E402
from storage import ResultStore  # noqa: E402
from test_service_doubles import Cell, RedPixelInspector, ServiceThread, c2w_at, factory_for, forget_sessions  # noqa: E402
from agent.machine import machine_details  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--size", type=int, default=64, help="image width and height")
    ap.add_argument("--views", type=int, default=12, help="views per part")
    ap.add_argument("--ahead", type=int, default=3, help="parts published ahead of their verdicts")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/service.json")
    args = ap.parse_args()

    cell_id = f"bench{uuid.uuid4().hex[:8]}"
    size = args.size
    K = Intrinsics(size * 1.2, size * 1.2, size / 2, size / 2, size, size)
    inspector = RedPixelInspector(intrinsics=K, retain=False)
    tmp = tempfile.TemporaryDirectory()
    store = ResultStore(f"sqlite:///{tmp.name}/results.db")
    config = ServiceConfig(cells=(CellConfig(cell_id),), mqtt=MqttConfig(client_id=f"agent-{cell_id}"), metrics_port=None, workers=args.workers)
    service = InspectionService(config, factory_for(inspector), store, recipe_names=lambda: ["redtest"])
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    cell = Cell(cell_id)
    rss: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample_rss() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            rss.append((round(time.monotonic() - t0, 2), round(rss_mb(), 1)))
            time.sleep(1.0)

    with ServiceThread(service):
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        t_start = time.monotonic()
        n_parts = 0
        ts = time.time()
        while time.monotonic() - t_start < args.seconds:
            while n_parts - len(cell.of("verdict")) >= args.ahead:
                time.sleep(0.002)
            part_id = f"p{n_parts}"
            cell.publish(PartStart(part_id, "redtest", time.time(), args.views))
            for v in range(args.views):
                ts += 0.1
                cell.publish(RobotPose(ts, "cam0", c2w_at(v)))
                frame = FrameMessage.from_arrays(part_id, f"f{v}", "cam0", ts + 0.003, img, intrinsics=K)
                cell.publish(frame)
            n_parts += 1
        cell.wait_for("verdict", count=n_parts, timeout=120)
        elapsed = time.monotonic() - t_start
        stop.set()
        sampler.join()
    views_done = sum(v.n_views for v in cell.of("verdict"))
    scrape = service.metrics.scrape()
    cell.close()
    forget_sessions([f"agent-{cell_id}.{cell_id}"])
    store.close()
    hist = {}
    for line in scrape.splitlines():
        if line.startswith("agent_verdict_latency_seconds_sum") or line.startswith("agent_verdict_latency_seconds_count"):
            hist[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
        if line.startswith("agent_view_latency_seconds_sum") or line.startswith("agent_view_latency_seconds_count"):
            hist[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    result = {
        "benchmark": "service throughput with the TEST inspector (red-pixel fraction; no real inspection)",
        "machine": {**machine_details(), "note": "2-core machine shared with other jobs while measured"},
        "image_size": [size, size],
        "encoding": "png",
        "payload_bytes_per_frame": len(FrameMessage.from_arrays("p", "f", "cam0", 0.0, img, intrinsics=K).to_payload()),
        "views_per_part": args.views,
        "workers": args.workers,
        "parts": n_parts,
        "views": views_done,
        "seconds": round(elapsed, 2),
        "views_per_second": round(views_done / elapsed, 1),
        "verdicts": {v: sum(1 for x in cell.of("verdict") if x.verdict == v) for v in ("pass", "fail", "incomplete")},
        "errors": len(cell.of("error")),
        "mean_view_latency_ms": round(1000 * hist["agent_view_latency_seconds_sum"] / hist["agent_view_latency_seconds_count"], 2),
        "mean_last_view_to_verdict_ms": round(1000 * hist["agent_verdict_latency_seconds_sum"] / max(1, hist["agent_verdict_latency_seconds_count"]), 2),
        "rss_mb_over_time": rss,
        "rss_mb_first_last_max": [rss[0][1], rss[-1][1], max(r for _, r in rss)] if rss else None,
        "max_rss_mb_getrusage": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb_over_time"}, indent=2))


if __name__ == "__main__":
    main()
