"""The live preview and the part report in a real headless browser: Debian's Chromium (/usr/bin/chromium),
driven by Playwright's Python client through ``executable_path`` (no browser download, ever).

The agent runs for real: Mosquitto on 127.0.0.1:1883, the InspectionService with a test inspector whose views
carry an anomaly map, the preview observer and server. The checks look at pixels of screenshots of the video
element, not only at the DOM. Screenshots are kept in the test's tmp_path (printed on failure).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.preview.compose import BANNER_H, CANVAS_H, CANVAS_W, CAPTION_H, VERDICT_COLOURS
from agent.service import CellConfig, InspectionService, MqttConfig, ServiceConfig
from storage import ResultStore
from test_preview import HeatmapInspector
from test_service_doubles import Cell, ServiceThread, c2w_at, factory_for, forget_sessions, unique_cell

CHROMIUM = os.environ.get("AGENT_TEST_CHROMIUM", "/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.mqtt,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"),
]
playwright_sync = pytest.importorskip("playwright.sync_api", reason="the playwright client is not installed (pip install -e '.[dev]')")

# A closed network, headless, as root in a container: no sandbox, no Google services, nothing fetched at start,
# and plain-IP host candidates instead of mDNS names (the agent offers plain host candidates too).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-proxy-server",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,OptimizationHints,Translate",
]


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def preview_agent(tmp_path):
    """(cell tester, service, preview server, artifact writer) of a running agent with a live preview on a free
    port, writing artifact files (reports at /report/<cell>/<part_id> when agent.report is there)."""
    from agent.artifacts import ArtifactWriter
    from agent.preview import PreviewObserver
    from agent.preview.server import PreviewServer, report_renderer

    store = ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    cell_id = unique_cell("pv")
    config = ServiceConfig(
        cells=(CellConfig(cell_id),),
        mqtt=MqttConfig(client_id=f"agent-{cell_id}", reconnect_min_s=0.1, reconnect_max_s=1.0),
        metrics_port=None,
        recipes_dir=tmp_path,
    )
    observer = PreviewObserver([cell_id])
    artifacts = ArtifactWriter(tmp_path / "artifacts")
    server = PreviewServer(observer, host="127.0.0.1", port=0, fps=10.0, report=report_renderer(store, artifacts.root)).start()
    inspector = HeatmapInspector()
    service = InspectionService(config, factory_for(inspector), store, recipe_names=lambda: [inspector.name], observers=[observer, artifacts])
    cell = Cell(cell_id)
    runner = ServiceThread(service).__enter__()
    try:
        yield cell, service, server, artifacts
    finally:
        try:
            runner.stop()
        finally:
            server.stop()
            observer.close()
            artifacts.close()
            cell.close()
            forget_sessions([f"{config.mqtt.client_id}.{cell_id}"])
            store.close()


def inspect_part(cell: Cell, part_id: str, red_views: tuple[bool, ...]) -> None:
    cell.start(part_id, expected_views=len(red_views))
    t = time.time()
    for i, red in enumerate(red_views):
        cell.frame(part_id, f"{part_id}-v{i}", t + 0.1 * i, red=red, c2w=c2w_at(0.0))


def wait_playing(page, timeout_ms: int = 20_000) -> None:
    page.wait_for_function(
        "() => { const v = document.querySelector('video'); return v && !v.paused && v.readyState >= 2 && v.videoWidth === 640; }",
        timeout=timeout_ms,
    )


def video_pixels(page, path: Path) -> np.ndarray:
    """A screenshot of the video element's 640 x 480 CSS pixels (device scale 1: one per picture pixel), RGB."""
    box = page.locator("video").bounding_box()
    page.screenshot(path=str(path), clip={"x": round(box["x"]), "y": round(box["y"]), "width": CANVAS_W, "height": CANVAS_H})
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def colour_fraction(pixels: np.ndarray, colour, tol: int = 40) -> float:
    return float(np.mean(np.all(np.abs(pixels.astype(int) - np.asarray(colour)) <= tol, axis=-1)))


def screenshot_until(page, path: Path, check, timeout: float = 10.0) -> np.ndarray:
    """Screenshots of the video until ``check(pixels)`` holds (the stream lags the DOM by a frame or two)."""
    deadline = time.monotonic() + timeout
    while True:
        pixels = video_pixels(page, path)
        if check(pixels) or time.monotonic() > deadline:
            return pixels
        time.sleep(0.2)


def verdict_shown(pixels: np.ndarray) -> bool:
    return colour_fraction(pixels[CANVAS_H - BANNER_H + 4 :, :], VERDICT_COLOURS["fail"]) > 0.6


