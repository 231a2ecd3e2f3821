"""The MQTT service against the real Mosquitto on 127.0.0.1:1883 (unique cell ids per test)."""

from __future__ import annotations

import base64
import json
import time
import urllib.request


import numpy as np
import pytest

from agent.contract import FrameMessage, encode_image
from agent.service import CellConfig, InspectionService, MqttConfig, ServiceConfig
from storage import ResultStore
from test_service_doubles import K, Cell, RedPixelInspector, ServiceThread, c2w_at, factory_for, forget_sessions, image, unique_cell

pytestmark = pytest.mark.mqtt


@pytest.fixture
def run_agent(store, tmp_path):
    """run_agent(inspector=..., **config overrides) -> (ServiceThread, Cell, InspectionService)."""
    started: list = []

    def start(*, inspector: RedPixelInspector | None = None, cells=None, default_recipe=None, **overrides):
        inspector = inspector or RedPixelInspector()
        cell_ids = cells or [unique_cell()]
        config = ServiceConfig(
            cells=tuple(CellConfig(c, default_recipe) for c in cell_ids),
            mqtt=MqttConfig(client_id=f"agent-{cell_ids[0]}", reconnect_min_s=0.1, reconnect_max_s=1.0),
            metrics_port=0,
            metrics_host="127.0.0.1",
            recipes_dir=tmp_path,
            part_timeout_s=overrides.pop("part_timeout_s", 20.0),
            **overrides,
        )
        service = InspectionService(config, factory_for(inspector), store, recipe_names=lambda: [inspector.name])
        testers = [Cell(c) for c in cell_ids]
        runner = ServiceThread(service).__enter__()
        started.append((runner, testers, config))
        return runner, (testers if cells else testers[0]), service

    yield start
    for runner, testers, config in started:
        try:
            runner.stop()
        finally:
            for t in testers:
                t.close()
            forget_sessions([f"{config.mqtt.client_id}.{c.id}" for c in config.cells])


def test_full_part_from_frames_to_verdict_and_database_row(run_agent, store):
    runner, cell, service = run_agent()
    status = cell.wait_for("status", lambda s: s.state == "online")[0]
    assert status.recipes == ["redtest"]
    cell.start("p1")
    t = time.time()
    for i in range(3):
        cell.pose(t + i * 0.1, c2w_at(i))
        cell.frame("p1", f"f{i}", t + i * 0.1 + 0.004, red=(i == 1))
    cell.end("p1")
    verdict = cell.wait_for("verdict")[0]
    assert verdict.verdict == "fail" and verdict.part_id == "p1" and verdict.recipe == "redtest"
    assert verdict.n_views == 3 and verdict.score == pytest.approx(5.0) and verdict.threshold == 1.0
    assert verdict.defects[0].frames == ["f1"] and verdict.defects[0].centroid == pytest.approx((0.01, -0.02, 0.05))
    assert verdict.placement is not None and verdict.timings_ms.total > 0
    progress = cell.wait_for("progress", count=3)
    assert sorted(p.frame_id for p in progress) == ["f0", "f1", "f2"] and max(p.views_done for p in progress) == 3
    # stored before published: the row is there as soon as the verdict arrived
    record = store.get_part("p1", cell=cell.cell)
    assert record.state == "finalised" and record.verdict.verdict == "fail" and record.recipe_version == RedPixelInspector().version
    assert record.verdict.payload == json.loads(verdict.to_payload())
    assert [v.frame_id for v in record.views] == ["f0", "f1", "f2"]
    # each frame was paired with its own pose
    frames = service.inspector_factory("redtest").parts["p1"].frames
    assert [f.c2w[0, 3] for f in frames] == [0.0, 1.0, 2.0]
    scrape = service.metrics.scrape()
    assert f'agent_parts_total{{cell="{cell.cell}",verdict="fail"}} 1.0' in scrape
    assert f'agent_frames_received_total{{cell="{cell.cell}"}} 3.0' in scrape
    assert f'agent_mqtt_connected{{cell="{cell.cell}"}} 1.0' in scrape
    assert 'agent_recipe_info{recipe="redtest",version="sha256:' in scrape and 'agent_device_info{device="cpu"} 1.0' in scrape
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5) as r:
        assert "agent_view_latency_seconds_bucket" in r.read().decode()
    runner.stop()
    assert cell.wait_for("status", lambda s: s.state == "offline")
    assert len(cell.of("verdict")) == 1


