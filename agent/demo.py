"""`agent demo`: the whole agent on a simulated cell, in one command, for a newcomer.

1. Recipe: the golden part of the simulated product is rendered on the enrollment trajectory and
   enrolled with :data:`DEMO_ENROLL_CONFIG` into ``<out>/recipes/<name>``, its threshold set from ``--teach-in``
   nominal parts rendered on the inspection trajectory. The enrolment is cached: a
   later run reuses it while its cache key (recipe, image size, seed, teach-in parts, agent version, enrolment
   settings, kept in ``<out>/recipes/<name>.demo-key.json``) and the recipe's content hash still match.
2. Broker: the one at ``--broker`` when it answers an MQTT CONNECT; otherwise an embedded broker
   (amqtt, in this process) on a free local port for the demo's lifetime.
3. Agent: the real service (:class:`agent.service.service.InspectionService`) on its own thread and event
   loop, one cell, results in ``<out>/results.db`` (a fresh database each run).
4. Cell: simulated parts, good and defective with known ground truth, played over MQTT by
   :func:`agent.sim.cell.play_part` exactly as ``agent simulate cell`` does, one part at a time (the next
   part is rendered while the agent inspects the current one).
5. Display: a live table driven by what the agent publishes (``progress``, ``verdict``, ``error``),
   watched like any MQTT client would; at the end a summary against the ground truth.

Ctrl-C stops cleanly: the cell stops, the agent finishes or records as incomplete the part in flight,
the embedded broker stops, and on a shared broker the demo's session and retained status are removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import typer
from paho.mqtt.enums import CallbackAPIVersion
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from agent import __version__
from agent.capture import DefectGT
from agent.contract import ContractError, ErrorMessage, Progress as ProgressMessage, Status, Verdict, VerdictDefect, check_id, parse_outbound
from agent.pipeline import EnrollConfig
from agent.report.render import REPORTS_DIR, SUMMARY_FILE
from agent.sim import PRODUCTS, SimConfig
from agent.sim.cell import CellOptions, MqttPublisher, append_truth, parse_broker, play_part
from agent.sim.dataset import PartJob, plan_parts, simulate_job

log = logging.getLogger("agent.demo")

# The one enrolment of the demo: the defaults (the lead tunes detection there). Tests swap in a tiny one.
DEMO_ENROLL_CONFIG = EnrollConfig()

PARTS_IN_FLIGHT = 1  # the cell plays the next part once the previous one has its verdict
SERVICE_START_TIMEOUT_S = 30.0
SERVICE_STOP_TIMEOUT_S = 60.0
SHUTDOWN_GRACE_S = 3.0  # on Ctrl-C the part in flight may finish its queued views this long, then it is recorded incomplete
CACHE_KEY_SUFFIX = ".demo-key.json"
LOG_FILE = "demo.log"
TRUTH_FILE = "truth.jsonl"


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why (printed as ``error: ...``)."""


class DemoStopped(Exception):
    """Raised inside the cell's thread when the demo is stopping."""


@dataclass(frozen=True)
class DemoOptions:
    """What `agent demo` was asked to do."""

    recipe: str = "stool"
    parts: int = 6
    defective_fraction: float = 0.5
    out: Path = Path("out/demo")
    broker: str = "127.0.0.1:1883"
    size: int = 256
    seed: int = 0
    cell: str = "demo"
    speed: float = 1.0  # robot speed: 2 moves twice as fast as a real robot
    re_enroll: bool = False
    preview_port: int | None = None
    teach_in: int = 3  # nominal parts run through the cell at enrolment; they set the threshold

    def __post_init__(self) -> None:
        if self.recipe not in PRODUCTS:
            raise ValueError(f"--recipe must be a simulated product ({', '.join(PRODUCTS)}), got {self.recipe!r}")
        if self.parts < 1:
            raise ValueError(f"--parts must be >= 1, got {self.parts}")
        if not 0.0 <= self.defective_fraction <= 1.0:
            raise ValueError(f"--defective-fraction must be in [0, 1], got {self.defective_fraction}")
        if self.size < 32:
            raise ValueError(f"--size must be >= 32 pixels, got {self.size}")
        if self.speed <= 0:
            raise ValueError(f"--speed must be > 0, got {self.speed}")
        if self.teach_in < 0:
            raise ValueError(f"--teach-in must be >= 0, got {self.teach_in}")
        if self.preview_port is not None and not 0 <= self.preview_port <= 65535:
            raise ValueError(f"--preview-port must be a TCP port (0 = any free one), got {self.preview_port}")
        try:
            check_id(self.cell, "--cell")
        except ContractError as e:
            raise ValueError(e.message) from None
        parse_broker(self.broker)  # ValueError names --broker

    @property
    def recipes_dir(self) -> Path:
        return self.out / "recipes"

    @property
    def db_path(self) -> Path:
        return self.out / "results.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.out / "artifacts"


