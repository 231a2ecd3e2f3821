"""The live simulated cell: the playing logic on a hand-made capture, then over the real Mosquitto broker."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import typer
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from agent import contract as c
from agent.capture import DEFECT_TYPES, Capture, Frame
from agent.geometry import Intrinsics, look_at
from agent.sim import SimConfig, inspection_poses
from agent.sim.cell import CellOptions, MqttPublisher, cell_command, parse_broker, play_part

BROKER = ("127.0.0.1", 1883)
SIZE = 64


def hand_made_capture(n_views: int, seed: int = 0) -> Capture:
    rng = np.random.default_rng(seed)
    K = Intrinsics(80.0, 80.0, SIZE / 2, SIZE / 2, SIZE, SIZE)
    frames = []
    for i in range(n_views):
        angle = 2 * math.pi * i / n_views
        c2w = look_at(np.array([0.4 * math.cos(angle), 0.4 * math.sin(angle), 0.3]), np.zeros(3))
        image = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        depth = rng.uniform(0.3, 0.6, size=(SIZE, SIZE)).astype(np.float32)
        frames.append(Frame(name=f"{i:03d}", image=image, intrinsics=K, c2w=c2w, depth=depth))
    return Capture(frames=frames)


class FakeClock:
    """Deterministic time: sleep advances the clock, publishing takes 1 ms."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


def test_play_part_sequence_and_timing():
    capture = hand_made_capture(3)
    fake = FakeClock()
    sent: list[tuple[str, bytes, int]] = []

    def publish(topic: str, payload: bytes, qos: int) -> None:
        sent.append((topic, payload, qos))
        fake.now += 0.001

    options = CellOptions(cell="cellA", speed=2.0)
    played = play_part(publish, capture, "p-1", "stool", options, np.random.default_rng(0), clock=fake.clock, sleep=fake.sleep)
    kinds = [c.parse_topic(t).kind for t, _, _ in sent]
    assert kinds == ["part_start"] + ["robot_pose", "frame"] * 3 + ["part_end"]
    assert {q for _, _, q in sent} == {1} and played.n_messages == len(sent) == 8
    msgs = [c.parse_inbound(t, p, cell="cellA") for t, p, _ in sent]
    assert msgs[0].expected_views == 3 and msgs[0].recipe == "stool"
    move_sleeps = fake.sleeps[0::2]
    assert len(move_sleeps) == 3 and all(0.3 / 2 <= s <= 0.8 / 2 for s in move_sleeps)  # scaled by speed
    for k, frame in enumerate(capture.frames):
        pose, fm = msgs[1 + 2 * k], msgs[2 + 2 * k]
        assert fm.c2w is None and fm.frame_id == frame.name and fm.camera_id == pose.camera_id == "cam0"
        assert 0.002 <= fm.ts - pose.ts <= 0.006
        np.testing.assert_array_equal(pose.c2w, frame.c2w)
        np.testing.assert_array_equal(fm.rgb, frame.image)
        assert fm.intrinsics == frame.intrinsics and fm.depth_m is None
    ts = [m.ts for m in msgs]
    assert ts == sorted(ts) and played.end_ts == msgs[-1].ts


def test_play_part_options_and_floor():
    capture = hand_made_capture(2)
    sent = []
    options = CellOptions(cell="cellA", camera_id="camX", encoding="jpeg", embed_pose=True, depth=True, depth_encoding="png16mm", send_intrinsics=False, qos=0, speed=1000.0)
    fake = FakeClock()
    play_part(lambda t, p, q: sent.append((t, p, q)), capture, "p-2", "bracket", options, np.random.default_rng(1), clock=fake.clock, sleep=fake.sleep)
    assert all(s >= 0.05 for s in fake.sleeps[0::2])  # moves never get shorter than the floor
    frames = [c.parse_inbound(t, p) for t, p, q in sent if t.endswith("/frame")]
    assert [t for t, _, _ in sent if t.endswith("/frame")] == ["inspect/cellA/camera/camX/frame"] * 2
    assert {q for _, _, q in sent} == {0}
    for fm, frame in zip(frames, capture.frames):
        assert fm.image.encoding == "jpeg" and fm.intrinsics is None and fm.depth.encoding == "png16mm"
        np.testing.assert_allclose(fm.c2w, frame.c2w, atol=1e-12)
        np.testing.assert_allclose(fm.depth_m, frame.depth, atol=0.0005 + 1e-6)