def test_pairing_frame_before_pose_nearest_pose_and_outside_tolerance(run_agent, store):
    runner, cell, service = run_agent(pose_wait_s=0.3)
    cell.start("p1")
    t = time.time()
    cell.frame("p1", "early", t)  # its pose comes 100 ms later (wall clock), stamped 3 ms before it
    time.sleep(0.1)
    cell.pose(t - 0.003, c2w_at(1))
    cell.pose(t + 1.0, c2w_at(2))
    cell.pose(t + 1.015, c2w_at(3))
    cell.frame("p1", "nearest", t + 1.012)  # 12 ms after pose 2, 3 ms before pose 3
    cell.pose(t + 2.0, c2w_at(4))
    cell.frame("p1", "far", t + 2.05)  # 50 ms from the only pose: waits, then no_pose
    cell.frame("p1", "own", t + 2.5, c2w=c2w_at(7))  # carries its own c2w
    err = cell.wait_for("error")[0]
    assert err.code == "no_pose" and err.part_id == "p1" and "'far'" in err.message and "50.0 ms" in err.message
    assert err.topic == f"inspect/{cell.cell}/camera/cam0/frame"
    cell.end("p1")
    verdict = cell.wait_for("verdict")[0]
    assert verdict.n_views == 3 and verdict.verdict == "pass"
    frames = {f.name: f.c2w[0, 3] for f in service.inspector_factory("redtest").parts["p1"].frames}
    assert frames == {"early": 1.0, "nearest": 3.0, "own": 7.0}
    # a frame whose pose stream has already moved past it is rejected at once
    cell.start("p2")
    cell.pose(t + 3.0, c2w_at(5))
    cell.frame("p2", "stale", t + 2.9)
    assert cell.wait_for("error", lambda e: e.part_id == "p2", timeout=0.25)[0].code == "no_pose"
    assert [e.code for e in store.list_errors(cell=cell.cell)] == ["no_pose", "no_pose"]


def test_duplicates_and_redelivery_after_the_verdict_are_ignored(run_agent, store):
    runner, cell, service = run_agent()
    cell.start("p1")
    cell.start("p1")
    t = time.time()
    cell.frame("p1", "f0", t, c2w=c2w_at(0))
    cell.frame("p1", "f0", t, c2w=c2w_at(0))
    cell.frame("p1", "f1", t + 0.1, c2w=c2w_at(1))
    cell.end("p1")
    cell.end("p1")
    cell.wait_for("verdict")
    # redelivered after finalisation: frames, a new frame, the end, the start
    cell.frame("p1", "f0", t, c2w=c2w_at(0))
    cell.frame("p1", "f9", t + 0.2, c2w=c2w_at(2))
    cell.end("p1")
    cell.start("p1")
    time.sleep(0.5)
    assert len(cell.of("verdict")) == 1 and cell.of("verdict")[0].n_views == 2
    assert cell.errors() == []
    assert service.inspector_factory("redtest").parts["p1"].finalised == 1
    scrape = service.metrics.scrape()
    c = cell.cell
    assert f'agent_messages_ignored_total{{cell="{c}",kind="frame",reason="duplicate"}} 1.0' in scrape
    assert f'agent_messages_ignored_total{{cell="{c}",kind="frame",reason="part_finalised"}} 2.0' in scrape
    assert f'agent_messages_ignored_total{{cell="{c}",kind="part_end",reason="duplicate"}} 1.0' in scrape
    assert f'agent_messages_ignored_total{{cell="{c}",kind="part_end",reason="part_finalised"}} 1.0' in scrape
    assert f'agent_messages_ignored_total{{cell="{c}",kind="part_start",reason="duplicate"}} 2.0' in scrape
    assert len(store.list_parts(cell=c)) == 1


def test_a_restarted_agent_does_not_verdict_a_part_twice(run_agent, store):
    runner, cell, service = run_agent(default_recipe="redtest")
    cell.start("p1")
    cell.frame("p1", "f0", time.time(), c2w=c2w_at(0))
    cell.frame("p1", "f1", time.time(), c2w=c2w_at(0))
    cell.end("p1")
    cell.wait_for("verdict")
    runner.stop()
    runner2, _, _ = run_agent(cells=[cell.cell], default_recipe="redtest")
    cell.frame("p1", "f0", time.time(), c2w=c2w_at(0))  # redelivered frame of a part verdicted by the previous run
    cell.end("p1")
    time.sleep(0.5)
    assert len(cell.of("verdict")) == 1 and cell.errors() == []