# ------------------------------------------------------------------------------------------ parts


@dataclass(frozen=True)
class DemoPart:
    """One simulated part the cell plays, with its ground truth."""

    part_id: str
    job: PartJob

    @property
    def truth(self) -> str:
        """``good`` or the defect type."""
        return self.job.category


def plan_demo(options: DemoOptions) -> tuple[PartJob, list[DemoPart]]:
    """The golden part and the parts to play: ``round(parts * defective_fraction)`` defective (defect types in
    turn), the rest good, in an order shuffled by the seed. Each part's content depends on the seed only."""
    jobs = _planned_jobs(options)
    golden, tests = jobs[0], [j for j in jobs[1:] if not j.teach_in]
    order = np.random.default_rng(options.seed).permutation(len(tests))
    width = max(2, len(str(len(tests))))
    return golden, [DemoPart(f"part-{i + 1:0{width}d}", tests[j]) for i, j in enumerate(order)]


def _planned_jobs(options: DemoOptions) -> list[PartJob]:
    defective = round(options.parts * options.defective_fraction)
    return plan_parts(options.recipe, options.parts - defective, defective, options.seed, options.teach_in)


def teach_in_jobs(options: DemoOptions) -> list[PartJob]:
    """The nominal teach-in parts of the enrolment (:func:`agent.pipeline.calibrate_on_teach_in`)."""
    return [j for j in _planned_jobs(options) if j.teach_in]


def sim_config(options: DemoOptions, config: EnrollConfig) -> SimConfig:
    """The simulator's settings: square images of ``--size``, as many views per part as the recipe expects."""
    return SimConfig(width=options.size, height=options.size, n_views=config.expected_views)


def outcome(truth: str, verdict: str | None) -> str | None:
    """The verdict against the ground truth: correct, escape (a defect passed), false reject, incomplete."""
    if verdict is None:
        return None
    if verdict == "incomplete":
        return "incomplete"
    if (verdict == "fail") == (truth != "good"):
        return "correct"
    return "escape" if verdict == "pass" else "false reject"


LOCATED_MARGIN_M = 0.01  # a reported defect names a true one when its box comes this close to the true blob


def defect_located(defects: Sequence[VerdictDefect], truth: Sequence[DefectGT], margin_m: float = LOCATED_MARGIN_M) -> bool:
    """Whether one of the verdict's ``defects`` (their boxes, world frame) comes within ``margin_m`` of a true defect
    blob (its centre and radius, world frame): the defect was found where it is."""
    for d in defects:
        lo, hi = np.asarray(d.bbox_min, dtype=np.float64), np.asarray(d.bbox_max, dtype=np.float64)
        for t in truth:
            c = np.asarray(t.center, dtype=np.float64)
            if np.linalg.norm(c - np.clip(c, lo, hi)) <= t.radius_m + margin_m:
                return True
    return False


# ------------------------------------------------------------------------------------------ recipe cache


def recipe_cache_key(options: DemoOptions, config: EnrollConfig) -> dict:
    """What the cached enrolment depends on."""
    return {
        "recipe": options.recipe,
        "size": options.size,
        "seed": options.seed,
        "teach_in": options.teach_in,
        "agent_version": __version__,
        "enroll_config": dataclasses.asdict(config),
    }


def cache_key_path(recipes_dir: Path, name: str) -> Path:
    return recipes_dir / f"{name}{CACHE_KEY_SUFFIX}"


def cached_recipe_version(recipes_dir: Path, name: str, key: dict) -> str | None:
    """The version of the enrolled recipe when its cache key is ``key`` and its files are intact; else None."""
    from agent.recipe import RecipeError, verify_recipe_files

    path = cache_key_path(recipes_dir, name)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != json.loads(json.dumps(key, default=str)):
        return None
    try:
        version = verify_recipe_files(recipes_dir / name)
    except RecipeError:
        return None
    return version if version == stored.get("recipe_version") else None


