"""The MQTT edge-agent service: frames in, verdicts out (../shared/spec/mqtt-contract.md).

Shape of the service (one asyncio loop):

- One MQTT connection per cell (each needs its own last will on ``inspect/<cell>/status``), persistent
  session (``clean_session=False``), QoS 1 subscriptions, ``online`` retained on connect, reconnect with
  exponential backoff. Inbound messages are acknowledged (manual PUBACK) only once they are in the cell's
  bounded inbound queue: when the service falls behind the broker holds the backlog, not our memory.
- One dispatcher per cell handles its messages in arrival order: parsing (frame decoding in a thread),
  part start/end, pose history and frame/pose pairing (:mod:`agent.service.pairing`), duplicates.
- One task per part feeds its paired views to ``PartInspection.add_view`` in a worker thread pool
  (``workers`` threads), one view at a time; at most ``view_queue`` views are queued over all parts
  (the dispatchers wait for room: backpressure). A part is finalised on ``part/end``, when
  ``expected_views`` (from ``part/start``) views were processed, after ``part_timeout_s`` without a
  frame, or at shutdown (``incomplete``). Fewer usable views than the recipe's ``min_views`` give
  ``incomplete``. The verdict is committed to the store, then published; one part gets one verdict
  (finalised part ids are remembered, and the store is asked after a restart).
- Rejected messages get an ``error`` message, a metric and a stored record; an exception while
  processing never stops the service (code ``internal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
import numpy as np

from agent import __version__
from agent.capture import Frame
from agent.contract import (
    ContractError,
    FrameMessage,
    PartEnd,
    PartStart,
    Placement,
    Progress,
    RobotPose,
    Status,
    Timings,
    Verdict,
    VerdictDefect,
    error_for,
    inbound_subscriptions,
    parse_inbound,
    parse_topic,
    status_topic,
)
from agent.geometry import Intrinsics
from agent.inspection import InspectionResult, Inspector, PartInspection, ViewResult
from agent.service.config import ServiceConfig
from agent.service.metrics import ServiceMetrics
from agent.service.pairing import PosePairing
from agent.service.store import ResultStore

log = logging.getLogger("agent.service")

InspectorFactory = Callable[[str], Inspector]


@dataclass(frozen=True)
class ViewEvent:
    """One view of a part was inspected (what an observer sees; the frame's image is the observed RGB)."""

    cell: str
    part_id: str
    recipe: str
    frame: Frame
    result: ViewResult  # anomaly_map: H x W float32 on the verdict scale (threshold 1.0), when the inspector gives one
    views_ok: int  # views of this part inspected so far, this one included
    expected_views: int | None


@dataclass(frozen=True)
class VerdictEvent:
    """A part's verdict was committed to the store (it is published right after the observers were told)."""

    cell: str
    verdict: Verdict
    result: InspectionResult | None  # None when the stored verdict was republished (redelivery)


class ServiceObserver(Protocol):
    """Watches the service from the side (live preview, artifact files). Called on the service's event loop
    thread: an observer must return at once (hand heavy work to its own thread) and its exceptions are
    logged and swallowed, so an observer can never slow or stop the inspection."""

    def on_view(self, event: ViewEvent) -> None: ...

    def on_verdict(self, event: VerdictEvent) -> None: ...


TICK_S = 0.05  # housekeeping period: pose waits, part timeouts, queue gauges
_FINISH = object()  # end-of-part marker in a part's view queue


@dataclass
class _Inbound:
    cell: str
    topic: str
    payload: bytes
    received: float  # time.monotonic()


@dataclass
class _View:
    frame: FrameMessage  # decoded
    c2w: np.ndarray
    intrinsics: Intrinsics
    received: float  # time.monotonic() when the frame arrived
    topic: str


@dataclass
class _Part:
    """One part being inspected."""

    cell: str
    part_id: str
    inspector: Inspector
    inspection: PartInspection
    expected_views: int | None
    started: float  # monotonic
    last_frame: float  # monotonic: part timeout counts from here
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    frame_ids: set[str] = field(default_factory=set)
    waiting_pose: int = 0
    views_done: int = 0
    views_ok: int = 0
    view_ms: list[float] = field(default_factory=list)
    end_reason: str | None = None  # part_end | expected_views | timeout | shutdown
    finalising: bool = False
    closed: bool = False  # the finish marker is queued: no more views
    task: asyncio.Task | None = None


class _Outbox:
    """Messages of one cell waiting to be published on its connection (kept across reconnects)."""

    def __init__(self, maxsize: int):
        self.queue: asyncio.Queue[tuple[str, bytes, int, bool, Callable[[], None] | None]] = asyncio.Queue(maxsize)


class InspectionService:
    """The edge agent for the configured cells. ``await run()``; ``request_stop()`` (or SIGTERM) ends it cleanly."""

    def __init__(
        self,
        config: ServiceConfig,
        inspector_factory: InspectorFactory,
        store: ResultStore,
        *,
        recipe_names: Callable[[], list[str]] | None = None,
        metrics: ServiceMetrics | None = None,
        agent_version: str = __version__,
        observers: list[ServiceObserver] | None = None,
    ):
        self.config = config
        self.inspector_factory = inspector_factory
        self.store = store
        self.recipe_names = recipe_names or (lambda: list_recipes(config.recipes_dir))
        self.metrics = metrics or ServiceMetrics()
        self.agent_version = agent_version
        self.observers: list[ServiceObserver] = list(observers or [])
        self.cells = {c.id: c for c in config.cells}
        self.metrics_server = None
        self.metrics_port: int | None = None
        self.ready = threading.Event()  # set once every cell is connected and has published `online`
        self._stop = asyncio.Event()
        self._stop_requested = False

    # ------------------------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Begin a clean shutdown (call it on the service's loop, e.g. through ``loop.call_soon_threadsafe``)."""
        self._stop_requested = True
        self._stop.set()

    async def run(self) -> None:
        """Connect every cell and serve until :meth:`request_stop`, then shut down cleanly."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            self._stop.set()
        self._accepting = True
        self._disconnect = asyncio.Event()
        self._workers = ThreadPoolExecutor(cfg.workers, thread_name_prefix="inspect")
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="store")
        self._view_slots = asyncio.Semaphore(cfg.view_queue)
        self._views_queued = 0
        self._inbound = {c: asyncio.Queue(cfg.inbound_queue) for c in self.cells}
        self._outbox = {c: _Outbox(cfg.outbound_queue) for c in self.cells}
        self._clients: dict[str, aiomqtt.Client | None] = {c: None for c in self.cells}
        self._connected = {c: asyncio.Event() for c in self.cells}
        self._online = {c: asyncio.Event() for c in self.cells}
        self._pairing = {c: PosePairing(cfg.pose_tolerance_s, cfg.pose_wait_s, cfg.pose_history) for c in self.cells}
        self._parts: dict[tuple[str, str], _Part] = {}
        self._finalised: dict[str, OrderedDict[str, None]] = {c: OrderedDict() for c in self.cells}
        self._inspectors: dict[str, Inspector] = {}
        self._inspector_locks: dict[str, asyncio.Lock] = {}
        self.metrics.workers.set(cfg.workers)
        if cfg.metrics_port is not None:
            self.metrics_server = self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
            self.metrics_port = self.metrics_server.server_port
        tasks = []
        for cell in self.cells:
            tasks.append(asyncio.create_task(self._connection_loop(cell), name=f"mqtt-{cell}"))
            tasks.append(asyncio.create_task(self._dispatch_loop(cell), name=f"dispatch-{cell}"))
            tasks.append(asyncio.create_task(self._publish_loop(cell), name=f"publish-{cell}"))
        housekeeping = asyncio.create_task(self._housekeeping_loop(), name="housekeeping")
        online = asyncio.create_task(self._signal_started())
        try:
            await self._stop.wait()
            await self._shutdown()
        finally:
            for t in (*tasks, housekeeping, online):
                t.cancel()
            await asyncio.gather(*tasks, housekeeping, online, return_exceptions=True)
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._decoder.shutdown(wait=False, cancel_futures=True)
            self._store_pool.shutdown(wait=True)
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
                self.metrics_server.server_close()
            for cell in self.cells:
                self.metrics.mqtt_connected.labels(cell).set(0)

    async def _signal_started(self) -> None:
        await asyncio.gather(*(e.wait() for e in self._online.values()))
        self.ready.set()

    async def _shutdown(self) -> None:
        """Stop taking frames, finish or record as incomplete the parts in flight, publish offline, disconnect."""
        cfg = self.config
        deadline = time.monotonic() + cfg.shutdown_grace_s
        log.info("shutting down: %d parts in flight", len(self._parts))
        self._accepting = False  # readers stop; unread messages stay unacknowledged at the broker
        # messages already acknowledged are dispatched (they would be lost otherwise)
        while any(q.qsize() for q in self._inbound.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        for cell, pairing in self._pairing.items():
            for part, view in pairing.drop_waiting():
                part.waiting_pose -= 1
                err = ContractError("no_pose", f"frame {view.frame.frame_id!r}: the agent shut down while it waited for its robot pose")
                await self._reject(cell, view.topic, b"", err, part_id=part.part_id, kind="frame")
        for part in list(self._parts.values()):
            if part.end_reason is None:
                part.end_reason = "shutdown"
            self._maybe_finish(part)
        pending = [p.task for p in self._parts.values() if p.task is not None]
        if pending:
            _, not_done = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            for part in [p for p in self._parts.values() if p.task in not_done]:
                if part.finalising:  # its verdict may be being committed: let it finish
                    await asyncio.wait({part.task}, timeout=5.0)
                    continue
                part.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await part.task
                await self._finish_part(part, forced=InspectionResult("incomplete", None, 1.0, [], part.views_ok, None, None, 0.0), reason="shutdown: views still being processed when the grace period ended")
        # publish what is queued (verdicts first of all), then offline status, then disconnect
        drain_deadline = time.monotonic() + max(2.0, deadline - time.monotonic())
        while any(o.queue.qsize() for o in self._outbox.values()) and time.monotonic() < drain_deadline:
            await asyncio.sleep(0.01)
        self._disconnect.set()
        conns = [t for t in asyncio.all_tasks() if t.get_name().startswith("mqtt-")]
        if conns:
            await asyncio.wait(conns, timeout=5.0)

    # ------------------------------------------------------------------------------------ MQTT

    async def _connection_loop(self, cell: str) -> None:
        cfg = self.config.mqtt
        delay = cfg.reconnect_min_s
        first = True
        while not self._disconnect.is_set():
            if not first:
                self.metrics.mqtt_reconnects.labels(cell).inc()
            first = False
            offline = Status("offline", self.agent_version, [], time.time())
            client = aiomqtt.Client(
                cfg.host,
                cfg.port,
                identifier=f"{cfg.client_id}.{cell}",
                username=cfg.username,
                password=cfg.password,
                clean_session=False,
                keepalive=cfg.keepalive_s,
                will=aiomqtt.Will(status_topic(cell), offline.to_payload(), qos=1, retain=True),
                timeout=10,
            )
            # PUBACK only once a message is in our bounded queue (aiomqtt has no public switch for this).
            client._client.manual_ack_set(True)  # noqa: SLF001
            try:
                async with client:
                    await client.subscribe(inbound_subscriptions(cell))
                    recipes = await self._loop.run_in_executor(None, self._safe_recipe_names)
                    status = Status("online", self.agent_version, recipes, time.time())
                    await client.publish(status_topic(cell), status.to_payload(), qos=1, retain=True)
                    self._clients[cell] = client
                    self._connected[cell].set()
                    self._online[cell].set()
                    self.metrics.mqtt_connected.labels(cell).set(1)
                    delay = cfg.reconnect_min_s
                    log.info("cell %s: connected to %s:%d", cell, cfg.host, cfg.port)
                    reader = asyncio.create_task(self._read_loop(cell, client))
                    stop = asyncio.create_task(self._disconnect.wait())
                    try:
                        done, _ = await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for t in (reader, stop):
                            t.cancel()
                        await asyncio.gather(reader, stop, return_exceptions=True)
                    self._connected[cell].clear()
                    self._clients[cell] = None
                    if stop in done:
                        status = Status("offline", self.agent_version, recipes, time.time())
                        with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                            await client.publish(status_topic(cell), status.to_payload(), qos=1, retain=True, timeout=5)
                        return  # clean disconnect: the broker does not send the will
                    reader.result()
            except aiomqtt.MqttError as e:
                log.warning("cell %s: MQTT connection lost or refused: %s", cell, e)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cell %s: unexpected error in the MQTT connection", cell)
            finally:
                self._connected[cell].clear()
                self._clients[cell] = None
                self.metrics.mqtt_connected.labels(cell).set(0)
            if self._disconnect.is_set():
                return
            wait = delay * random.uniform(0.8, 1.2)
            delay = min(delay * 2, cfg.reconnect_max_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._disconnect.wait(), timeout=wait)

    def _safe_recipe_names(self) -> list[str]:
        try:
            return sorted(self.recipe_names())
        except Exception:
            log.exception("cannot list the recipes")
            return []

    async def _read_loop(self, cell: str, client: aiomqtt.Client) -> None:
        queue = self._inbound[cell]
        async for message in client.messages:
            if not self._accepting:  # shutting down: left unacknowledged, the broker delivers it again to the next session
                await self._disconnect.wait()
                return
            payload = message.payload if isinstance(message.payload, bytes) else bytes(str(message.payload), "utf-8")
            await queue.put(_Inbound(cell, message.topic.value, payload, time.monotonic()))
            if message.qos > 0:
                client._client.ack(message.mid, message.qos)  # noqa: SLF001

    async def _publish(self, cell: str, message: Any, on_sent: Callable[[], None] | None = None) -> None:
        """Queue an outbound contract message for the cell's connection. QoS 0 messages are dropped when the queue is full."""
        item = (message.topic_for(cell), message.to_payload(), message.qos, message.retain, on_sent)
        outbox = self._outbox[cell].queue
        if message.qos == 0:
            with contextlib.suppress(asyncio.QueueFull):
                outbox.put_nowait(item)
            return
        await outbox.put(item)

    async def _publish_loop(self, cell: str) -> None:
        queue = self._outbox[cell].queue
        while True:
            topic, payload, qos, retain, on_sent = await queue.get()
            while True:
                if qos == 0 and not self._connected[cell].is_set():
                    break  # at most once: not kept for a later connection
                await self._connected[cell].wait()
                client = self._clients[cell]
                if client is None:
                    continue
                try:
                    await client.publish(topic, payload, qos=qos, retain=retain, timeout=10)
                except (aiomqtt.MqttError, asyncio.TimeoutError) as e:
                    if qos == 0:
                        break
                    log.warning("cell %s: publish to %s failed (%s); retrying on the next connection", cell, topic, e)
                    await asyncio.sleep(0.2)
                    continue
                if on_sent is not None:
                    on_sent()
                break

    # ------------------------------------------------------------------------------------ dispatch

    async def _dispatch_loop(self, cell: str) -> None:
        queue = self._inbound[cell]
        while True:
            item = await queue.get()
            try:
                await self._dispatch(item)
            except ContractError as e:
                await self._reject(cell, item.topic, item.payload, e)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("cell %s: failed to handle a message on %s", cell, item.topic)
                await self._reject(cell, item.topic, item.payload, ContractError("internal", f"failed to handle the message: {type(e).__name__}: {e}"))

    async def _dispatch(self, item: _Inbound) -> None:
        cfg = self.config
        cell = item.cell
        info = parse_topic(item.topic)
        if info.kind == "frame":
            self.metrics.frames_received.labels(cell).inc()
            parse = lambda: parse_inbound(  # noqa: E731
                item.topic, item.payload, cell=cell, max_payload_bytes=cfg.max_payload_bytes, allowed_uri_dirs=cfg.allowed_image_dirs
            )
            try:
                frame = await self._loop.run_in_executor(self._decoder, parse)
            except ContractError as e:
                await self._reject(cell, item.topic, item.payload, e, kind="frame")
                return
            await self._on_frame(cell, frame, item)
            return
        message = parse_inbound(item.topic, item.payload, cell=cell, max_payload_bytes=cfg.max_payload_bytes)
        if isinstance(message, PartStart):
            await self._on_part_start(cell, message)
        elif isinstance(message, PartEnd):
            await self._on_part_end(cell, message)
        elif isinstance(message, RobotPose):
            for (part, view), pose in self._pairing[cell].add_pose(message):
                part.waiting_pose -= 1
                view.c2w = pose.c2w
                await self._enqueue_view(part, view)

    def _ignore(self, cell: str, kind: str, reason: str) -> None:
        self.metrics.messages_ignored.labels(cell, kind, reason).inc()

    def _is_finalised(self, cell: str, part_id: str) -> bool:
        return part_id in self._finalised[cell]

    async def _on_part_start(self, cell: str, msg: PartStart) -> None:
        if self._is_finalised(cell, msg.part_id) or (cell, msg.part_id) in self._parts:
            self._ignore(cell, "part_start", "duplicate")
            return
        await self._start_part(cell, msg.part_id, msg.recipe, msg.expected_views, msg.meta, msg.ts)

    async def _on_part_end(self, cell: str, msg: PartEnd) -> None:
        part = self._parts.get((cell, msg.part_id))
        if part is None:
            if self._is_finalised(cell, msg.part_id):
                self._ignore(cell, "part_end", "part_finalised")
                return
            raise ContractError("unknown_part", f"part/end for part {msg.part_id!r}, which was not started")
        if part.end_reason is not None:
            self._ignore(cell, "part_end", "duplicate")
            return
        part.end_reason = "part_end"
        self._maybe_finish(part)

    async def _on_frame(self, cell: str, frame: FrameMessage, item: _Inbound) -> None:
        part = self._parts.get((cell, frame.part_id))
        if part is None:
            if self._is_finalised(cell, frame.part_id):
                self._ignore(cell, "frame", "part_finalised")
                return
            recipe = self.cells[cell].default_recipe
            if recipe is None:
                raise ContractError("unknown_part", f"frame {frame.frame_id!r} is for part {frame.part_id!r}, which was not started, and cell {cell!r} has no default recipe")
            part = await self._start_part(cell, frame.part_id, recipe, None, {}, frame.ts)
            if part is None:  # already has a verdict (redelivered after a restart)
                self._ignore(cell, "frame", "part_finalised")
                return
        if part.closed:
            self._ignore(cell, "frame", "part_finalised")
            return
        if frame.frame_id in part.frame_ids:
            self._ignore(cell, "frame", "duplicate")
            return
        K = frame.intrinsics or part.inspector.intrinsics
        height, width = frame.rgb.shape[:2]
        if frame.intrinsics is None and (K.width, K.height) != (width, height):
            raise ContractError("bad_image_size", f"frame {frame.frame_id!r} carries no intrinsics; the recipe's camera is {K.width}x{K.height} but the image is {width}x{height}")
        part.frame_ids.add(frame.frame_id)
        part.last_frame = time.monotonic()
        view = _View(frame, frame.c2w, K, item.received, item.topic)
        if frame.c2w is not None:
            await self._enqueue_view(part, view)
            return
        pairing = self._pairing[cell]
        pose = pairing.match(frame.camera_id, frame.ts)
        if pose is not None:
            view.c2w = pose.c2w
            await self._enqueue_view(part, view)
        elif pairing.can_still_arrive(frame.camera_id, frame.ts) and self._accepting:
            pairing.wait(frame.camera_id, frame.ts, time.monotonic(), (part, view))
            part.waiting_pose += 1
        else:
            raise ContractError("no_pose", self._no_pose_message(cell, frame))

    def _no_pose_message(self, cell: str, frame: FrameMessage) -> str:
        poses = list(self._pairing[cell].poses(frame.camera_id))
        if not poses:
            return f"frame {frame.frame_id!r} of camera {frame.camera_id!r} has no c2w and no robot pose of that camera arrived"
        nearest = min(abs(p.ts - frame.ts) for p in poses)
        return (
            f"frame {frame.frame_id!r} of camera {frame.camera_id!r} has no c2w and the nearest robot pose is "
            f"{nearest * 1000:.1f} ms away (tolerance {self.config.pose_tolerance_s * 1000:.1f} ms)"
        )

    async def _inspector(self, recipe: str) -> Inspector:
        inspector = self._inspectors.get(recipe)
        if inspector is not None:
            return inspector
        lock = self._inspector_locks.setdefault(recipe, asyncio.Lock())
        async with lock:
            if recipe not in self._inspectors:
                try:
                    inspector = await self._loop.run_in_executor(self._workers, self.inspector_factory, recipe)
                except LookupError:
                    raise ContractError("unknown_recipe", f"recipe {recipe!r} is not enrolled on this agent") from None
                self._inspectors[recipe] = inspector
                self.metrics.recipe_info.labels(inspector.name, inspector.version).set(1)
                self.metrics.device_info.labels(inspector_device(inspector)).set(1)
                log.info("recipe %s loaded (%s)", inspector.name, inspector.version)
        return self._inspectors[recipe]

    async def _start_part(self, cell: str, part_id: str, recipe: str, expected_views: int | None, meta: dict, ts: float) -> _Part | None:
        inspector = await self._inspector(recipe)
        if await self._store_call(self._has_verdict, cell=cell, part_id=part_id, default=False):
            self._remember_finalised(cell, part_id)
            self._ignore(cell, "part_start", "part_finalised")
            return None
        inspection = await self._loop.run_in_executor(self._workers, inspector.start_part, part_id)
        now = time.monotonic()
        part = _Part(cell, part_id, inspector, inspection, expected_views, now, now)
        self._parts[(cell, part_id)] = part
        self.metrics.parts_active.labels(cell).set(sum(1 for c, _ in self._parts if c == cell))
        await self._store_call(
            self.store.start_part, cell=cell, part_id=part_id, recipe=recipe, recipe_version=inspector.version, ts=ts, expected_views=expected_views, meta=meta
        )
        part.task = asyncio.create_task(self._part_loop(part), name=f"part-{cell}-{part_id}")
        return part

    async def _enqueue_view(self, part: _Part, view: _View) -> None:
        await self._view_slots.acquire()  # backpressure: the dispatcher waits for room
        self._views_queued += 1
        part.queue.put_nowait(view)

    def _maybe_finish(self, part: _Part) -> None:
        """Queue the finish marker once the part is ending and no frame of it waits for a pose."""
        if part.end_reason is not None and part.waiting_pose == 0 and not part.closed:
            part.closed = True
            part.queue.put_nowait(_FINISH)

    # ------------------------------------------------------------------------------------ per part

    async def _part_loop(self, part: _Part) -> None:
        try:
            while True:
                view = await part.queue.get()
                if view is _FINISH:
                    break
                try:
                    await self._process_view(part, view)
                finally:
                    self._views_queued -= 1
                    self._view_slots.release()
            await self._finish_part(part)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave a part without a verdict
            log.exception("part %s/%s failed", part.cell, part.part_id)
            await self._reject(part.cell, f"inspect/{part.cell}/part/end", b"", ContractError("internal", f"part {part.part_id!r} failed: {type(e).__name__}: {e}"), part_id=part.part_id)
            if (part.cell, part.part_id) in self._parts:
                await self._finish_part(part, forced=InspectionResult("incomplete", None, 1.0, [], part.views_ok, None, None, 0.0), reason=f"internal error: {e}")

    async def _process_view(self, part: _Part, view: _View) -> None:
        f = view.frame
        frame = Frame(name=f.frame_id, image=f.rgb, intrinsics=view.intrinsics, c2w=view.c2w, depth=f.depth_m)
        t0 = time.monotonic()
        try:
            result = await self._loop.run_in_executor(self._workers, part.inspection.add_view, frame)
        except ContractError as e:
            await self._reject(part.cell, view.topic, b"", e, part_id=part.part_id, kind="frame")
            self.metrics.views_processed.labels(part.cell, "failed").inc()
        except Exception as e:
            log.exception("add_view failed for %s/%s frame %s", part.cell, part.part_id, f.frame_id)
            err = ContractError("internal", f"inspection of frame {f.frame_id!r} failed: {type(e).__name__}: {e}")
            await self._reject(part.cell, view.topic, b"", err, part_id=part.part_id, kind="frame")
            self.metrics.views_processed.labels(part.cell, "failed").inc()
        else:
            done = time.monotonic()
            part.views_ok += 1
            part.view_ms.append((done - t0) * 1000)
            latency_ms = (done - view.received) * 1000
            self.metrics.views_processed.labels(part.cell, "ok").inc()
            self.metrics.view_latency.labels(part.cell).observe(latency_ms / 1000)
            stored = ViewResult(f.frame_id, float(result.view_score), latency_ms, None, dict(result.timings_ms))
            map_path = None  # where an artifact-writing observer puts the view's anomaly map (deterministic, so known now)
            if result.anomaly_map is not None:
                with contextlib.suppress(Exception):  # an observer never stops the inspection
                    map_path = next((o.anomaly_map_path(part.cell, part.part_id, f.frame_id) for o in self.observers if hasattr(o, "anomaly_map_path")), None)
            await self._store_call(self.store.record_view, cell=part.cell, part_id=part.part_id, view=stored, camera_id=f.camera_id, ts=f.ts, c2w=view.c2w, anomaly_map_path=map_path)
            progress = Progress(part.part_id, f.frame_id, float(result.view_score), latency_ms, part.views_ok, time.time())
            await self._publish(part.cell, progress)
            self._notify("on_view", ViewEvent(part.cell, part.part_id, part.inspector.name, frame, result, part.views_ok, part.expected_views))
        part.views_done += 1
        if part.expected_views is not None and part.views_done >= part.expected_views and part.end_reason is None:
            part.end_reason = "expected_views"
            self._maybe_finish(part)

    async def _finish_part(self, part: _Part, forced: InspectionResult | None = None, reason: str | None = None) -> None:
        """Finalise (or take ``forced``), store, then publish the part's one verdict."""
        key = (part.cell, part.part_id)
        if key not in self._parts:
            return
        part.finalising = True
        t0 = time.monotonic()
        result = forced
        min_views = int(getattr(part.inspector, "min_views", 1))
        if result is None and part.end_reason == "shutdown":
            reason = "shutdown: the agent stopped before the part was complete"
            result = InspectionResult("incomplete", None, 1.0, [], part.views_ok, None, None, 0.0)
        if result is None and part.views_ok < min_views:
            reason = f"{part.views_ok} usable views, the recipe needs {min_views} ({part.end_reason})"
            result = InspectionResult("incomplete", None, 1.0, [], part.views_ok, None, None, 0.0)
        if result is None:
            try:
                result = await self._loop.run_in_executor(self._workers, part.inspection.finalise)
            except Exception as e:
                log.exception("finalise failed for %s/%s", part.cell, part.part_id)
                await self._reject(part.cell, f"inspect/{part.cell}/part/end", b"", ContractError("internal", f"finalising part {part.part_id!r} failed: {type(e).__name__}: {e}"), part_id=part.part_id)
                reason = f"internal error while finalising: {e}"
                result = InspectionResult("incomplete", None, 1.0, [], part.views_ok, None, None, 0.0)
        finalise_ms = (time.monotonic() - t0) * 1000
        for v in result.revised_views:  # views the inspection scored again (at the final placement): stored before the verdict
            await self._store_call(self.store.revise_view, cell=part.cell, part_id=part.part_id, view=v)
        verdict = self._verdict(part, result, finalise_ms)
        try:
            verdict.to_payload()  # the contract's own validation
        except (ContractError, ValueError) as e:
            await self._reject(part.cell, f"inspect/{part.cell}/verdict", b"", ContractError("internal", f"the inspection of part {part.part_id!r} gave an invalid verdict: {e}"), part_id=part.part_id)
            reason = f"invalid verdict from the inspection: {e}"
            verdict = self._verdict(part, InspectionResult("incomplete", None, 1.0, [], part.views_ok, None, None, 0.0), finalise_ms)
        if reason is None and verdict.verdict == "incomplete":
            reason = f"the inspection found too few usable views ({part.end_reason})"
        stored_verdict = await self._store_verdict(part.cell, verdict, reason if verdict.verdict == "incomplete" else None)
        self._notify("on_verdict", VerdictEvent(part.cell, stored_verdict, result if stored_verdict is verdict else None))
        verdict = stored_verdict
        if reason is not None and reason.startswith("shutdown"):  # stored and published, so the operator sees why
            err = ContractError("internal", f"part {part.part_id!r} recorded as incomplete: {reason}")
            await self._reject(part.cell, f"inspect/{part.cell}/part/end", b"", err, part_id=part.part_id)
        self._parts.pop(key, None)
        self._remember_finalised(part.cell, part.part_id)
        self.metrics.parts_active.labels(part.cell).set(sum(1 for c, _ in self._parts if c == part.cell))
        self.metrics.parts.labels(part.cell, verdict.verdict).inc()
        ready = time.monotonic()
        hist = self.metrics.verdict_latency.labels(part.cell)
        await self._publish(part.cell, verdict, on_sent=lambda: hist.observe(time.monotonic() - ready + finalise_ms / 1000))
        log.info("cell %s part %s: %s (%d views, ended by %s%s)", part.cell, part.part_id, verdict.verdict, verdict.n_views, part.end_reason, f"; {reason}" if reason else "")

    def _verdict(self, part: _Part, r: InspectionResult, finalise_ms: float) -> Verdict:
        placement = None
        if r.placement_translation_m is not None and r.placement_rotation_deg is not None:
            placement = Placement(tuple(float(v) for v in r.placement_translation_m), float(r.placement_rotation_deg))
        total_ms = (time.monotonic() - part.started) * 1000
        return Verdict(
            part_id=part.part_id,
            recipe=part.inspector.name,
            recipe_version=part.inspector.version,
            verdict=r.verdict,
            score=None if r.score is None else float(r.score),
            threshold=float(r.threshold),
            defects=[VerdictDefect.from_region(d) for d in r.defects],
            n_views=int(r.n_views),
            placement=placement,
            timings_ms=Timings(total=total_ms, per_view_mean=float(np.mean(part.view_ms)) if part.view_ms else 0.0, finalise=finalise_ms),
            ts=time.time(),
            agent_version=self.agent_version,
        )

    def _has_verdict(self, cell: str, part_id: str) -> bool:
        record = self.store.get_part(part_id, cell=cell)
        return record is not None and record.verdict is not None

    def _remember_finalised(self, cell: str, part_id: str) -> None:
        done = self._finalised[cell]
        done[part_id] = None
        while len(done) > self.config.finalised_memory:
            done.popitem(last=False)

    def _notify(self, method: str, event: Any) -> None:
        """Call every observer's ``method``; an observer's failure is logged, never raised."""
        for observer in self.observers:
            try:
                getattr(observer, method)(event)
            except Exception:
                log.exception("observer %r failed in %s", observer, method)

    # ------------------------------------------------------------------------------------ errors, store

    async def _reject(self, cell: str, topic: str, payload: bytes, error: ContractError, *, part_id: str | None = None, kind: str | None = None) -> None:
        """Publish, count and store an error; never raises."""
        try:
            message = error_for(topic, payload, error) if payload else error.to_error_message(topic, part_id)
            if part_id is not None:
                message.part_id = part_id
            if kind is None:
                with contextlib.suppress(ContractError):
                    kind = parse_topic(topic).kind
            if kind == "frame":
                self.metrics.frames_rejected.labels(cell, error.code).inc()
            self.metrics.errors.labels(cell, error.code).inc()
            log.info("cell %s: %s on %s: %s", cell, error.code, topic, error.message)
            await self._store_call(self.store.record_error, cell=cell, error=message, payload=payload or None)
            await self._publish(cell, message)
        except Exception:
            log.exception("cell %s: could not report an error", cell)

    async def _store_call(self, fn: Callable[..., Any], *, default: Any = None, **kwargs: Any) -> Any:
        """Run a store call on the store thread; a failure is logged and counted, not raised."""
        try:
            return await self._loop.run_in_executor(self._store_pool, lambda: fn(**kwargs))
        except Exception:
            log.exception("store call %s failed", getattr(fn, "__name__", fn))
            return default

    async def _store_verdict(self, cell: str, verdict: Verdict, reason: str | None = None) -> Verdict:
        """Commit the verdict (and why it is incomplete), retrying while the database is unavailable: it is published only after this.

        Returns the verdict to publish: the stored one if the part already had a verdict.
        """
        delay = 0.2
        while True:
            try:
                stored = await self._loop.run_in_executor(self._store_pool, lambda: self.store.record_verdict(cell, verdict, reason=reason))
                if stored is False:
                    record = await self._loop.run_in_executor(self._store_pool, lambda: self.store.get_part(verdict.part_id, cell=cell))
                    log.warning("cell %s part %s already had a verdict; publishing the stored one", cell, verdict.part_id)
                    return Verdict.from_dict(record.verdict.payload)
                return verdict
            except Exception as e:
                log.error("cell %s part %s: storing the verdict failed (%s); retrying in %.1f s", cell, verdict.part_id, e, delay)
                self.metrics.errors.labels(cell, "internal").inc()
                if self._stop.is_set() and delay >= 5.0:
                    log.error("cell %s part %s: verdict not stored at shutdown; not published", cell, verdict.part_id)
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ------------------------------------------------------------------------------------ housekeeping

    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._housekeeping()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("housekeeping failed")

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        for cell, pairing in self._pairing.items():
            for part, view in pairing.expire(now):
                part.waiting_pose -= 1
                await self._reject(cell, view.topic, b"", ContractError("no_pose", self._no_pose_message(cell, view.frame)), part_id=part.part_id, kind="frame")
                self._maybe_finish(part)
        for part in list(self._parts.values()):
            if part.end_reason is None and now - part.last_frame > self.config.part_timeout_s:
                part.end_reason = "timeout"
                self._maybe_finish(part)
        m = self.metrics.queue_depth
        m.labels("inbound").set(sum(q.qsize() for q in self._inbound.values()))
        m.labels("views").set(self._views_queued)
        m.labels("pose_wait").set(sum(len(p) for p in self._pairing.values()))
        m.labels("outbound").set(sum(o.queue.qsize() for o in self._outbox.values()))


def inspector_device(inspector: Inspector) -> str:
    """'cuda' or 'cpu': the inspector's ``device`` attribute when it has one, else what torch has."""
    device = getattr(inspector, "device", None)
    if device is not None:
        return str(device).split(":")[0]
    torch = sys.modules.get("torch")
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def list_recipes(recipes_dir: Path) -> list[str]:
    """Names of the recipe directories under ``recipes_dir`` (valid ids only)."""
    if not recipes_dir.is_dir():
        return []
    return sorted(p.name for p in recipes_dir.iterdir() if p.is_dir() and re.fullmatch(r"[A-Za-z0-9._-]{1,128}", p.name) and p.name not in (".", ".."))


async def serve(service: InspectionService) -> None:
    """Run the service until SIGTERM or SIGINT, then shut it down cleanly."""
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(service.run())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
