"""Live preview without a browser: the composed picture, the one-slot mailbox and the observer (never blocks,
never raises, latest view wins), the [preview] configuration, and the WebRTC path with an aiortc client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.capture import Frame
from agent.contract import Timings, Verdict, VerdictDefect
from agent.inspection import ViewResult
from agent.preview import compose as compose_mod
from agent.preview import observer as observer_mod
from agent.preview.compose import (
    BANNER_H,
    CANVAS_H,
    CANVAS_W,
    CAPTION_H,
    IMAGE_H,
    VERDICT_COLOURS,
    DefectBox,
    VerdictBanner,
    ViewCaption,
    compose_view,
    project_defect_outlines,
)
from agent.preview.observer import LatestFrame, PreviewObserver
from agent.service.config import ConfigError, config_from_dict
from agent.service.service import VerdictEvent, ViewEvent
from test_service_doubles import K, Cell, RedPixelInspector, RedPixelPart, c2w_at, factory_for, forget_sessions, image, unique_cell

# ------------------------------------------------------------------------------------ doubles (also used by the browser test)


def red_heatmap(img: np.ndarray) -> np.ndarray:
    """A smooth map on the verdict scale: 2.5 over saturated red pixels, 0.1 elsewhere."""
    red = ((img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)).astype(np.float32)
    return (0.1 + 2.4 * cv2.GaussianBlur(red, (5, 5), 0)).astype(np.float32)


class HeatmapPart(RedPixelPart):
    def add_view(self, frame: Frame) -> ViewResult:
        result = super().add_view(frame)
        result.anomaly_map = red_heatmap(frame.image)
        return result


class HeatmapInspector(RedPixelInspector):
    """RedPixelInspector whose views also carry an anomaly map (red pixels are hot)."""

    def start_part(self, part_id: str) -> HeatmapPart:
        part = HeatmapPart(self, part_id)
        if self.retain:
            self.parts[part_id] = part
        return part


def heatmap_factory(recipes_dir):
    """For `agent run --inspector-factory test_preview:heatmap_factory` (tests/ on PYTHONPATH)."""
    return factory_for(HeatmapInspector())


def view_event(cell: str = "c1", part_id: str = "p1", frame_id: str = "f0", red: bool = True, k: int = 1, anomaly_map="auto", c2w=None) -> ViewEvent:
    img = image(red)
    score_map = red_heatmap(img) if isinstance(anomaly_map, str) else anomaly_map
    frame = Frame(frame_id, img, K, c2w_at(0.0) if c2w is None else c2w)
    return ViewEvent(cell, part_id, "redtest", frame, ViewResult(frame_id, 5.0 if red else 0.0, 1.0, score_map), k, 4)


def verdict_event(cell: str = "c1", part_id: str = "p1", verdict: str = "fail") -> VerdictEvent:
    p = np.array(RedPixelInspector().defect_point)
    defects = [VerdictDefect(1, tuple(p), tuple(p - 0.005), tuple(p + 0.005), 5.0, 7, ["f0"])] if verdict == "fail" else []
    v = Verdict(part_id, "redtest", RedPixelInspector().version, verdict, 5.0 if verdict == "fail" else 0.2, 1.0, defects, 3, None, Timings(10.0, 1.0, 1.0), time.time(), "test")
    return VerdictEvent(cell, v, None)


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def near(pixel, colour, tol: int = 12) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(colour, int)) <= tol))


# ------------------------------------------------------------------------------------ the picture


def test_compose_draws_heatmap_caption_and_verdict_banner():
    img = image(True)  # 32 x 32: red top-left quarter
    caption = ViewCaption("c1", "p1", "redtest", "f0", 2, 4, 5.0)
    inspecting = compose_view(img, red_heatmap(img), caption)
    assert inspecting.shape == (CANVAS_H, CANVAS_W, 3) and inspecting.dtype == np.uint8
    # the 32 x 32 image fills the image area's height, centred: 368 x 368 at x = 136
    x0, y0 = (CANVAS_W - IMAGE_H) // 2, CAPTION_H
    hot = inspecting[y0 + 60, x0 + 60]  # inside the red square: jet red blended over red
    cold = inspecting[y0 + 300, x0 + 300]  # grey with jet dark blue
    assert hot[0] > 180 and hot[1] < 40 and hot[2] < 40, hot
    assert cold[2] > cold[0] + 40 and cold[2] > cold[1] + 40, cold
    # the threshold outline is drawn in white around the square (at display resolution)
    assert (inspecting[y0 : y0 + 200, x0 + 150 : x0 + 200] > 200).all(axis=2).any()
    assert inspecting[:CAPTION_H].std() > 10  # the caption has text
    banner = compose_view(img, red_heatmap(img), caption, banner=VerdictBanner("fail", 5.0, 1.0, 1, 3))
    strip = banner[CANVAS_H - BANNER_H :]
    assert np.mean([near(p, VERDICT_COLOURS["fail"]) for p in strip.reshape(-1, 3)]) > 0.7
    assert np.array_equal(banner[: CANVAS_H - BANNER_H], inspecting[: CANVAS_H - BANNER_H])
    passed = compose_view(img, None, caption, banner=VerdictBanner("pass", 0.2, 1.0, 0, 3))
    assert near(passed[CANVAS_H - 4, 4], VERDICT_COLOURS["pass"], 0)
    with pytest.raises(ValueError, match="anomaly map must be H x W"):
        compose_view(img, np.zeros((4, 4, 3), np.float32), caption)
    with pytest.raises(ValueError, match="uint8 RGB"):
        compose_view(img.astype(np.float32), None, caption)


def test_defect_box_projects_where_the_camera_sees_it_and_is_drawn():
    # camera at z = 0.5 looking down -z (OpenGL), f = 40 px, principal point (16, 16)
    box = DefectBox(1, (0.005, -0.025, 0.045), (0.015, -0.015, 0.055))
    (outline,) = project_defect_outlines([box], c2w_at(0.0), K)
    centre = outline.mean(axis=0)
    # centroid (0.01, -0.02, 0.05) is 0.45 m in front: u = 16 + 40 * 0.01 / 0.45, v = 16 + 40 * 0.02 / 0.45 (image y down)
    assert centre == pytest.approx((16 + 40 * 0.01 / 0.45, 16 + 40 * 0.02 / 0.45), abs=0.8)
    behind = DefectBox(2, (0.0, 0.0, 0.6), (0.01, 0.01, 0.7))  # behind the camera
    assert project_defect_outlines([behind], c2w_at(0.0), K) == []
    img = image(False)
    drawn = compose_view(img, None, ViewCaption("c1", "p1", "r", "f", 1, None, 0.0), defect_outlines=[outline])
    plain = compose_view(img, None, ViewCaption("c1", "p1", "r", "f", 1, None, 0.0))
    changed = np.argwhere(np.any(drawn != plain, axis=2))
    scale = IMAGE_H / 32
    assert len(changed) and changed[:, 1].mean() == pytest.approx((CANVAS_W - IMAGE_H) / 2 + (centre[0] + 0.5) * scale, abs=8)
    assert near(drawn[tuple(changed[len(changed) // 2])], compose_mod.DEFECT_BOX, 60)


# ------------------------------------------------------------------------------------ mailbox and observer


def test_latest_frame_mailbox_keeps_only_the_newest():
    box = LatestFrame(np.zeros((2, 2, 3), np.uint8))
    assert box.latest()[0] == 0
    for i in range(1, 6):
        box.put(np.full((2, 2, 3), i, np.uint8))
    seq, img = box.latest()
    assert seq == 5 and img[0, 0, 0] == 5


@pytest.fixture
def observer():
    obs = PreviewObserver(["c1"])
    yield obs
    obs.close()


def test_observer_never_blocks_and_the_latest_view_wins(observer, monkeypatch):
    release = threading.Event()
    composed: list[str] = []

    def slow_compose(image, score_map, caption, **kw):  # a composer stuck for as long as the test wants
        release.wait(10)
        composed.append(caption.frame_id)
        return np.full((CANVAS_H, CANVAS_W, 3), len(composed), np.uint8)

    monkeypatch.setattr(observer_mod, "compose_view", slow_compose)
    observer.on_view(view_event(frame_id="first"))
    wait_until(lambda: not observer._pending)  # the composer took "first" and is stuck in it
    events = [view_event(frame_id=f"f{i}", k=i + 1) for i in range(200)]
    t0 = time.perf_counter()
    for e in events:
        observer.on_view(e)
    per_call_us = (time.perf_counter() - t0) / len(events) * 1e6
    assert per_call_us < 500, f"on_view took {per_call_us:.0f} us per call while the composer was stuck"
    assert observer.status("c1").frame_id == "f199" and observer.status("c1").view == 200  # the text feed is current at once
    release.set()
    wait_until(lambda: composed[-1:] == ["f199"])
    assert composed == ["first", "f199"]  # the 198 views in between were dropped, not queued
    assert observer.stats.views_superseded == 199 and observer.stats.views_seen == 201
    wait_until(lambda: observer.frame("c1").latest()[0] == 2)


def test_observer_survives_bad_events_and_draws_the_verdict(observer):
    observer.on_view(view_event(anomaly_map=np.zeros((3, 3, 3), np.float32)))  # not an H x W map: composing fails
    wait_until(lambda: observer.stats.compose_failures == 1)
    observer.on_view(view_event(frame_id="good"))
    wait_until(lambda: observer.stats.pictures_composed == 1)
    seq, picture = observer.frame("c1").latest()
    assert near(picture[CANVAS_H - 4, 4], compose_mod.CAPTION_BG, 0)  # "inspecting"
    observer.on_verdict(verdict_event(part_id="other"))  # another part's verdict: the picture stays
    wait_until(lambda: observer.stats.verdicts_seen == 1 and not observer._pending)
    time.sleep(0.05)
    assert observer.frame("c1").latest()[0] == seq
    status = observer.status("c1").to_dict()
    assert status["verdict"] is None and status["last_verdict"]["part_id"] == "other"
    observer.on_verdict(verdict_event(part_id="p1"))
    wait_until(lambda: observer.frame("c1").latest()[0] == seq + 1)
    picture = observer.frame("c1").latest()[1]
    assert near(picture[CANVAS_H - 4, 4], VERDICT_COLOURS["fail"], 0)
    assert (np.abs(picture.astype(int) - compose_mod.DEFECT_BOX).sum(axis=2) < 60).any()  # the defect's box
    status = observer.status("c1").to_dict()
    assert status["verdict"] == {"part_id": "p1", "verdict": "fail", "score": 5.0, "threshold": 1.0, "n_defects": 1, "n_views": 3}
    observer.on_view(view_event(part_id="p2", frame_id="g0", red=False))  # the next part: no banner
    wait_until(lambda: observer.frame("c1").latest()[0] == seq + 2)
    assert observer.status("c1").verdict is None and observer.status("c1").part_id == "p2"
    observer.on_view(view_event(cell="new-cell"))  # a cell that was not configured gets its own mailbox
    wait_until(lambda: observer.frame("new-cell") is not None and observer.frame("new-cell").latest()[0] == 1)
    assert observer.cells == ["c1", "new-cell"]


# ------------------------------------------------------------------------------------ configuration


def test_preview_config_is_off_by_default_and_on_with_its_table():
    base = {"cells": [{"id": "c1"}]}
    assert config_from_dict(base).preview_port is None
    on = config_from_dict({**base, "preview": {}})
    assert (on.preview_host, on.preview_port, on.preview_fps, on.preview_max_viewers) == ("0.0.0.0", 8090, 5.0, 8)
    custom = config_from_dict({**base, "preview": {"host": "127.0.0.1", "port": 0, "fps": 2, "max_viewers": 3}})
    assert (custom.preview_host, custom.preview_port, custom.preview_fps, custom.preview_max_viewers) == ("127.0.0.1", 0, 2.0, 3)
    assert config_from_dict({**base, "preview": {"enabled": False, "port": 9000}}).preview_port is None
    for bad, key in (({"port": 70000}, "preview.port"), ({"fps": 0}, "preview.fps"), ({"enabled": "yes"}, "preview.enabled"), ({"prot": 1}, "preview.prot")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({**base, "preview": bad})


# ------------------------------------------------------------------------------------ the server, with an aiortc viewer


@pytest.fixture
def server(observer):
    from agent.preview.server import PreviewServer

    srv = PreviewServer(observer, host="127.0.0.1", port=0, fps=10.0, max_viewers=2).start()
    yield srv
    srv.stop()


async def _watch(url: str, cell: str, frames: int) -> list[np.ndarray]:
    """Connect like the page does (recvonly video, non-trickle offer), take ``frames`` decoded frames, hang up."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    got: asyncio.Future = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: got.set_result(track))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/offer", json={"cell": cell, "sdp": pc.localDescription.sdp, "type": "offer"}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        track = await asyncio.wait_for(got, 10)
        images = [(await asyncio.wait_for(track.recv(), 10)).to_ndarray(format="rgb24") for _ in range(frames)]
        async with http.post(f"{url}/viewer/{answer['viewer']}/close") as r:
            assert (await r.json()) == {"closed": True}
    await pc.close()
    return images