def write_cache_key(recipes_dir: Path, name: str, key: dict, version: str, seconds: float) -> Path:
    path = cache_key_path(recipes_dir, name)
    record = {"key": key, "recipe_version": version, "enrolled_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "enroll_seconds": round(seconds, 1)}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def prepare_recipe(options: DemoOptions, config: EnrollConfig, console: Console) -> tuple[str, bool, float]:
    """Enrol the demo recipe unless the cached one fits; returns (version, reused, seconds)."""
    from agent.pipeline import enroll
    from agent.recipe import save_recipe, verify_recipe_files

    key = recipe_cache_key(options, config)
    if not options.re_enroll:
        version = cached_recipe_version(options.recipes_dir, options.recipe, key)
        if version is not None:
            console.print(f"recipe [bold]{options.recipe}[/]: cached enrolment {version[:19]} in {options.recipes_dir / options.recipe} (--re-enroll to redo it)")
            return version, True, 0.0
    cache_key_path(options.recipes_dir, options.recipe).unlink(missing_ok=True)
    golden_job, _ = plan_demo(options)
    t0 = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        sim = sim_config(options, config)
        task = bar.add_task(f"golden part: rendering {sim.enroll_views} views", total=1)
        golden = simulate_job(golden_job, sim)
        bar.update(task, completed=1)
        jobs = teach_in_jobs(options)
        task = bar.add_task(f"teach-in parts: rendering {len(jobs)} x {sim.n_views} views", total=len(jobs))
        teach_in = []
        for job in jobs:
            teach_in.append(simulate_job(job, sim))
            bar.advance(task)
        tasks: dict[str, tuple[int, int]] = {}  # stage -> (task id, total)

        def finish_stages() -> None:  # enroll() reports a stage's steps as they start: the next stage ends it
            for task_id, total in tasks.values():
                bar.update(task_id, completed=total)

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                finish_stages()
                tasks[stage] = (bar.add_task(f"enrol: {stage}", total=total), total)
            tasks[stage] = (tasks[stage][0], total)
            bar.update(tasks[stage][0], completed=done, total=total)

        try:
            recipe = enroll(golden, options.recipe, config, progress, teach_in=teach_in)
        except ValueError as e:
            raise DemoError(f"enrolment failed: {e}") from None
        finish_stages()
    options.recipes_dir.mkdir(parents=True, exist_ok=True)
    root = save_recipe(recipe, options.recipes_dir)
    version = verify_recipe_files(root)
    seconds = time.perf_counter() - t0
    write_cache_key(options.recipes_dir, options.recipe, key, version, seconds)
    console.print(f"recipe [bold]{options.recipe}[/]: enrolled in {seconds:.0f} s -> {root} ({version[:19]})")
    return version, False, seconds


# ------------------------------------------------------------------------------------------ broker


def broker_problem(host: str, port: int, timeout_s: float = 3.0) -> str | None:
    """None when an MQTT broker at ``host:port`` accepts a connection (TCP, then MQTT CONNECT/CONNACK); else why not."""
    try:
        MqttPublisher(host, port, client_id=f"demo-probe-{uuid.uuid4().hex[:8]}", timeout_s=timeout_s).close()
    except ConnectionError as e:
        return str(e)
    return None


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """An amqtt MQTT broker on a free port of 127.0.0.1, on its own thread and event loop; ``stop()`` ends it."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @staticmethod
    def version() -> str:
        from importlib.metadata import version

        return version("amqtt")

    def start(self, timeout_s: float = 15.0, attempts: int = 3) -> EmbeddedBroker:
        for _ in range(attempts):  # a free port can be taken between choosing and binding it: try another
            self.port = free_tcp_port(self.host)
            self._started.clear()
            self._error = None
            self._thread = threading.Thread(target=self._main, name="demo-broker", daemon=True)
            self._thread.start()
            if not self._started.wait(timeout_s):
                raise DemoError(f"the embedded MQTT broker did not start within {timeout_s:.0f} s")
            if self._error is None:
                return self
            self._thread.join(5)
        raise DemoError(f"the embedded MQTT broker could not start: {self._error}")

    def _main(self) -> None:
        async def main() -> None:
            from amqtt.broker import Broker

            config = {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            broker = Broker(config)
            try:
                await broker.start()
            except Exception as e:
                self._error = e
                self._started.set()
                return
            self._started.set()
            await self._stop.wait()
            await broker.shutdown()

        try:
            asyncio.run(main())
        except Exception as e:  # after the start: logged, the demo notices the broker gone
            log.exception("embedded broker failed")
            self._error = e
            self._started.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the embedded broker did not stop within %.0f s", timeout_s)


def forget_client(host: str, port: int, client_id: str, retained_topics: tuple[str, ...] = ()) -> None:
    """Leave a shared broker as the demo found it: drop ``client_id``'s persistent session (a clean-session
    connect with its id) and clear ``retained_topics``."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    try:
        client.connect(host, port, keepalive=10)
        client.loop_start()
        for topic in retained_topics:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        client.disconnect()
        client.loop_stop()
    except (OSError, RuntimeError, ValueError) as e:
        log.warning("could not clean up the demo's session on %s:%d: %s", host, port, e)


