"""The live preview's web server: aiohttp pages and one aiortc peer connection per viewer.

Runs on its own thread with its own asyncio loop, not on the service's loop: a viewer's ICE and DTLS
handshakes, RTP packetisation and SRTP are Python work on the loop that serves them, and VP8 encoding is
CPU work (on the preview loop's own one-thread executor here, so all viewers together take at most one
encoder thread). On the service's loop they would delay MQTT reads, pairing and publishing; on their own
loop they only share the CPU and the GIL with it (measured: no change in per-view latency with 3 viewers).
Pictures cross from the service through :class:`agent.preview.observer.LatestFrame` mailboxes: each viewer's
track takes the newest picture at most ``fps`` times a second and skips the rest, so a slow or stalled
viewer only ever drops pictures. A new picture goes out as a key frame; the current one is repeated every
``keepalive_s`` (an all-skip inter frame of a few bytes, or a key frame every few seconds), so an idle cell
costs almost nothing.

A viewer's peer connection is closed when its page goes away (the page's beacon to /viewer/<id>/close, or the
browser's DTLS close), or when ICE consent checks fail (a browser that vanished: about 30 s).

Routes: ``GET /`` (cells), ``GET /cell/<cell>`` (the viewer page), ``POST /offer`` (SDP offer -> answer,
``{"cell", "sdp", "type"}``), ``POST /viewer/<id>/close``, ``GET /api/cells``, ``GET /api/cell/<cell>``,
``GET /cell/<cell>/events`` (server-sent events: the cell's status JSON on every change),
``GET /cell/<cell>/frame.png`` (the current picture), and ``GET /report/<cell>/<part_id>`` when a report
renderer is given. No STUN/TURN servers: host candidates only (closed network). aioice never offers the
loopback address, so the browser must reach the agent over a real interface (LAN, or the host's own IP).
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import cv2
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame
from av.video.frame import PictureType

from agent.contract import ContractError, check_id
from agent.preview.observer import LatestFrame, PreviewObserver

log = logging.getLogger("agent.preview")

VIDEO_CLOCK = fractions.Fraction(1, 90_000)  # RTP video clock
MAX_OFFER_BYTES = 64 * 1024
KEY_FRAME_REFRESH_S = 4.0  # an unchanged picture is sent as a key frame again after this long

# (cell, part_id) -> report HTML; blocking (database, files): called on the preview's executor
ReportRenderer = Callable[[str, str], str]


class CellVideoTrack(MediaStreamTrack):
    """A video track of one cell's latest picture: at most ``fps`` frames a second; each new picture as a key
    frame, and the current one again every ``keepalive_s`` (an all-skip inter frame: a few bytes; a key frame
    once ``KEY_FRAME_REFRESH_S`` passed since the last one)."""

    kind = "video"

    def __init__(self, mailbox: LatestFrame, fps: float, keepalive_s: float):
        super().__init__()
        self._mailbox = mailbox
        self._period = 1.0 / fps
        self._keepalive_s = keepalive_s
        self._start: float | None = None
        self._last_sent = 0.0
        self._sent_seq: int | None = None
        self._last_key = 0.0
        self.frames_sent = 0

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
            seq, image = self._mailbox.latest()
        else:
            next_at = self._last_sent + self._period
            while True:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.readyState != "live":
                    raise MediaStreamError
                seq, image = self._mailbox.latest()
                now = time.monotonic()
                if seq != self._sent_seq or now - self._last_sent >= self._keepalive_s:
                    break
                next_at = now + self._period
        frame = VideoFrame.from_ndarray(image, format="rgb24")
        now = time.monotonic()
        if seq != self._sent_seq or now - self._last_key >= KEY_FRAME_REFRESH_S:
            # A new picture is a key frame. As an inter frame over the previous picture, VP8 at real-time settings
            # leaves its ghost in flat areas (measured: up to 20 grey levels, still there seconds later): repeats of
            # an unchanged source are skipped blocks that never refine it. For the same reason a picture is sent
            # as a key frame again now and then: a new viewer's first one is coarse (the bit rate starts low).
            frame.pict_type = PictureType.I
            self._last_key = now
        self._last_sent = time.monotonic()
        self._sent_seq = seq
        self.frames_sent += 1
        frame.pts = int((self._last_sent - self._start) / VIDEO_CLOCK)
        frame.time_base = VIDEO_CLOCK
        return frame


@dataclass
class Viewer:
    id: str
    cell: str
    pc: RTCPeerConnection
    track: CellVideoTrack
    remote: str | None
    since: float


def _page(name: str) -> str:
    return resources.files("agent.preview").joinpath("static").joinpath(name).read_text(encoding="utf-8")


class PreviewServer:
    """``start()`` serves the preview on its own thread until ``stop()``; ``port`` 0 picks a free port."""

    def __init__(
        self,
        observer: PreviewObserver,
        *,
        host: str = "0.0.0.0",
        port: int = 8090,
        fps: float = 5.0,
        keepalive_s: float = 1.0,
        max_viewers: int = 8,
        report: ReportRenderer | None = None,
    ):
        if fps <= 0 or keepalive_s <= 0 or max_viewers < 1:
            raise ValueError(f"fps and keepalive_s must be > 0 and max_viewers >= 1, got {fps}, {keepalive_s}, {max_viewers}")
        self.observer = observer
        self.host = host
        self.port = port
        self.fps = fps
        self.keepalive_s = keepalive_s
        self.max_viewers = max_viewers
        self.report = report
        self.viewers: dict[str, Viewer] = {}  # preview loop only; len() is safe to read from anywhere
        self._pages = {"index": _page("index.html"), "cell": _page("cell.html")}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._io: ThreadPoolExecutor | None = None  # PNG snapshots and reports: not on the encoder's thread

    # ---------------------------------------------------------------------------- lifecycle (any thread)

    def start(self, timeout: float = 15.0) -> PreviewServer:
        """Bind and serve; raises OSError when the address cannot be bound."""
        self._thread = threading.Thread(target=self._main, name="preview-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the preview server did not start")
        if self._error is not None:
            raise self._error
        return self

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def viewer_count(self) -> int:
        return len(self.viewers)

    def stop(self, timeout: float = 10.0) -> None:
        """Close every viewer's connection and the server, then end the thread."""
        if self._loop is not None and self._stopping is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> PreviewServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())  # at the end it cancels what aiortc left running (e.g. unfinished ICE)
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        # VP8 encoding (aiortc runs it in the loop's default executor) on one thread: all viewers together
        # never take more than one core.
        loop.set_default_executor(ThreadPoolExecutor(1, thread_name_prefix="preview-encode"))
        self._io = ThreadPoolExecutor(1, thread_name_prefix="preview-io")
        self._loop = loop
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = runner.addresses[0][1]
            log.info("preview: serving on %s", self.url)
            self._ready.set()
            await self._stopping.wait()
        finally:
            await asyncio.gather(*(self._close_viewer(v.id) for v in list(self.viewers.values())), return_exceptions=True)
            await runner.cleanup()
            self._io.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------- the app (preview loop)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_OFFER_BYTES)
        app.add_routes([
            web.get("/", self._index),
            web.get("/cell/{cell}", self._cell_page),
            web.get("/cell/{cell}/events", self._events),
            web.get("/cell/{cell}/frame.png", self._frame_png),
            web.get("/api/cells", self._api_cells),
            web.get("/api/cell/{cell}", self._api_cell),
            web.post("/offer", self._offer),
            web.post("/viewer/{viewer}/close", self._viewer_close),
        ])  # fmt: skip
        if self.report is not None:
            app.add_routes([web.get("/report/{cell}/{part_id}", self._report)])
        return app

    def _known_cell(self, request: web.Request) -> str:
        cell = request.match_info["cell"]
        if self.observer.frame(cell) is None:
            raise web.HTTPNotFound(text=f"error: unknown cell {cell!r} (cells: {', '.join(self.observer.cells)})\n")
        return cell

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text=self._pages["index"], content_type="text/html")

    async def _cell_page(self, request: web.Request) -> web.Response:
        self._known_cell(request)
        return web.Response(text=self._pages["cell"], content_type="text/html")

    def _cell_json(self, cell: str) -> dict:
        status = self.observer.status(cell).to_dict()
        status["viewers"] = sum(1 for v in self.viewers.values() if v.cell == cell)
        shown = status["verdict"] and status["part_id"]
        status["report_url"] = f"/report/{cell}/{status['part_id']}" if self.report is not None and shown else None
        return status

    async def _api_cells(self, request: web.Request) -> web.Response:
        return web.json_response({"cells": [self._cell_json(c) for c in self.observer.cells], "max_viewers": self.max_viewers})

    async def _api_cell(self, request: web.Request) -> web.Response:
        return web.json_response(self._cell_json(self._known_cell(request)))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the cell's status whenever it changes (checked 5 times a second), a comment every 15 s."""
        cell = self._known_cell(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        sent_seq, sent_viewers, last_write = None, None, 0.0
        try:
            while not self._stopping.is_set():
                status = self._cell_json(cell)
                now = time.monotonic()
                if status["seq"] != sent_seq or status["viewers"] != sent_viewers:
                    await response.write(f"data: {json.dumps(status)}\n\n".encode())
                    sent_seq, sent_viewers, last_write = status["seq"], status["viewers"], now
                elif now - last_write > 15.0:
                    await response.write(b": keep-alive\n\n")
                    last_write = now
                await asyncio.sleep(0.2)
        except ConnectionResetError:  # the viewer left
            pass
        return response

    async def _frame_png(self, request: web.Request) -> web.Response:
        cell = self._known_cell(request)
        _, image = self.observer.frame(cell).latest()
        ok, png = await asyncio.get_running_loop().run_in_executor(self._io, cv2.imencode, ".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise web.HTTPInternalServerError(text="error: the picture could not be encoded as PNG\n")
        return web.Response(body=png.tobytes(), content_type="image/png", headers={"Cache-Control": "no-store"})

    async def _offer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="error: the body must be JSON {\"cell\", \"sdp\", \"type\": \"offer\"}\n") from None
        if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str) or not isinstance(body.get("cell"), str):
            raise web.HTTPBadRequest(text="error: the body must be JSON {\"cell\", \"sdp\", \"type\": \"offer\"}\n")
        cell = body["cell"]
        mailbox = self.observer.frame(cell)
        if mailbox is None:
            raise web.HTTPNotFound(text=f"error: unknown cell {cell!r}\n")
        if len(self.viewers) >= self.max_viewers:
            raise web.HTTPServiceUnavailable(text=f"error: {len(self.viewers)} viewers already watch (max_viewers = {self.max_viewers})\n")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        viewer = Viewer(uuid.uuid4().hex, cell, pc, CellVideoTrack(mailbox, self.fps, self.keepalive_s), request.remote, time.time())
        self.viewers[viewer.id] = viewer

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            log.info("preview: viewer %s of %s from %s: %s", viewer.id[:8], cell, viewer.remote, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self._close_viewer(viewer.id)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
            video = [t for t in pc.getTransceivers() if t.kind == "video"]
            if not video:
                raise ValueError("the offer has no video media section (addTransceiver('video', {direction: 'recvonly'}))")
            sender = pc.addTrack(viewer.track)
            transceiver = next(t for t in pc.getTransceivers() if t.sender is sender)
            transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/VP8"])
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:
            await self._close_viewer(viewer.id)
            raise web.HTTPBadRequest(text=f"error: cannot answer the offer: {e}\n") from None
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "viewer": viewer.id})

    async def _viewer_close(self, request: web.Request) -> web.Response:
        closed = await self._close_viewer(request.match_info["viewer"])
        return web.json_response({"closed": closed})

    async def _close_viewer(self, viewer_id: str) -> bool:
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        viewer.track.stop()
        await viewer.pc.close()
        return True

    async def _report(self, request: web.Request) -> web.Response:
        cell = self._known_cell(request)
        part_id = request.match_info["part_id"]
        try:
            check_id(part_id, "part_id")
        except ContractError as e:
            raise web.HTTPBadRequest(text=f"error: {e.message}\n") from None
        try:
            html = await asyncio.get_running_loop().run_in_executor(self._io, self.report, cell, part_id)
        except LookupError as e:
            raise web.HTTPNotFound(text=f"error: {e}\n") from None
        return web.Response(text=html, content_type="text/html")