def test_webrtc_viewer_receives_the_composed_picture(server, observer):
    observer.on_view(view_event())
    observer.on_verdict(verdict_event())
    wait_until(lambda: near(observer.frame("c1").latest()[1][CANVAS_H - 4, 4], VERDICT_COLOURS["fail"], 0))  # one picture or two
    expected = observer.frame("c1").latest()[1]
    images = asyncio.run(_watch(server.url, "c1", 2))
    assert images[-1].shape == expected.shape
    # VP8 at the default bit rate: close to the composed picture, banner and heatmap included
    assert np.abs(images[-1].astype(int) - expected.astype(int)).mean() < 8
    assert near(images[-1][CANVAS_H - 8, 8], VERDICT_COLOURS["fail"], 30)
    wait_until(lambda: server.viewer_count == 0)
    with urllib.request.urlopen(f"{server.url}/api/cell/c1", timeout=5) as r:
        status = json.loads(r.read())
    assert status["verdict"]["verdict"] == "fail" and status["viewers"] == 0 and status["report_url"] is None
    with urllib.request.urlopen(f"{server.url}/cell/c1/frame.png", timeout=5) as r:
        png = cv2.cvtColor(cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(png, expected)
    for path, body, code in (
        ("/cell/nope", None, 404),
        ("/offer", b"not json", 400),
        ("/offer", b'{"cell": "nope", "sdp": "x", "type": "offer"}', 404),
        ("/offer", b'{"cell": "c1", "sdp": "not sdp", "type": "offer"}', 400),
    ):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(server.url + path, data=body), timeout=10)
        assert e.value.code == code and e.value.read().startswith(b"error: ")
    assert server.viewer_count == 0  # the refused offer left nothing behind