# ------------------------------------------------------------------------------------------ agent


class ServiceThread:
    """Runs an InspectionService on its own event loop in a daemon thread."""

    def __init__(self, service):
        self.service = service
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._main, name="demo-agent", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.service.run()

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported by the demo
            self.error = e
            log.exception("the agent stopped with an error")

    def start(self, timeout_s: float = SERVICE_START_TIMEOUT_S) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.service.ready.wait(0.1):
            if not self.thread.is_alive():
                raise DemoError(f"the agent stopped while starting: {self.error!r}")
            if time.monotonic() > deadline:
                raise DemoError(f"the agent did not come online within {timeout_s:.0f} s (see {LOG_FILE})")

    def stop(self, timeout_s: float = SERVICE_STOP_TIMEOUT_S) -> bool:
        """Ask for a clean shutdown and wait for it; False when the thread is still running afterwards."""
        if not self.thread.is_alive():
            return True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.service.request_stop)
        else:
            self.service.request_stop()
        self.thread.join(timeout_s)
        return not self.thread.is_alive()


# ------------------------------------------------------------------------------------------ watching


@dataclass
class PartStatus:
    """What the demo knows about one part, from the cell's side and from the agent's messages."""

    part_id: str
    truth: str
    expected_views: int
    state: str = "waiting"  # waiting | rendering | playing | played | done
    views_done: int = 0
    last_view_score: float | None = None
    view_latency_ms: list[float] = field(default_factory=list)  # frame received -> view processed (agent's measure)
    last_view_at: float | None = None  # monotonic, when the demo saw the last progress message
    verdict: Verdict | None = None
    verdict_after_ms: float | None = None  # last progress message -> verdict message, as the demo saw them
    truth_defects: list[DefectGT] = field(default_factory=list)  # the part's true defect blobs, once it is rendered

    @property
    def outcome(self) -> str | None:
        return outcome(self.truth, self.verdict.verdict if self.verdict else None)

    @property
    def located(self) -> bool | None:
        """For a defective part that failed: whether its verdict named the place of a true defect; else None."""
        if self.outcome != "correct" or self.truth == "good" or not self.truth_defects:
            return None
        return defect_located(self.verdict.defects, self.truth_defects)


class AgentWatcher:
    """An MQTT client on the agent's outbound topics of one cell; every message goes to ``events`` as
    ``(kind, message, monotonic time)``."""

    def __init__(self, host: str, port: int, cell: str, events: queue.Queue, timeout_s: float = 10.0):
        self.cell = cell
        self.events = events
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-watch-{uuid.uuid4().hex[:10]}", clean_session=True)
        topics = [(f"inspect/{cell}/verdict", 1), (f"inspect/{cell}/error", 1), (f"inspect/{cell}/status", 1), (f"inspect/{cell}/part/+/progress", 0)]
        self.client.on_connect = lambda client, userdata, flags, rc, props: client.subscribe(topics)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as e:
            raise DemoError(f"cannot watch the agent on {host}:{port}: {e}") from None
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.close()
            raise DemoError(f"could not subscribe to inspect/{cell}/# on {host}:{port} within {timeout_s:.0f} s")

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        now = time.monotonic()
        if not msg.payload:  # a cleared retained status
            return
        try:
            message = parse_outbound(msg.topic, msg.payload, cell=self.cell)
        except (ContractError, ValueError) as e:
            log.warning("unreadable message on %s: %s", msg.topic, e)
            return
        self.events.put((msg.topic.rsplit("/", 1)[-1], message, now))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CellPlayer(threading.Thread):
    """The simulated cell: renders each part, waits until the agent has room, plays it over MQTT."""

    def __init__(self, publish: Callable[[str, bytes, int], None], parts: list[DemoPart], options: DemoOptions, config: EnrollConfig,
                 events: queue.Queue, verdicts_seen: Callable[[], int]):  # fmt: skip
        super().__init__(name="demo-cell", daemon=True)
        self.publish = publish
        self.parts = parts
        self.options = options
        self.sim = sim_config(options, config)
        self.cell_options = CellOptions(cell=options.cell, depth=True, speed=options.speed)
        self.events = events
        self.verdicts_seen = verdicts_seen
        self.stopping = threading.Event()
        self.rng = np.random.default_rng(options.seed)

    def _sleep(self, seconds: float) -> None:
        if self.stopping.wait(seconds):
            raise DemoStopped

    def run(self) -> None:
        try:
            for i, part in enumerate(self.parts):
                self.events.put(("cell", (part.part_id, "rendering"), time.monotonic()))
                capture = simulate_job(part.job, self.sim)
                self.events.put(("rendered", (part, capture), time.monotonic()))
                while self.verdicts_seen() < i + 1 - PARTS_IN_FLIGHT:
                    self._sleep(0.05)
                self.events.put(("cell", (part.part_id, "playing"), time.monotonic()))
                play_part(self.publish, capture, part.part_id, self.options.recipe, self.cell_options, self.rng, sleep=self._sleep)
                self.events.put(("cell", (part.part_id, "played"), time.monotonic()))
        except DemoStopped:
            pass
        except Exception as e:  # noqa: BLE001 - shown by the demo
            log.exception("the simulated cell failed")
            self.events.put(("cell_failed", e, time.monotonic()))

    def stop(self) -> None:
        self.stopping.set()