def test_part_timeout_and_too_few_views(run_agent, store):
    runner, cell, service = run_agent(part_timeout_s=0.5)
    cell.start("p1")
    cell.start("p2")
    t = time.time()
    cell.frame("p1", "f0", t, c2w=c2w_at(0))
    cell.frame("p1", "f1", t, c2w=c2w_at(1))
    cell.frame("p2", "f0", t, c2w=c2w_at(0))  # the recipe needs 2 usable views
    t0 = time.monotonic()
    verdicts = {v.part_id: v for v in cell.wait_for("verdict", count=2, timeout=5)}
    assert 0.4 < time.monotonic() - t0 < 3.0
    assert verdicts["p1"].verdict == "pass" and verdicts["p1"].n_views == 2
    assert verdicts["p2"].verdict == "incomplete" and verdicts["p2"].score is None and verdicts["p2"].placement is None
    assert store.get_part("p2", cell=cell.cell).state == "incomplete"
    assert store.get_part("p2", cell=cell.cell).incomplete_reason == "1 usable views, the recipe needs 2 (timeout)"
    assert store.get_part("p1", cell=cell.cell).incomplete_reason is None


def test_expected_views_finalise_without_part_end(run_agent):
    runner, cell, service = run_agent()
    cell.start("p1", expected_views=2)
    t = time.time()
    cell.frame("p1", "f0", t, c2w=c2w_at(0))
    cell.frame("p1", "f1", t, c2w=c2w_at(1), red=True)
    verdict = cell.wait_for("verdict")[0]
    assert verdict.verdict == "fail" and verdict.n_views == 2
    cell.end("p1")  # the PLC's end after the fact is not an error
    time.sleep(0.3)
    assert cell.errors() == [] and len(cell.of("verdict")) == 1


def test_an_exception_in_the_inspection_is_an_internal_error_not_a_crash(run_agent, store):
    runner, cell, service = run_agent()
    cell.start("p1")
    t = time.time()
    for name in ("f0", "boom1", "f2"):
        cell.frame("p1", name, t, c2w=c2w_at(0))
    cell.end("p1")
    verdict = cell.wait_for("verdict")[0]
    assert verdict.verdict == "pass" and verdict.n_views == 2
    err = cell.errors("internal")[0]
    assert err.part_id == "p1" and "boom1" in err.message and "exploded on purpose" in err.message
    assert [e.code for e in store.list_errors(cell=cell.cell)] == ["internal"]
    assert f'agent_views_processed_total{{cell="{cell.cell}",outcome="failed"}} 1.0' in service.metrics.scrape()


def test_several_cells_and_parts_interleaved_with_backpressure(run_agent):
    cells = [unique_cell(), unique_cell()]
    runner, (a, b), service = run_agent(inspector=RedPixelInspector(delay_s=0.02), cells=cells, view_queue=2, workers=1)
    for cell in (a, b):
        cell.start("p1")
        cell.start("p2")
    t = time.time()
    for i in range(6):
        for cell in (a, b):
            cell.frame("p1", f"f{i}", t + i, c2w=c2w_at(i), red=(cell is b and i == 3))
            cell.frame("p2", f"f{i}", t + i, c2w=c2w_at(i))
    for cell in (a, b):
        cell.end("p2")
        cell.end("p1")
    va = {v.part_id: v for v in a.wait_for("verdict", count=2)}
    vb = {v.part_id: v for v in b.wait_for("verdict", count=2)}
    assert {k: (v.verdict, v.n_views) for k, v in va.items()} == {"p1": ("pass", 6), "p2": ("pass", 6)}
    assert {k: (v.verdict, v.n_views) for k, v in vb.items()} == {"p1": ("fail", 6), "p2": ("pass", 6)}


def _frame_payload(**overrides) -> dict:
    d = json.loads(FrameMessage.from_arrays("p1", "fx", "cam0", time.time(), image(), intrinsics=K, c2w=c2w_at(0)).to_payload())
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