def test_live_preview_streams_heatmap_and_verdict_to_several_viewers(browser, preview_agent, tmp_path):
    cell, _, server, _ = preview_agent
    shots = tmp_path / "screenshots"
    shots.mkdir()
    console: list[str] = []
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    # the index lists the cell and links to its page
    page.goto(server.url + "/")
    page.wait_for_selector(f"a[href='/cell/{cell.cell}']", timeout=10_000)
    page.click(f"a[href='/cell/{cell.cell}']")
    wait_playing(page)
    waiting = video_pixels(page, shots / "0-waiting.png")
    assert waiting.shape == (CANVAS_H, CANVAS_W, 3)
    assert waiting[:CAPTION_H].std() > 5 and waiting[CAPTION_H:].std() > 2, "the placeholder picture is blank"

    inspect_part(cell, "p1", (False, False, True))  # the last view has the red square: hot in the map
    verdict = cell.wait_for("verdict", lambda v: v.part_id == "p1", timeout=15)[0]
    assert verdict.verdict == "fail"
    page.wait_for_function("() => document.getElementById('verdict').textContent === 'FAIL'", timeout=10_000)
    assert page.text_content("#part") == "p1" and page.text_content("#view") == "3/3"
    pixels = screenshot_until(page, shots / "1-verdict.png", verdict_shown)
    page.screenshot(path=str(shots / "1-page.png"))
    image_area = pixels[CAPTION_H : CANVAS_H - BANNER_H, (CANVAS_W - 368) // 2 : (CANVAS_W + 368) // 2]
    jet_blue = colour_fraction(image_area, (70, 70, 128), 30)  # grey part under the map's cold end
    jet_red = colour_fraction(image_area, (185, 0, 0), 45)  # the red square under the map's hot end
    assert verdict_shown(pixels), f"no FAIL banner in the video (see {shots / '1-verdict.png'}; console: {console})"
    assert jet_blue > 0.4 and jet_red > 0.1, f"heatmap colours missing: blue {jet_blue:.2f}, red {jet_red:.2f} ({shots / '1-verdict.png'})"
    assert colour_fraction(image_area, (255, 40, 255), 60) > 0.0005, "no defect box outline"

    # a second viewer at once, then it goes away: the first keeps playing, the agent keeps inspecting
    other = browser.new_page(viewport={"width": 1100, "height": 720})
    other.goto(f"{server.url}/cell/{cell.cell}")
    wait_playing(other)
    assert server.viewer_count == 2
    assert verdict_shown(screenshot_until(other, shots / "2-second-viewer.png", verdict_shown))
    other.close()
    deadline = time.monotonic() + 10
    while server.viewer_count != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.viewer_count == 1, "the closed viewer's peer connection was not cleaned up"

    inspect_part(cell, "p2", (False, False))
    assert cell.wait_for("verdict", lambda v: v.part_id == "p2", timeout=15)[0].verdict == "pass"
    page.wait_for_function("() => document.getElementById('verdict').textContent === 'PASS'", timeout=10_000)
    passed = screenshot_until(page, shots / "3-pass.png", lambda px: colour_fraction(px[CANVAS_H - BANNER_H + 4 :], VERDICT_COLOURS["pass"]) > 0.6)
    assert colour_fraction(passed[CANVAS_H - BANNER_H + 4 :], VERDICT_COLOURS["pass"]) > 0.6, f"no PASS banner ({shots / '3-pass.png'})"
    # the flat image area shows the composed picture: 2-7 levels off with key frames, depending on the bit rate
    # the encoder has left (text edges differ more, 4:2:0 chroma: left out). This bound catches a wrong or stale
    # picture, not the faint ghosts inter frames would leave (6-20 levels): those were checked by hand.
    error = np.abs(passed.astype(int) - server.observer.frame(cell.cell).latest()[1].astype(int)).max(axis=2)
    inner = error[CAPTION_H + 4 : CANVAS_H - BANNER_H - 4, (CANVAS_W - 368) // 2 + 4 : (CANVAS_W + 368) // 2 - 4]
    assert inner.max() <= 12, f"the video differs from the composed picture by {inner.max()} levels ({shots / '3-pass.png'})"
    page.close()
    if os.environ.get("AGENT_TEST_SCREENSHOTS"):  # keep them for a person to look at
        shutil.copytree(shots, Path(os.environ["AGENT_TEST_SCREENSHOTS"]), dirs_exist_ok=True)


IMAGES_JS = "() => Array.from(document.images).map(i => ({src: i.src.slice(0, 30), complete: i.complete, width: i.naturalWidth}))"


def test_part_report_opens_and_its_images_render(browser, preview_agent, tmp_path):
    report = pytest.importorskip("agent.report", reason="agent.report is not there yet")
    cell, service, server, artifacts = preview_agent
    inspect_part(cell, "r1", (False, True, False))
    assert cell.wait_for("verdict", lambda v: v.part_id == "r1", timeout=15)[0].verdict == "fail"
    assert artifacts.flush(10) and artifacts.failed == 0
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    # the live page links to the part's report, served by the preview
    page.goto(f"{server.url}/cell/{cell.cell}")
    page.wait_for_selector("#report a", timeout=10_000)
    href = page.get_attribute("#report a", "href")
    assert href == f"/report/{cell.cell}/r1"
    # the report as the preview serves it, and as a file written from the same function
    html_file = tmp_path / "r1.html"
    html_file.write_text(report.render_part_report(service.store, "r1", cell=cell.cell, artifacts_root=artifacts.root), encoding="utf-8")
    for name, url in (("served", server.url + href), ("file", html_file.as_uri())):
        response = page.goto(url, wait_until="load")
        assert response is not None and response.ok, f"{url}: {response and response.status}"
        images = page.evaluate(IMAGES_JS)
        page.screenshot(path=str(tmp_path / f"report-{name}.png"), full_page=True)
        assert len(images) >= 6, f"{name}: expected the 3 views and their 3 heatmaps, got {images}"
        broken = [i for i in images if not i["complete"] or i["width"] == 0]
        assert not broken, f"{name}: images that did not render: {broken} ({tmp_path / f'report-{name}.png'})"
        assert "r1" in page.title() + page.text_content("body")
    assert page.goto(f"{server.url}/report/{cell.cell}/nope").status == 404
    page.close()
    if os.environ.get("AGENT_TEST_SCREENSHOTS"):
        for png in tmp_path.glob("report-*.png"):
            shutil.copy(png, Path(os.environ["AGENT_TEST_SCREENSHOTS"]) / png.name)