# ------------------------------------------------------------------------------------------ display


VERDICT_STYLE = {"pass": "green", "fail": "bold red", "incomplete": "yellow"}
OUTCOME_STYLE = {"correct": "green", "escape": "bold red", "false reject": "red", "incomplete": "yellow"}


def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.0f}" if values else ""


TABLE_CAPTION = "vs truth: elsewhere = rejected, but no defect named within 1 cm of the true one; score: the latest view's; latency: frame received -> view inspected, mean over the part (it grows while the robot is ahead of the agent); verdict ms: after the last view"


def parts_table(parts: list[PartStatus], title: str) -> Table:
    """The live table: one row per part (fits 80 columns)."""
    table = Table(title=title, title_justify="left", caption=TABLE_CAPTION, caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0)
    for name, justify in (("part", "left"), ("truth", "left"), ("views", "right"), ("score", "right"), ("verdict", "left"),
                          ("vs truth", "left"), ("latency ms", "right"), ("verdict ms", "right")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)
    for p in parts:
        truth = Text(p.truth, style="green" if p.truth == "good" else "yellow")
        views = f"{p.views_done}/{p.expected_views}" if p.state != "waiting" else ""
        score = "" if p.last_view_score is None else f"{p.last_view_score:.2f}"
        if p.verdict is not None:
            shown = p.verdict.verdict + ("" if p.verdict.score is None else f" {p.verdict.score:.2f}")
            verdict = Text(shown, style=VERDICT_STYLE[p.verdict.verdict])
        else:
            verdict = Text(p.state if p.state != "waiting" else "", style="dim")
        result = Text(p.outcome if p.outcome not in (None, "incomplete") else "", style=OUTCOME_STYLE.get(p.outcome or "", ""))
        if p.located is False:  # rejected, but not where the defect is
            result = Text("elsewhere", style="yellow")
        after = "" if p.verdict_after_ms is None else f"{p.verdict_after_ms:.0f}"
        table.add_row(p.part_id, truth, views, score, verdict, result, _ms(p.view_latency_ms), after)
    return table


@dataclass(frozen=True)
class DemoSummary:
    """The outcome of a demo run."""

    parts: int
    verdicts: dict[str, int]  # pass / fail / incomplete
    outcomes: dict[str, int]  # correct / escape / false reject / incomplete
    mean_view_latency_ms: float | None  # frame received -> view processed, over every view
    mean_view_processing_ms: float | None  # the verdicts' per_view_mean, averaged over parts
    mean_verdict_after_ms: float | None  # last progress -> verdict, seen by the client
    inspect_seconds: float
    located: tuple[int, int] = (0, 0)  # defective parts rejected with a defect at a true one's place, of those rejected

    def line(self) -> str:
        v, o = self.verdicts, self.outcomes
        text = (f"{self.parts} parts: {v.get('pass', 0)} pass, {v.get('fail', 0)} fail, {v.get('incomplete', 0)} incomplete; "
                f"against the truth {o.get('correct', 0)}/{self.parts} correct, {o.get('escape', 0)} escaped defects, "
                f"{o.get('false reject', 0)} false rejects")  # fmt: skip
        if self.located[1]:
            text += f" ({self.located[0]} of {self.located[1]} rejected defective parts with a defect where a true one is)"
        if self.mean_view_latency_ms is not None:
            text += f"; per view {self.mean_view_latency_ms:.0f} ms mean latency ({self.mean_view_processing_ms or 0:.0f} ms processing)"
        if self.mean_verdict_after_ms is not None:
            text += f", verdict {self.mean_verdict_after_ms:.0f} ms after the last view"
        return text + f"; {self.inspect_seconds:.0f} s in all"


