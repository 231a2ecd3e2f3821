"""Test doubles and harness for the MQTT service tests (and bench/bench_service.py).

``RedPixelInspector`` is a deterministic stand-in for the inspection core, NOT an inspection: the view
score is the fraction of saturated-red pixels divided by ``red_fraction_at_threshold`` (so 1.0 is the
threshold); a part fails when a view scores above 1, with one defect at ``defect_point``. Frames
named ``boom*`` raise, to exercise the service's ``internal`` error path.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.capture import Frame
from agent.contract import FrameMessage, PartEnd, PartStart, RobotPose, parse_outbound
from agent.geometry import Intrinsics
from agent.fusion import DefectRegion
from agent.inspection import InspectionResult, ViewResult

SIZE = 32
K = Intrinsics(40.0, 40.0, SIZE / 2, SIZE / 2, SIZE, SIZE)


# ------------------------------------------------------------------------------------ the inspector


@dataclass
class RedPixelInspector:
    name: str = "redtest"
    version: str = "sha256:" + hashlib.sha256(b"red-pixel-inspector-v1").hexdigest()
    expected_views: int = 4
    min_views: int = 2
    intrinsics: Intrinsics = K
    red_fraction_at_threshold: float = 0.05
    delay_s: float = 0.0  # simulated work per view
    defect_point: tuple[float, float, float] = (0.01, -0.02, 0.05)
    device: str = "cpu"
    retain: bool = True  # keep parts and frames for the tests to look at (the benchmark turns it off)
    parts: dict[str, RedPixelPart] = field(default_factory=dict)

    def start_part(self, part_id: str) -> RedPixelPart:
        part = RedPixelPart(self, part_id)
        if self.retain:
            self.parts[part_id] = part
        return part


class RedPixelPart:
    def __init__(self, inspector: RedPixelInspector, part_id: str):
        self.inspector = inspector
        self.part_id = part_id
        self.frames: list[Frame] = []
        self.scores: dict[str, float] = {}
        self.finalised = 0
        self._busy = threading.Lock()

    def add_view(self, frame: Frame) -> ViewResult:
        if not self._busy.acquire(blocking=False):
            raise AssertionError("add_view called concurrently for one part")
        try:
            t0 = time.perf_counter()
            if frame.name.startswith("boom"):
                raise RuntimeError("test inspector exploded on purpose")
            if self.inspector.delay_s:
                time.sleep(self.inspector.delay_s)
            img = frame.image.astype(np.int16)
            red = float(np.mean((img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)))
            score = red / self.inspector.red_fraction_at_threshold
            if self.inspector.retain:
                self.frames.append(frame)
            self.scores[frame.name] = score
            return ViewResult(frame.name, score, (time.perf_counter() - t0) * 1000, None, {"score": 0.01})
        finally:
            self._busy.release()

    def finalise(self) -> InspectionResult:
        self.finalised += 1
        score = max(self.scores.values())
        bad = [f for f, s in self.scores.items() if s > 1.0]
        p = np.array(self.inspector.defect_point)
        defects = [DefectRegion(1, tuple(p), tuple(p - 0.005), tuple(p + 0.005), score, 7, tuple(bad))] if bad else []
        return InspectionResult("fail" if bad else "pass", score, 1.0, defects, len(self.scores), (0.001, 0.0, -0.002), 0.5, 1.0)


def factory_for(*inspectors: RedPixelInspector) -> Callable[[str], RedPixelInspector]:
    by_name = {i.name: i for i in inspectors}

    def factory(name: str) -> RedPixelInspector:
        return by_name[name]  # KeyError: unknown recipe

    return factory


def slow_factory(recipes_dir) -> Callable[[str], RedPixelInspector]:
    """For `agent run --inspector-factory test_service_doubles:slow_factory` (0.3 s per view)."""
    return factory_for(RedPixelInspector(delay_s=0.3))


def image(red: bool = False) -> np.ndarray:
    """A grey 32x32 view; ``red``: with a saturated red square over 1/4 of it (score 5)."""
    img = np.full((SIZE, SIZE, 3), 128, np.uint8)
    if red:
        img[:16, :16] = (255, 0, 0)
    return img


def c2w_at(x: float) -> np.ndarray:
    T = np.eye(4)
    T[:3, 3] = (x, 0.0, 0.5)
    return T


# ------------------------------------------------------------------------------------ MQTT harness


def unique_cell(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class Cell:
    """The test's side of a cell: publishes inbound messages, collects what the agent publishes."""

    def __init__(self, cell: str, host: str = "127.0.0.1", port: int = 1883, persistent: bool = False):
        self.cell = cell
        self.messages: list[tuple[str, object]] = []  # (kind, parsed message)
        self.raw: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tester-{cell}-{uuid.uuid4().hex[:6]}", clean_session=not persistent)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(f"inspect/{cell}/verdict", 1), (f"inspect/{cell}/error", 1), (f"inspect/{cell}/status", 1), (f"inspect/{cell}/part/+/progress", 0)])
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(10), "test client could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.raw.append((msg.topic, msg.payload, msg.retain))
            if msg.payload:
                self.messages.append((msg.topic.split("/")[-1], parse_outbound(msg.topic, msg.payload, cell=self.cell)))

    def publish(self, message, qos: int = 1) -> None:
        self.publish_raw(message.topic_for(self.cell), message.to_payload(), qos)

    def publish_raw(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(10)

    def of(self, kind: str) -> list:
        with self._lock:
            return [m for k, m in self.messages if k == kind]

    def wait_for(self, kind: str, predicate: Callable[[object], bool] = lambda m: True, timeout: float = 10.0, count: int = 1) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.of(kind) if predicate(m)]
            if len(found) >= count:
                return found
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {count} {kind} message(s) on cell {self.cell}; got {self.messages}")

    def errors(self, code: str | None = None) -> list:
        return [e for e in self.of("error") if code is None or e.code == code]

    # convenience
    def start(self, part_id: str, recipe: str = "redtest", expected_views: int | None = None) -> None:
        self.publish(PartStart(part_id, recipe, time.time(), expected_views))

    def frame(self, part_id: str, frame_id: str, ts: float, *, red: bool = False, c2w=None, camera: str = "cam0", intrinsics=K) -> None:
        self.publish(FrameMessage.from_arrays(part_id, frame_id, camera, ts, image(red), intrinsics=intrinsics, c2w=c2w))

    def pose(self, ts: float, c2w, camera: str = "cam0") -> None:
        self.publish(RobotPose(ts, camera, c2w))

    def end(self, part_id: str) -> None:
        self.publish(PartEnd(part_id, time.time()))

    def close(self) -> None:
        self.client.publish(f"inspect/{self.cell}/status", b"", qos=1, retain=True).wait_for_publish(5)  # clear the retained status
        self.client.loop_stop()
        self.client.disconnect()