async def _offers(url: str, cell: str, n: int) -> list[tuple[int, str]]:
    """Post ``n`` offers without completing the connections; (status, viewer id or error text) each."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection

    out, pcs = [], []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pcs.append(pc)
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(f"{url}/offer", json={"cell": cell, "sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                out.append((r.status, (await r.json())["viewer"] if r.status == 200 else await r.text()))
        for status, viewer in out:
            if status == 200:
                async with http.post(f"{url}/viewer/{viewer}/close") as r:
                    assert (await r.json()) == {"closed": True}
    for pc in pcs:
        await pc.close()
    return out


def test_viewers_beyond_max_viewers_are_refused(server):
    answers = asyncio.run(_offers(server.url, "c1", 3))
    assert [s for s, _ in answers] == [200, 200, 503]
    assert "max_viewers = 2" in answers[2][1]
    assert server.viewer_count == 0


def test_a_taken_port_is_an_error_at_start(server, observer):
    from agent.preview.server import PreviewServer

    with pytest.raises(OSError, match="address already in use"):
        PreviewServer(observer, host="127.0.0.1", port=server.port).start()


@pytest.mark.slow
@pytest.mark.mqtt
def test_agent_run_serves_the_preview_of_its_config_and_refuses_a_taken_port(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cell_id = unique_cell("pvcli")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "cell.toml"
    config.write_text(
        f'[mqtt]\nclient_id = "agent-{cell_id}"\n\n[[cells]]\nid = "{cell_id}"\n\n[database]\nurl = "sqlite:///{tmp_path / "r.db"}"\n\n'
        f'[metrics]\nenabled = false\n\n[preview]\nhost = "127.0.0.1"\nport = {port}\n'
    )
    env = {**os.environ, "PYTHONPATH": f"{repo / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "agent.service.cli", "run", "--config", str(config), "--inspector-factory", "test_preview:heatmap_factory"]
    cell = Cell(cell_id)
    proc = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        cell.wait_for("status", lambda s: s.state == "online", timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/cells", timeout=5) as r:
            assert [c["cell"] for c in json.loads(r.read())["cells"]] == [cell_id]
        taken = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 2 and f"error: [preview] cannot serve on 127.0.0.1:{port}" in taken.stderr, taken.stderr
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        cell.close()
        forget_sessions([f"agent-{cell_id}.{cell_id}"])