def summarise(parts: list[PartStatus], inspect_seconds: float) -> DemoSummary:
    done = [p for p in parts if p.verdict is not None]
    verdicts = {k: sum(1 for p in done if p.verdict.verdict == k) for k in ("pass", "fail", "incomplete")}
    outcomes = {k: sum(1 for p in done if p.outcome == k) for k in ("correct", "escape", "false reject", "incomplete")}
    judged = [p.located for p in done if p.located is not None]
    latencies = [ms for p in parts for ms in p.view_latency_ms]
    processing = [p.verdict.timings_ms.per_view_mean for p in done if p.verdict.n_views]
    after = [p.verdict_after_ms for p in done if p.verdict_after_ms is not None]
    return DemoSummary(
        parts=len(parts),
        verdicts=verdicts,
        outcomes=outcomes,
        located=(sum(judged), len(judged)),
        mean_view_latency_ms=float(np.mean(latencies)) if latencies else None,
        mean_view_processing_ms=float(np.mean(processing)) if processing else None,
        mean_verdict_after_ms=float(np.mean(after)) if after else None,
        inspect_seconds=inspect_seconds,
    )


# ------------------------------------------------------------------------------------------ the run


def _fresh_results(options: DemoOptions) -> None:
    """Each run starts a fresh results database, artifacts folder, reports and truth file (the recipe cache stays)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{options.db_path}{suffix}").unlink(missing_ok=True)
    for folder in (options.artifacts_dir, options.out / REPORTS_DIR):
        if folder.is_dir():
            shutil.rmtree(folder)
    for name in (TRUTH_FILE, SUMMARY_FILE):
        (options.out / name).unlink(missing_ok=True)


class _LogToFile:
    """INFO and above of the agent (and warnings of the embedded broker) go to ``<out>/demo.log`` while the demo runs."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path, mode="w", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"))
        self.root = logging.getLogger()
        self.amqtt = logging.getLogger("amqtt")
        self.saved = (self.root.level, self.amqtt.level)

    def __enter__(self) -> _LogToFile:
        self.root.addHandler(self.handler)
        self.root.setLevel(logging.INFO)
        self.amqtt.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc: object) -> None:
        self.root.removeHandler(self.handler)
        self.handler.close()
        self.root.setLevel(self.saved[0])
        self.amqtt.setLevel(self.saved[1])