class ServiceThread:
    """Runs an InspectionService on its own event loop in a thread."""

    def __init__(self, service):
        self.service = service
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            await self.service.run()

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def __enter__(self) -> ServiceThread:
        self.thread.start()
        if not self.service.ready.wait(15):
            raise AssertionError(f"service did not come online (error: {self.error!r})")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread.is_alive() and self.loop is not None:
            self.loop.call_soon_threadsafe(self.service.request_stop)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "service did not stop"
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc) -> None:
        self.stop()


def forget_sessions(client_ids: list[str], host: str = "127.0.0.1", port: int = 1883) -> None:
    """Remove persistent sessions from the broker (connect with clean_session=True)."""
    for cid in client_ids:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True)
        try:
            c.connect(host, port, 5)
            c.loop_start()
            time.sleep(0.05)
            c.disconnect()
            c.loop_stop()
        except OSError:
            pass


# ------------------------------------------------------------------------------------ tests of the double


def test_red_pixel_inspector_scores_red_and_fails_with_a_defect():
    insp = RedPixelInspector()
    part = insp.start_part("p1")
    grey = part.add_view(Frame("a", image(False), K, c2w_at(0)))
    red = part.add_view(Frame("b", image(True), K, c2w_at(1)))
    assert grey.view_score == 0.0
    assert red.view_score == pytest.approx(0.25 / 0.05)
    result = part.finalise()
    assert result.verdict == "fail" and result.score == pytest.approx(5.0)
    assert result.defects[0].frames == ("b",) and result.n_views == 2


def test_red_pixel_inspector_passes_grey_parts_and_explodes_on_boom():
    part = RedPixelInspector().start_part("p2")
    part.add_view(Frame("a", image(False), K, c2w_at(0)))
    with pytest.raises(RuntimeError, match="on purpose"):
        part.add_view(Frame("boom1", image(False), K, c2w_at(0)))
    result = part.finalise()
    assert result.verdict == "pass" and result.defects == [] and result.n_views == 1
    with pytest.raises(KeyError):
        factory_for(RedPixelInspector())("nope")
