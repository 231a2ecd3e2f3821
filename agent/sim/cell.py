"""A live simulated cell: plays parts over MQTT exactly as a real cell would (../shared/spec/mqtt-contract.md).

Per part: ``part/start``; per view the robot moves (0.3-0.8 s, scaled by ``speed``), publishes
``robot/pose`` and the camera publishes its frame a few milliseconds later (frame ``ts`` = pose ``ts`` +
2-6 ms, without ``c2w`` unless asked, so the agent pairs frames and poses by time); then ``part/end``.
:func:`play_part` takes any :class:`~agent.capture.Capture` and a ``publish`` callable, so the playing
logic is testable without a broker; :class:`MqttPublisher` is the paho-mqtt side.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import typer
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console

from agent.capture import DEFECT_TYPES, Capture
from agent.contract import FrameMessage, PartEnd, PartStart, RobotPose, check_id
from agent.sim import PRODUCTS, SimConfig, inspection_poses, simulate_part

Publish = Callable[[str, bytes, int], None]  # (topic, payload, qos)


@dataclass(frozen=True)
class CellOptions:
    """How the simulated cell talks: ids, encodings, timing."""

    cell: str
    camera_id: str = "cam0"
    encoding: str = "png"  # png | jpeg
    embed_pose: bool = False  # put c2w into the frame message as well
    depth: bool = False
    depth_encoding: str = "npy"  # npy | png16mm
    send_intrinsics: bool = True
    qos: int = 1
    speed: float = 1.0  # time scale: 10 = ten times faster than a real robot
    move_s: tuple[float, float] = (0.3, 0.8)  # robot move time between views, seconds at speed 1
    min_move_s: float = 0.05  # floor after scaling: consecutive poses stay well apart beyond the 20 ms pairing tolerance
    trigger_delay_s: tuple[float, float] = (0.002, 0.006)  # pose stamp -> exposure stamp (not scaled)

    def __post_init__(self) -> None:
        check_id(self.cell, "cell")
        check_id(self.camera_id, "camera_id")
        if self.speed <= 0 or self.min_move_s < 0:
            raise ValueError(f"speed must be > 0 and min_move_s >= 0, got {self.speed} and {self.min_move_s}")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos}")
        for name in ("move_s", "trigger_delay_s"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a range 0 <= low <= high, got {(lo, hi)}")


@dataclass
class PartPlayback:
    """What was played for one part."""

    part_id: str
    recipe: str
    n_views: int
    start_ts: float
    end_ts: float
    n_messages: int


def play_part(
    publish: Publish,
    capture: Capture,
    part_id: str,
    recipe: str,
    options: CellOptions,
    rng: np.random.Generator,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> PartPlayback:
    """Publish one part: start, (robot pose, frame) per view, end. Every frame of ``capture`` needs a pose."""
    if not capture.frames:
        raise ValueError(f"part {part_id!r} has no frames to play")
    for frame in capture.frames:
        if frame.c2w is None:
            raise ValueError(f"frame {frame.name!r} of part {part_id!r} has no camera pose; the cell cannot play it")
    if options.depth and any(frame.depth is None for frame in capture.frames):
        raise ValueError(f"depth was asked for but part {part_id!r} has frames without depth")
    n = 0

    def send(message, topic: str) -> None:
        nonlocal n
        publish(topic, message.to_payload(), options.qos)
        n += 1

    start = PartStart(part_id, recipe, clock(), expected_views=len(capture.frames))
    send(start, start.topic_for(options.cell))
    for frame in capture.frames:
        sleep(max(float(rng.uniform(*options.move_s)) / options.speed, options.min_move_s))
        pose = RobotPose(clock(), options.camera_id, frame.c2w)
        send(pose, pose.topic_for(options.cell))
        # The camera is triggered once the robot has settled; it stamps its exposure a few ms later.
        frame_ts = pose.ts + float(rng.uniform(*options.trigger_delay_s))
        sleep(max(0.0, frame_ts - clock()))
        message = FrameMessage.from_arrays(
            part_id,
            frame.name,
            options.camera_id,
            frame_ts,
            frame.image,
            encoding=options.encoding,
            intrinsics=frame.intrinsics if options.send_intrinsics else None,
            c2w=frame.c2w if options.embed_pose else None,
            depth=frame.depth if options.depth else None,
            depth_encoding=options.depth_encoding,
        )
        send(message, message.topic_for(options.cell))
    end = PartEnd(part_id, max(clock(), frame_ts))
    send(end, end.topic_for(options.cell))
    return PartPlayback(part_id, recipe, len(capture.frames), start.ts, end.ts, n)


class MqttPublisher:
    """A connected paho-mqtt client that publishes and waits for the broker's acknowledgement."""

    def __init__(self, host: str, port: int, client_id: str | None = None, timeout_s: float = 10.0):
        self.timeout_s = timeout_s
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"sim-cell-{uuid.uuid4().hex[:12]}")
        connected = threading.Event()
        result: list = []

        def on_connect(client, userdata, flags, reason_code, properties):
            result.append(reason_code)
            connected.set()

        self.client.on_connect = on_connect
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as e:
            raise ConnectionError(f"cannot connect to the MQTT broker at {host}:{port}: {e}") from None
        self.client.loop_start()
        if not connected.wait(timeout_s):
            self.close()
            raise ConnectionError(f"the MQTT broker at {host}:{port} did not answer within {timeout_s} s")
        if result[0].is_failure:
            self.close()
            raise ConnectionError(f"the MQTT broker at {host}:{port} refused the connection: {result[0]}")

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publishing to {topic!r} failed: {mqtt.error_string(info.rc)}")
        info.wait_for_publish(self.timeout_s)
        if not info.is_published():
            raise ConnectionError(f"the broker did not acknowledge a message on {topic!r} within {self.timeout_s} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_broker(broker: str) -> tuple[str, int]:
    """'HOST:PORT' (or 'HOST', port 1883) -> (host, port)."""
    host, sep, port = broker.rpartition(":")
    if not sep:
        return broker, 1883
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--broker must be HOST:PORT, got {broker!r}")
    return host, int(port)


class ImageEncoding(str, Enum):
    png = "png"
    jpeg = "jpeg"


class DepthEncoding(str, Enum):
    npy = "npy"
    png16mm = "png16mm"


def cell_command(
    broker: str = typer.Option("127.0.0.1:1883", "--broker", help="MQTT broker as HOST:PORT."),
    cell: str = typer.Option("cell-1", "--cell", help="Cell id: topics are inspect/<cell>/..."),
    recipe: list[str] | None = typer.Option(None, "--recipe", help="Product to play (repeatable, taken in turn); default: every simulator product."),
    parts: int = typer.Option(5, "--parts", min=1, help="Number of parts to play."),
    defect_rate: float = typer.Option(0.3, "--defect-rate", min=0.0, max=1.0, help="Probability that a part has a defect."),
    views: int = typer.Option(12, "--views", min=1, help="Views per part."),
    size: int = typer.Option(256, "--size", min=16, help="Image width and height in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed (parts, defects, timing)."),
    speed: float = typer.Option(1.0, "--speed", min=1e-3, help="Time scale of robot moves: 10 plays ten times faster (moves never go below 50 ms)."),
    camera_id: str = typer.Option("cam0", "--camera-id", help="Camera id in topics and robot poses."),
    encoding: ImageEncoding = typer.Option(ImageEncoding.png, "--encoding", help="Image encoding of frames."),
    embed_pose: bool = typer.Option(False, "--embed-pose", help="Put c2w into each frame as well as on robot/pose."),
    depth: bool = typer.Option(False, "--depth", help="Send the depth map with each frame."),
    depth_encoding: DepthEncoding = typer.Option(DepthEncoding.npy, "--depth-encoding", help="Depth encoding when --depth is given."),
    intrinsics: bool = typer.Option(True, "--intrinsics/--no-intrinsics", help="Send the camera intrinsics with each frame."),
    qos: int = typer.Option(1, "--qos", min=0, max=2, help="MQTT QoS of every message."),
    part_prefix: str | None = typer.Option(None, "--part-prefix", help="Part ids are <prefix><n>; default p-<unix time>-."),
    truth: Path | None = typer.Option(None, "--truth", help="Append each part's ground truth here as JSON lines."),
) -> None:
    """Play a live cell over MQTT: part/start, robot poses and camera frames per view, part/end."""
    console = Console()
    try:
        host, port = parse_broker(broker)
        options = CellOptions(
            cell=cell,
            camera_id=camera_id,
            encoding=encoding.value,
            embed_pose=embed_pose,
            depth=depth,
            depth_encoding=depth_encoding.value,
            send_intrinsics=intrinsics,
            qos=qos,
            speed=speed,
        )
        recipes = list(recipe) if recipe else list(PRODUCTS)
        unknown = [r for r in recipes if r not in PRODUCTS]
        if unknown:
            raise ValueError(f"unknown --recipe {', '.join(unknown)}; the simulator has {', '.join(PRODUCTS)}")
        config = SimConfig(width=size, height=size, n_views=views)
        prefix = part_prefix if part_prefix is not None else f"p-{int(time.time())}-"
        check_id(f"{prefix}{parts:04d}", "part id (from --part-prefix)")
    except ValueError as e:  # includes ContractError
        raise typer.BadParameter(str(e)) from None
    rng = np.random.default_rng(seed)
    try:
        publisher = MqttPublisher(host, port)
    except ConnectionError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    with publisher:
        for i in range(parts):
            product = recipes[i % len(recipes)]
            defect = str(rng.choice(DEFECT_TYPES)) if rng.random() < defect_rate else None
            part_id = f"{prefix}{i + 1:04d}"
            capture = simulate_part(product, defect, inspection_poses(product, config), config, rng)
            played = play_part(publisher.publish, capture, part_id, product, options, rng)
            label = capture.gt.label
            colour = "green" if label == "good" else "yellow"
            console.print(
                f"{part_id}  {product:<12} [{colour}]{label:<8}[/{colour}] {played.n_views} views  "
                f"{played.end_ts - played.start_ts:6.2f} s  -> inspect/{cell}"
            )
            if truth is not None:
                append_truth(truth, part_id, product, capture)


def append_truth(path: Path, part_id: str, recipe: str, capture: Capture) -> None:
    """One JSON line per part: its id, recipe and ground truth (label, defect blobs in the world frame)."""
    gt = capture.gt
    defects = [{"id": d.id, "type": d.type, "center": [float(v) for v in d.center], "radius_m": float(d.radius_m)} for d in gt.defects]
    record = {"part_id": part_id, "recipe": recipe, "label": gt.label, "defects": defects}
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