def run_demo(options: DemoOptions, console: Console) -> DemoSummary:
    """The whole demo (see the module docstring); raises DemoError with a message for the user."""
    from agent.artifacts import ArtifactWriter
    from agent.pipeline import RecipeInspector
    from agent.recipe import RecipeError, load_recipe
    from agent.report import write_line_summary
    from agent.service.config import CellConfig, MqttConfig, ServiceConfig
    from agent.service.service import InspectionService
    from storage import ResultStore

    config = DEMO_ENROLL_CONFIG
    options.out.mkdir(parents=True, exist_ok=True)
    _fresh_results(options)
    t_start = time.perf_counter()
    with _LogToFile(options.out / LOG_FILE):
        _, reused, _ = prepare_recipe(options, config, console)
        try:
            with console.status("loading the recipe and the feature backbone"):
                inspector = RecipeInspector(load_recipe(options.recipes_dir / options.recipe))
        except (RecipeError, ValueError) as e:
            if not reused:
                raise DemoError(f"the enrolled recipe cannot be loaded: {e}") from None
            console.print(f"[yellow]the cached recipe cannot be loaded[/] ({e}); enrolling again")
            prepare_recipe(dataclasses.replace(options, re_enroll=True), config, console)
            inspector = RecipeInspector(load_recipe(options.recipes_dir / options.recipe))

        def factory(name: str):
            if name != inspector.name:
                raise KeyError(name)
            return inspector

        host, port = parse_broker(options.broker)
        embedded: EmbeddedBroker | None = None
        problem = broker_problem(host, port)
        if problem is None:
            console.print(f"broker: MQTT broker at [bold]{host}:{port}[/]")
        else:
            embedded = EmbeddedBroker().start()
            host, port = embedded.host, embedded.port
            console.print(f"broker: none usable at {options.broker} ({problem});\n        started an embedded one (amqtt {EmbeddedBroker.version()}) "
                          f"on [bold]{host}:{port}[/] for this demo")  # fmt: skip
        agent_client = f"demo-agent-{uuid.uuid4().hex[:10]}"
        service_config = ServiceConfig(
            cells=(CellConfig(options.cell, default_recipe=options.recipe),),
            mqtt=MqttConfig(host=host, port=port, client_id=agent_client),
            database_url=f"sqlite:///{options.db_path}",
            metrics_port=None,
            recipes_dir=options.recipes_dir,
            artifacts_dir=options.artifacts_dir,
            preview_host="127.0.0.1",
            preview_port=options.preview_port,
            shutdown_grace_s=SHUTDOWN_GRACE_S,
        )
        store = ResultStore(service_config.database_url)
        events: queue.Queue = queue.Queue()
        artifacts = ArtifactWriter(options.artifacts_dir)
        observers: list = [artifacts]
        preview = None
        runner: ServiceThread | None = None
        watcher: AgentWatcher | None = None
        publisher: MqttPublisher | None = None
        player: CellPlayer | None = None
        try:
            if options.preview_port is not None:
                from agent.preview.server import LivePreview

                try:
                    preview = LivePreview.start(service_config, store)
                except OSError as e:
                    raise DemoError(f"the live preview cannot serve on 127.0.0.1:{options.preview_port}: {e}") from None
                observers.append(preview.observer)
                console.print(f"live preview: [bold]{preview.server.url}[/] (open it in a browser)")
            service = InspectionService(service_config, factory, store, recipe_names=lambda: [inspector.name], observers=observers)
            runner = ServiceThread(service)
            runner.start()
            watcher = AgentWatcher(host, port, options.cell, events)
            publisher = MqttPublisher(host, port, client_id=f"demo-cell-{uuid.uuid4().hex[:10]}")
            _, parts = plan_demo(options)
            rows = {p.part_id: PartStatus(p.part_id, p.truth, config.expected_views) for p in parts}
            verdicts = [0]
            player = CellPlayer(publisher.publish, parts, options, config, events, lambda: verdicts[0])
            console.print(f"cell [bold]{options.cell}[/]: {len(parts)} simulated {options.recipe} parts, {config.expected_views} views each, "
                          f"{options.size}x{options.size} px; watch with: mosquitto_sub -h {host} -p {port} -v -t 'inspect/{options.cell}/#'")  # fmt: skip
            t0 = time.perf_counter()
            player.start()
            notes: list[str] = []
            with Live(console=console, refresh_per_second=4, transient=False) as live:

                def render() -> Group:
                    elapsed = time.perf_counter() - t0
                    title = f"inspecting on cell {options.cell}: {verdicts[0]}/{len(parts)} verdicts, {elapsed:.0f} s"
                    return Group(parts_table(list(rows.values()), title), *(Text(n, style="yellow") for n in notes[-5:]))

                while verdicts[0] < len(parts):
                    try:
                        kind, message, at = events.get(timeout=0.25)
                    except queue.Empty:
                        if not runner.thread.is_alive():
                            raise DemoError(f"the agent stopped unexpectedly: {runner.error!r} (see {options.out / LOG_FILE})") from None
                        live.update(render())
                        continue
                    if kind == "cell":
                        part_id, state = message
                        row = rows[part_id]
                        if row.verdict is None:
                            row.state = state
                    elif kind == "rendered":
                        part, capture = message
                        append_truth(options.out / TRUTH_FILE, part.part_id, options.recipe, capture)
                        if part.part_id in rows and capture.gt is not None:
                            rows[part.part_id].truth_defects = list(capture.gt.defects)
                    elif kind == "cell_failed":
                        raise DemoError(f"the simulated cell failed: {type(message).__name__}: {message}")
                    elif kind == "progress" and isinstance(message, ProgressMessage) and message.part_id in rows:
                        row = rows[message.part_id]
                        row.views_done = message.views_done
                        row.last_view_score = message.view_score
                        row.view_latency_ms.append(message.latency_ms)
                        row.last_view_at = at
                    elif kind == "verdict" and isinstance(message, Verdict) and message.part_id in rows:
                        row = rows[message.part_id]
                        if row.verdict is None:
                            row.verdict = message
                            row.state = "done"
                            row.verdict_after_ms = None if row.last_view_at is None else (at - row.last_view_at) * 1000
                            verdicts[0] += 1
                    elif kind == "error" and isinstance(message, ErrorMessage):
                        notes.append(f"agent error {message.code}" + (f" (part {message.part_id})" if message.part_id else "") + f": {message.message}")
                    elif kind == "status" and isinstance(message, Status) and message.state == "offline":
                        notes.append("the agent went offline")
                    live.update(render())
            console.print()
            summary = summarise(list(rows.values()), time.perf_counter() - t0)
            with console.status("writing the HTML summary and the part reports"):
                if not artifacts.flush(60):
                    console.print("[yellow]some part files were still being written after 60 s; the reports may lack them[/]")
                try:
                    summary_path = write_line_summary(store, options.artifacts_dir, options.out, title=f"agent demo: {len(parts)} simulated {options.recipe} parts")
                except Exception as e:  # noqa: BLE001 - the results are stored; say what failed and go on
                    log.exception("writing the HTML summary failed")
                    console.print(f"[red]the HTML summary could not be written[/]: {type(e).__name__}: {e} (see {options.out / LOG_FILE})")
                    summary_path = None
            console.print(summary.line())
            _print_next_steps(options, console, summary_path, time.perf_counter() - t_start)
            if preview is not None:  # leave the preview (and its part reports) up until the user is done with it
                try:
                    console.print(f"\nthe live preview stays at [bold]{preview.server.url}[/] until Ctrl-C")
                    while runner.thread.is_alive():
                        time.sleep(0.5)
                except KeyboardInterrupt:
                    pass
        except KeyboardInterrupt:
            console.print(f"[yellow]stopping[/]: the agent records the part in flight as incomplete (up to {SHUTDOWN_GRACE_S:.0f} s)")
            raise
        finally:
            if player is not None:
                player.stop()
                player.join(30)
            stopped = runner.stop() if runner is not None else True
            if preview is not None:
                preview.stop()
            artifacts.close()
            if watcher is not None:
                watcher.close()
            if publisher is not None:
                publisher.close()
            if embedded is not None:
                embedded.stop()
            else:
                forget_client(host, port, f"{agent_client}.{options.cell}", (f"inspect/{options.cell}/status",))
            store.close()
            if not stopped:
                console.print("[red]the agent did not stop in time[/]")
    return summary