@dataclass
class LivePreview:
    """The observer and the server of ``agent run``'s ``[preview]``: ``LivePreview.start(config, store)``, ``stop()``."""

    observer: PreviewObserver
    server: PreviewServer

    @classmethod
    def start(cls, config, store=None) -> LivePreview:
        """Serve the preview of ``config`` (a :class:`agent.service.config.ServiceConfig` with ``preview_port`` set).

        Part reports are served at /report/<cell>/<part_id> from ``store`` when the report module is there.
        Raises OSError when the address cannot be bound.
        """
        if config.preview_port is None:
            raise ValueError("the configuration has no [preview]")
        observer = PreviewObserver([c.id for c in config.cells])
        report = None if store is None else report_renderer(store, config.artifacts_dir)
        server = PreviewServer(
            observer, host=config.preview_host, port=config.preview_port, fps=config.preview_fps, max_viewers=config.preview_max_viewers, report=report
        )
        try:
            server.start()
        except BaseException:
            observer.close()
            raise
        return cls(observer, server)

    def stop(self) -> None:
        self.server.stop()
        self.observer.close()


def report_renderer(store, artifacts_root) -> ReportRenderer | None:
    """(cell, part_id) -> the part's report HTML, from ``agent.report.render_part_report``; None without it."""
    try:
        from agent.report import render_part_report
    except ImportError:
        return None

    def render(cell: str, part_id: str) -> str:
        return render_part_report(store, part_id, cell=cell, artifacts_root=artifacts_root)

    return render