def test_every_class_of_bad_input_gets_an_error_a_metric_and_a_record(run_agent, store, tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(encode_image(image()))
    runner, cell, service = run_agent(pose_wait_s=0.05, max_payload_bytes=20_000, allowed_image_dirs=(allowed,))
    c = cell.cell
    frame_topic, start_topic, end_topic, pose_topic = (f"inspect/{c}/{s}" for s in ("camera/cam0/frame", "part/start", "part/end", "robot/pose"))
    cell.start("p1")
    non_rigid = (np.diag([2.0, 1.0, 1.0, 1.0])).tolist()
    cases = [  # (name, topic, payload, code)
        ("not json", frame_topic, b"{not json", "bad_json"),
        ("json array", start_topic, b"[1, 2]", "bad_json"),
        ("not utf-8", pose_topic, b"\xff\xfe", "bad_json"),
        ("missing frame_id", frame_topic, json.dumps(_frame_payload(frame_id=None)).encode(), "missing_field"),
        ("mistyped expected_views", start_topic, json.dumps({"part_id": "p9", "recipe": "redtest", "ts": 1.0, "expected_views": "3"}).encode(), "bad_field"),
        ("bad id", end_topic, json.dumps({"part_id": "../etc", "ts": 1.0}).encode(), "bad_id"),
        ("bad base64", frame_topic, json.dumps(_frame_payload(frame_id="b64", image={"encoding": "png", "data_b64": "!!!"})).encode(), "bad_base64"),
        ("undecodable image", frame_topic, json.dumps(_frame_payload(frame_id="img", image={"encoding": "png", "data_b64": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 40).decode()})).encode(), "bad_image"),
        ("wrong size", frame_topic, json.dumps(_frame_payload(frame_id="size", intrinsics={"fx": 40, "fy": 40, "cx": 32, "cy": 32, "width": 64, "height": 64})).encode(), "bad_image_size"),
        ("wrong size for the recipe camera", frame_topic, json.dumps(_frame_payload(frame_id="size2", intrinsics=None, image={"encoding": "png", "data_b64": base64.b64encode(encode_image(np.zeros((48, 48, 3), np.uint8))).decode()})).encode(), "bad_image_size"),
        ("NaN pose", pose_topic, json.dumps({"ts": 1.0, "camera_id": "cam0", "c2w": [[float("nan")] * 4] * 4}).encode(), "bad_pose"),
        ("non-rigid frame pose", frame_topic, json.dumps(_frame_payload(frame_id="rigid", c2w=non_rigid)).encode(), "bad_pose"),
        ("no matching pose", frame_topic, json.dumps(_frame_payload(frame_id="nopose", c2w=None)).encode(), "no_pose"),
        ("unknown recipe", start_topic, json.dumps({"part_id": "p8", "recipe": "nope", "ts": 1.0}).encode(), "unknown_recipe"),
        ("unknown part (frame)", frame_topic, json.dumps(_frame_payload(part_id="ghost", frame_id="g")).encode(), "unknown_part"),
        ("unknown part (end)", end_topic, json.dumps({"part_id": "ghost", "ts": 1.0}).encode(), "unknown_part"),
        ("oversized payload", frame_topic, json.dumps(_frame_payload(frame_id="big", pad="x" * 25_000)).encode(), "payload_too_large"),
        ("image_uri outside the allowed dirs", frame_topic, json.dumps(_frame_payload(frame_id="uri", image=None, image_uri="file:///etc/passwd")).encode(), "uri_not_allowed"),
        ("image_uri escaping with ..", frame_topic, json.dumps(_frame_payload(frame_id="uri2", image=None, image_uri=f"file://{allowed}/../results.db")).encode(), "uri_not_allowed"),
        ("bad intrinsics", frame_topic, json.dumps(_frame_payload(frame_id="k", intrinsics={"fx": -1, "fy": 40, "cx": 16, "cy": 16, "width": 32, "height": 32})).encode(), "bad_intrinsics"),
        ("bad depth", frame_topic, json.dumps(_frame_payload(frame_id="d", depth={"encoding": "npy", "data_b64": base64.b64encode(b"nonsense").decode()})).encode(), "bad_depth"),
    ]
    for name, topic, payload, code in cases:
        cell.publish_raw(topic, payload)
    errors = cell.wait_for("error", count=len(cases))
    # no_pose comes after its wait, the others in order
    assert sorted((e.code, e.topic) for e in errors) == sorted((code, topic) for _, topic, _, code in cases), [(e.code, e.message) for e in errors]
    missing = next(e for e in errors if e.code == "missing_field")
    assert missing.part_id == "p1" and "frame_id" in missing.message
    assert next(e for e in errors if e.code == "bad_json").part_id is None
    assert "expected_views" in next(e for e in errors if e.code == "bad_field").message
    assert next(e for e in errors if e.code == "no_pose").part_id == "p1"
    # good traffic still works, including an allowed image_uri, and p1 is unaffected
    cell.publish_raw(frame_topic, json.dumps(_frame_payload(frame_id="f0")).encode())
    cell.publish_raw(frame_topic, json.dumps(_frame_payload(frame_id="f1", image=None, image_uri=f"file://{allowed}/ok.png")).encode())
    cell.end("p1")
    verdict = cell.wait_for("verdict")[0]
    assert verdict.part_id == "p1" and verdict.verdict == "pass" and verdict.n_views == 2
    stored = sorted(e.code for e in store.list_errors(cell=c, limit=None))
    assert stored == sorted(code for *_, code in cases)
    assert any(e.payload_excerpt and e.payload_excerpt.startswith("{not json") for e in store.list_errors(cell=c, limit=None))
    scrape = service.metrics.scrape()
    for code in {code for *_, code in cases}:
        n = sum(1 for *_, cc in cases if cc == code)
        assert f'agent_errors_total{{cell="{c}",code="{code}"}} {float(n)}' in scrape, code
    n_frames = sum(1 for _, topic, _, code in cases if topic == frame_topic)
    rejected = sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines() if line.startswith("agent_frames_rejected_total{") and f'cell="{c}"' in line)
    assert rejected == n_frames