def test_play_part_refuses_unplayable_captures():
    capture = hand_made_capture(2)
    capture.frames[1].c2w = None
    with pytest.raises(ValueError, match="no camera pose"):
        play_part(lambda *a: None, capture, "p", "r", CellOptions(cell="c"), np.random.default_rng(0), sleep=lambda s: None)
    capture = hand_made_capture(2)
    capture.frames[0].depth = None
    with pytest.raises(ValueError, match="depth"):
        play_part(lambda *a: None, capture, "p", "r", CellOptions(cell="c", depth=True), np.random.default_rng(0), sleep=lambda s: None)
    with pytest.raises(ValueError):
        CellOptions(cell="bad/cell")
    with pytest.raises(ValueError):
        CellOptions(cell="c", speed=0)


def test_parse_broker():
    assert parse_broker("127.0.0.1:1883") == ("127.0.0.1", 1883)
    assert parse_broker("broker.local") == ("broker.local", 1883)
    for bad in ("host:port", ":1883", "host:0", "host:70000"):
        with pytest.raises(ValueError):
            parse_broker(bad)


# ---------------------------------------------------------------------------------- against Mosquitto


class Recorder:
    """Subscribes to a cell's topics and records (topic, payload) in arrival order."""

    def __init__(self, cell: str):
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-rec-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda cl, ud, fl, rc, pr: cl.subscribe(c.cell_filter(cell), qos=1)
        self.client.on_subscribe = lambda cl, ud, mid, rcs, pr: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(*BROKER)
        self.client.loop_start()
        assert subscribed.wait(10), "no SUBACK from the broker"

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def wait_for(self, n: int, timeout_s: float = 20.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    break
            time.sleep(0.01)
        time.sleep(0.1)  # catch anything beyond n
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def check_cell_traffic(received: list[tuple[str, bytes]], cell: str, views: dict[str, list[np.ndarray]], images: dict[str, list[np.ndarray]] | None = None) -> list:
    """Every message parses; per part start < frames < end; expected_views matches; each frame has its own pose within 20 ms.

    ``views``: per part the true camera pose of each view, in order; ``images``: optionally the images.
    """
    msgs = [c.parse_inbound(topic, payload, cell=cell) for topic, payload in received]
    poses = [m for m in msgs if isinstance(m, c.RobotPose)]
    assert {m.part_id for m in msgs if not isinstance(m, c.RobotPose)} == set(views)
    for part_id, c2ws in views.items():
        idx_start = [i for i, m in enumerate(msgs) if isinstance(m, c.PartStart) and m.part_id == part_id]
        idx_end = [i for i, m in enumerate(msgs) if isinstance(m, c.PartEnd) and m.part_id == part_id]
        idx_frames = [i for i, m in enumerate(msgs) if isinstance(m, c.FrameMessage) and m.part_id == part_id]
        assert len(idx_start) == 1 and len(idx_end) == 1, part_id
        assert idx_start[0] < min(idx_frames) and max(idx_frames) < idx_end[0]
        assert msgs[idx_start[0]].expected_views == len(idx_frames) == len(c2ws)
        assert msgs[idx_start[0]].ts <= msgs[idx_frames[0]].ts and msgs[idx_frames[-1]].ts <= msgs[idx_end[0]].ts
        for k, (i, c2w) in enumerate(zip(idx_frames, c2ws)):
            fm = msgs[i]
            assert fm.frame_id == f"{k:03d}" and fm.c2w is None
            if images is not None:
                np.testing.assert_array_equal(fm.rgb, images[part_id][k])
            pose = c.match_pose(poses, fm.camera_id, fm.ts, tolerance_s=0.020)
            assert pose is not None, f"frame {part_id}/{fm.frame_id} has no pose within 20 ms"
            np.testing.assert_allclose(pose.c2w, c2w, atol=1e-12)  # paired with the right view
    return msgs


@pytest.mark.mqtt
def test_cell_plays_two_parts_over_mosquitto():
    cell = f"test-{uuid.uuid4().hex[:12]}"
    captures = {"p-0001": hand_made_capture(4, seed=1), "p-0002": hand_made_capture(3, seed=2)}
    recorder = Recorder(cell)
    try:
        options = CellOptions(cell=cell, speed=20.0)
        rng = np.random.default_rng(0)
        with MqttPublisher(*BROKER) as publisher:
            for part_id, capture in captures.items():
                play_part(publisher.publish, capture, part_id, "stool", options, rng)
        expected = sum(2 + 2 * len(cap.frames) for cap in captures.values())
        received = recorder.wait_for(expected)
    finally:
        recorder.close()
    assert len(received) == expected
    views = {part_id: [f.c2w for f in cap.frames] for part_id, cap in captures.items()}
    images = {part_id: [f.image for f in cap.frames] for part_id, cap in captures.items()}
    check_cell_traffic(received, cell, views, images)


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("cell")(cell_command)
    app.command("other")(lambda: None)  # keeps "cell" a sub-command, as under `agent simulate`
    return app


@pytest.mark.mqtt
def test_cell_command_plays_simulated_parts(tmp_path):
    cell = f"test-{uuid.uuid4().hex[:12]}"
    truth = tmp_path / "truth.jsonl"
    recorder = Recorder(cell)
    try:
        args = ["cell", "--broker", "%s:%d" % BROKER, "--cell", cell, "--recipe", "stool", "--recipe", "mug", "--parts", "2",
                "--views", "4", "--size", "64", "--speed", "20", "--defect-rate", "1", "--seed", "3", "--part-prefix", "t-",
                "--truth", str(truth)]  # fmt: skip
        result = CliRunner().invoke(_cli(), args, terminal_width=200)
        assert result.exit_code == 0, result.output + repr(result.exception)
        received = recorder.wait_for(2 * (2 + 2 * 4))
    finally:
        recorder.close()
    assert "t-0001" in result.output and "t-0002" in result.output
    config = SimConfig(width=SIZE, height=SIZE, n_views=4)
    views = {"t-0001": inspection_poses("stool", config), "t-0002": inspection_poses("mug", config)}
    msgs = check_cell_traffic(received, cell, views)
    starts = [m for m in msgs if isinstance(m, c.PartStart)]
    assert [(m.part_id, m.recipe) for m in starts] == [("t-0001", "stool"), ("t-0002", "mug")]
    frame = next(m for m in msgs if isinstance(m, c.FrameMessage))
    assert frame.rgb.shape == (SIZE, SIZE, 3) and frame.intrinsics.width == SIZE
    records = [json.loads(line) for line in truth.read_text().splitlines()]
    assert [r["part_id"] for r in records] == ["t-0001", "t-0002"]
    assert all(r["label"] in DEFECT_TYPES and len(r["defects"]) == 1 for r in records)  # --defect-rate 1


def test_cell_command_rejects_bad_options():
    result = CliRunner().invoke(_cli(), ["cell", "--recipe", "teapot"])
    assert result.exit_code == 2 and "teapot" in result.output
    result = CliRunner().invoke(_cli(), ["cell", "--cell", "a/b"])
    assert result.exit_code == 2 and "cell" in result.output
    result = CliRunner().invoke(_cli(), ["cell", "--broker", "localhost:notaport"])
    assert result.exit_code == 2 and "HOST:PORT" in result.output


@pytest.mark.mqtt
def test_cell_command_reports_an_unreachable_broker():
    result = CliRunner().invoke(_cli(), ["cell", "--broker", "127.0.0.1:1", "--parts", "1", "--size", "32", "--views", "2"])
    assert result.exit_code == 1 and "cannot connect" in result.output


@pytest.mark.mqtt
def test_publisher_reports_an_unreachable_broker():
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):
        MqttPublisher("127.0.0.1", 1, timeout_s=2)