def _print_next_steps(options: DemoOptions, console: Console, summary_path: Path | None, seconds: float) -> None:
    db_url = f"sqlite:///{options.db_path}"
    console.print()
    if summary_path is not None:
        console.print(f"HTML summary       {summary_path.resolve().as_uri()}")
        console.print(f"part reports       {options.out / REPORTS_DIR}/")
    console.print(f"results database   {options.db_path}")
    console.print(f"part files         {options.artifacts_dir}/")
    console.print(f"ground truth       {options.out / TRUTH_FILE}")
    console.print(f"log                {options.out / LOG_FILE}")
    console.print(f"done in {seconds:.0f} s. Next:")
    if summary_path is not None:
        console.print(f"  xdg-open {summary_path}")
    console.print(f"  agent results list --db {db_url}")
    console.print(f"  agent results show part-01 --db {db_url}")
    console.print(f"  agent report part-01 --db {db_url} --artifacts {options.artifacts_dir}")


def demo_command(
    recipe: str = typer.Option("stool", "--recipe", help=f"Simulated product: {', '.join(PRODUCTS)}."),
    parts: int = typer.Option(6, "--parts", min=1, help="Parts the simulated cell plays."),
    defective_fraction: float = typer.Option(0.5, "--defective-fraction", min=0.0, max=1.0, help="Share of defective parts (defect types in turn)."),
    out: Path = typer.Option(Path("out/demo"), "--out", help="Folder for the recipe cache, results database, artifacts and summary."),
    broker: str = typer.Option("127.0.0.1:1883", "--broker", help="MQTT broker HOST:PORT; when none answers there, an embedded one is started."),
    size: int = typer.Option(256, "--size", min=32, help="Image width and height in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed: golden part, parts, defects, timing."),
    cell: str = typer.Option("demo", "--cell", help="Cell id: topics are inspect/<cell>/..."),
    speed: float = typer.Option(1.0, "--speed", min=1e-3, help="Robot speed: 2 moves twice as fast as a real robot."),
    re_enroll: bool = typer.Option(False, "--re-enroll", help="Enrol again even when the cached recipe fits."),
    preview_port: int = typer.Option(None, "--preview-port", help="Serve the live preview on this port (0: any free port)."),
    teach_in: int = typer.Option(3, "--teach-in", min=0, help="Nominal parts run through the cell at enrolment to set the threshold (0: leave-views-out)."),
) -> None:
    """One command to see the agent work: enrol a simulated recipe, run the agent, play a simulated cell, show verdicts live."""
    console = Console()
    try:
        options = DemoOptions(recipe=recipe, parts=parts, defective_fraction=defective_fraction, out=out, broker=broker, size=size,
                              seed=seed, cell=cell, speed=speed, re_enroll=re_enroll, preview_port=preview_port,
                              teach_in=teach_in)  # fmt: skip
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        run_demo(options, console)
    except DemoError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped[/yellow]: nothing of the demo is left running; what was inspected is in {options.db_path}")
        raise typer.Exit(130) from None
