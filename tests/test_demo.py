"""`agent demo` (agent/demo.py): a small real run against Mosquitto, the cached recipe, the embedded broker,
Ctrl-C, and the pieces (plan, outcome, cache key, display).

The demo's enrolment is swapped for a tiny one (fast reference, few renders and pseudo-parts, 4 views per
part) and the images are 64 px, so a run takes seconds; everything else is the real thing: simulator,
enrolment, recipe files, service, inspector, MQTT, SQLite.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import numpy as np
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from typer.testing import CliRunner

import agent.demo as demo
from agent.cli import app
from agent.contract import Verdict
from agent.pipeline import EnrollConfig
from storage import ResultStore

REPO = Path(__file__).resolve().parents[1]
TINY_ENROLL = EnrollConfig(model_mode="fast", enrich_renders=2, folds=2, pseudo_parts=4, expected_views=4, init_points=3000)
TINY_ENROLL_CODE = repr(TINY_ENROLL)  # for the Ctrl-C test's subprocess
SIZE = 64
runner = CliRunner()


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    return demo.free_tcp_port()


def demo_args(out: Path, cell: str, broker: str = "127.0.0.1:1883", speed: float = 4.0) -> list[str]:
    return ["demo", "--out", str(out), "--size", str(SIZE), "--parts", "2", "--defective-fraction", "0.5",
            "--seed", "3", "--cell", cell, "--speed", str(speed), "--broker", broker]  # fmt: skip


def parts_in(out: Path) -> dict:
    with ResultStore(f"sqlite:///{out / 'results.db'}", migrate=False) as store:
        return {p.part_id: store.get_part(p.part_id) for p in store.list_parts()}


def demo_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("demo-") and t.is_alive()]


@pytest.fixture(scope="module")
def tiny_enrolment():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "DEMO_ENROLL_CONFIG", TINY_ENROLL)
        yield


@pytest.fixture(scope="module")
def tiny_recipe(tiny_enrolment, tmp_path_factory) -> Path:
    """An out folder with the tiny stool recipe enrolled at 64 px, seed 3, through the demo's own cache."""
    out = tmp_path_factory.mktemp("recipe")
    options = demo.DemoOptions(out=out, size=SIZE, seed=3)
    version, reused, _ = demo.prepare_recipe(options, TINY_ENROLL, Console(file=io.StringIO()))
    assert not reused and version.startswith("sha256:")
    return out


@pytest.fixture(scope="module")
def first_run(tiny_enrolment, tmp_path_factory):
    """One demo run against the real Mosquitto: enrols, inspects 2 parts (1 good, 1 defective)."""
    out = tmp_path_factory.mktemp("demo")
    cell = f"demo{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    result = runner.invoke(app, demo_args(out, cell), env={"COLUMNS": "200"})
    return out, cell, result, time.monotonic() - t0


# ------------------------------------------------------------------------------------------ runs


@pytest.mark.mqtt
def test_demo_enrols_inspects_every_part_and_stores_the_results(first_run):
    out, cell, result, seconds = first_run
    assert result.exit_code == 0, result.output
    assert "broker: MQTT broker at 127.0.0.1:1883" in result.output
    assert "recipe stool: enrolled in" in result.output
    key = json.loads((out / "recipes" / f"stool{demo.CACHE_KEY_SUFFIX}").read_text())
    assert key["key"]["size"] == SIZE and key["key"]["seed"] == 3 and key["key"]["enroll_config"]["model_mode"] == "fast"
    parts = parts_in(out)
    assert sorted(parts) == ["part-01", "part-02"]
    for p in parts.values():  # a verdict for every part, with every view stored
        assert p.verdict is not None and p.verdict.verdict in ("pass", "fail") and p.state == "finalised"
        assert p.verdict.n_views == 4 and len(p.views) == 4 and p.cell == cell and p.recipe == "stool"
        assert p.recipe_version == key["recipe_version"]
    truth = [json.loads(line) for line in (out / "truth.jsonl").read_text().splitlines()]
    assert sorted(t["part_id"] for t in truth) == ["part-01", "part-02"]
    assert sorted(t["label"] for t in truth) == ["good", "stain"]  # 2 x 0.5 defective, defect types in turn
    # the live table's rows and the summary line say the same as the database
    for part_id, p in parts.items():
        row = next(line for line in result.output.splitlines() if line.startswith(f"{part_id} "))
        assert f"{p.verdict.verdict} {p.verdict.score:.2f}" in row and "4/4" in row
    assert re.search(r"2 parts: \d pass, \d fail, 0 incomplete; against the truth \d/2 correct", result.output)
    assert f"agent results list --db sqlite:///{out / 'results.db'}" in result.output
    assert demo_threads() == []


@pytest.mark.mqtt
def test_demo_leaves_part_files_an_html_summary_and_a_clean_broker(first_run):
    out, cell, result, _ = first_run
    assert result.exit_code == 0, result.output
    assert f"HTML summary       {(out / 'summary.html').resolve().as_uri()}" in result.output
    summary = (out / "summary.html").read_text()
    for part_id, p in parts_in(out).items():
        assert part_id in summary
        folder = out / "artifacts" / cell / part_id
        assert json.loads((folder / "verdict.json").read_text())["verdict"] == p.verdict.verdict
        assert sorted(f.name for f in (folder / "maps").glob("*.png")) == [f"{i:03d}.png" for i in range(4)]  # the heatmaps
        assert all(Path(v.anomaly_map_path).is_file() for v in p.views)
        report = (out / "reports" / f"{cell}__{part_id}.html").read_text()
        assert part_id in report and "data:image/png;base64," in report  # self-contained, heatmaps inline
    # the shared broker is left as it was: the agent's retained status is cleared
    retained = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{cell}")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"inspect/{cell}/#")
    client.on_message = lambda c, u, m: retained.append(m.topic)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    time.sleep(0.5)
    client.loop_stop()
    client.disconnect()
    assert retained == []


@pytest.mark.mqtt
def test_second_run_reuses_the_recipe_and_starts_an_embedded_broker(first_run):
    out, cell, first, _ = first_run
    assert first.exit_code == 0, first.output
    manifest = out / "recipes" / "stool" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    port = closed_port()
    result = runner.invoke(app, demo_args(out, cell, broker=f"127.0.0.1:{port}"), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "recipe stool: cached enrolment" in result.output and "enrolled in" not in result.output
    assert manifest.stat().st_mtime_ns == before
    assert f"none usable at 127.0.0.1:{port}" in result.output and "started an embedded one (amqtt" in result.output
    embedded = int(re.search(r"on 127\.0\.0\.1:(\d+) for this demo", result.output).group(1))
    parts = parts_in(out)  # a fresh database: this run's parts only
    assert sorted(parts) == ["part-01", "part-02"] and all(p.verdict is not None for p in parts.values())
    with pytest.raises(OSError):  # the embedded broker is gone
        socket.create_connection(("127.0.0.1", embedded), timeout=1).close()
    assert demo_threads() == []


class DemoProcess:
    """`agent demo` in a subprocess with the tiny enrolment (for signals); ``wait_for(pattern)`` reads its output."""

    def __init__(self, args: list[str]):
        # Ctrl-C must reach it as a terminal's would, also where the test run itself was started with SIGINT ignored (a
        # background job of a non-interactive shell): a Python started so never raises KeyboardInterrupt.
        code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"import agent.demo as d; from agent.pipeline import EnrollConfig; d.DEMO_ENROLL_CONFIG = {TINY_ENROLL_CODE}; from agent.cli import app; app({args!r})")  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        with self._new_line:
            found = self._new_line.wait_for(lambda: re.search(pattern, self.output) or self.proc.poll() is not None, timeout)
        match = re.search(pattern, self.output)
        assert found and match, f"no {pattern!r} in the demo's output:\n{self.output}"
        return match

    def interrupt(self, timeout: float = 90.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.mark.mqtt
@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_records_the_part_in_flight(tiny_recipe, tmp_path):
    shutil.copytree(tiny_recipe / "recipes", tmp_path / "recipes")  # the cached tiny recipe
    cell = f"demo{uuid.uuid4().hex[:8]}"
    run = DemoProcess(demo_args(tmp_path, cell, broker=f"127.0.0.1:{closed_port()}", speed=0.5))  # robot moves 0.6-1.6 s: part-01 is in flight a while
    progress = threading.Event()
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{cell}")
    try:
        port = int(run.wait_for(r"on 127\.0\.0\.1:(\d+) for this demo").group(1))
        watcher.on_connect = lambda c, u, f, rc, p: c.subscribe(f"inspect/{cell}/part/+/progress")
        watcher.on_message = lambda c, u, m: progress.set()
        watcher.connect("127.0.0.1", port)
        watcher.loop_start()
        assert progress.wait(60), run.output  # part-01 is being inspected
        assert run.interrupt() == 130, run.output
    finally:
        watcher.loop_stop()
        run.kill()
    assert "stopping" in run.output and "nothing of the demo is left running" in run.output
    part = parts_in(tmp_path)["part-01"]
    assert part.state == "incomplete" and part.incomplete_reason.startswith("shutdown"), part
    with pytest.raises(OSError):  # the embedded broker stopped with the demo
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.mqtt
@pytest.mark.slow
def test_preview_is_served_during_the_demo_and_after_it_until_ctrl_c(tiny_recipe, tmp_path):
    shutil.copytree(tiny_recipe / "recipes", tmp_path / "recipes")
    run = DemoProcess([*demo_args(tmp_path, f"demo{uuid.uuid4().hex[:8]}"), "--preview-port", "0"])
    try:
        url = run.wait_for(r"live preview: (http://127\.0\.0\.1:\d+) ").group(1)
        assert run.wait_for(r"the live preview stays at (http://\S+) until Ctrl-C").group(1) == url  # after the summary
        assert "HTML summary" in run.output
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200
        assert run.interrupt() == 0, run.output  # ending the preview is the normal end
    finally:
        run.kill()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_bad_options_are_clear_errors(tmp_path):
    for args, message in ((["--recipe", "teapot"], "--recipe must be a simulated product"), (["--broker", "host:port"], "--broker must be HOST:PORT"),
                          (["--cell", "a/b"], "--cell"), (["--defective-fraction", "2"], "defective-fraction")):  # fmt: skip
        result = runner.invoke(app, ["demo", "--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ pieces


def test_plan_mixes_good_and_defective_parts_deterministically():
    options = demo.DemoOptions(parts=6, defective_fraction=0.5, seed=1)
    golden, parts = demo.plan_demo(options)
    assert golden.split == "train" and [p.part_id for p in parts] == [f"part-0{i}" for i in range(1, 7)]
    assert sorted(p.truth for p in parts) == ["burr", "good", "good", "good", "scratch", "stain"]
    again = demo.plan_demo(options)[1]
    assert [(p.part_id, p.truth) for p in again] == [(p.part_id, p.truth) for p in parts]
    other = demo.plan_demo(demo.DemoOptions(parts=6, defective_fraction=0.5, seed=2))[1]
    assert [p.truth for p in other] != [p.truth for p in parts] or [p.job.capture_id for p in other] != [p.job.capture_id for p in parts]
    assert [p.truth for p in demo.plan_demo(demo.DemoOptions(parts=3, defective_fraction=0.0))[1]] == ["good"] * 3


def test_outcome_against_the_truth():
    assert demo.outcome("good", "pass") == "correct" and demo.outcome("dent", "fail") == "correct"
    assert demo.outcome("dent", "pass") == "escape" and demo.outcome("good", "fail") == "false reject"
    assert demo.outcome("good", "incomplete") == "incomplete" and demo.outcome("good", None) is None


def test_cache_key_must_match_and_the_recipe_be_intact(tiny_recipe):
    out = tiny_recipe
    options = demo.DemoOptions(out=out, size=SIZE, seed=3)
    key = demo.recipe_cache_key(options, TINY_ENROLL)
    version = demo.cached_recipe_version(out / "recipes", "stool", key)
    assert version is not None and version.startswith("sha256:")
    again = demo.prepare_recipe(options, TINY_ENROLL, Console(file=io.StringIO()))
    assert again[:2] == (version, True)  # reused, not enrolled again
    for changed in (demo.DemoOptions(out=out, size=SIZE, seed=4), demo.DemoOptions(out=out, size=SIZE + 32, seed=3)):
        assert demo.cached_recipe_version(out / "recipes", "stool", demo.recipe_cache_key(changed, TINY_ENROLL)) is None
    other_config = EnrollConfig(**{**TINY_ENROLL.__dict__, "pseudo_parts": 5})
    assert demo.cached_recipe_version(out / "recipes", "stool", demo.recipe_cache_key(options, other_config)) is None
    assert demo.cached_recipe_version(out / "recipes", "vase", key) is None  # never enrolled


def test_cache_is_not_used_when_the_recipe_files_changed(tmp_path, tiny_recipe):
    shutil.copytree(tiny_recipe / "recipes", tmp_path / "recipes")
    key = demo.recipe_cache_key(demo.DemoOptions(out=tmp_path, size=SIZE, seed=3), TINY_ENROLL)
    assert demo.cached_recipe_version(tmp_path / "recipes", "stool", key) is not None
    with (tmp_path / "recipes" / "stool" / "recipe.toml").open("a") as f:
        f.write("\n# edited\n")
    assert demo.cached_recipe_version(tmp_path / "recipes", "stool", key) is None


def test_live_table_and_summary():
    verdict = Verdict.from_dict({
        "part_id": "part-02", "recipe": "stool", "recipe_version": "sha256:" + "0" * 64, "verdict": "fail", "score": 1.83, "threshold": 1.0,
        "defects": [], "n_views": 12, "placement": {"translation_m": [0.0, 0.0, 0.0], "rotation_deg": 0.0}, "timings_ms": {"total": 9000.0, "per_view_mean": 700.0, "finalise": 80.0},
        "ts": 1.0, "agent_version": "0.1.0",
    })  # fmt: skip
    rows = [
        demo.PartStatus("part-01", "good", 12, state="playing", views_done=3, last_view_score=0.42, view_latency_ms=[900.0, 1100.0]),
        demo.PartStatus("part-02", "dent", 12, state="done", views_done=12, view_latency_ms=[800.0], verdict=verdict, verdict_after_ms=95.0),
        demo.PartStatus("part-03", "good", 12),
    ]
    console = Console(width=120, record=True)
    console.print(demo.parts_table(rows, "title"))
    text = console.export_text()
    line = {r.part_id: next(x for x in text.splitlines() if r.part_id in x) for r in rows}
    assert "3/12" in line["part-01"] and "0.42" in line["part-01"] and "playing" in line["part-01"] and "1000" in line["part-01"]
    assert "fail 1.83" in line["part-02"] and "correct" in line["part-02"] and "95" in line["part-02"]
    assert "/12" not in line["part-03"]
    summary = demo.summarise(rows, 30.0)
    assert summary.verdicts == {"pass": 0, "fail": 1, "incomplete": 0} and summary.outcomes["correct"] == 1
    assert summary.mean_view_latency_ms == pytest.approx(2800.0 / 3) and summary.mean_view_processing_ms == 700.0
    assert "3 parts: 0 pass, 1 fail, 0 incomplete; against the truth 1/3 correct" in summary.line()


def test_a_rejected_defective_part_is_judged_by_where_its_defects_are():
    from agent.capture import DefectGT
    from agent.contract import VerdictDefect

    def verdict(defects):
        return Verdict.from_dict({
            "part_id": "part-01", "recipe": "stool", "recipe_version": "sha256:" + "0" * 64, "verdict": "fail", "score": 1.2, "threshold": 1.0,
            "defects": [d.to_dict() for d in defects], "n_views": 12, "placement": {"translation_m": [0.0, 0.0, 0.0], "rotation_deg": 0.0},
            "timings_ms": {"total": 9000.0, "per_view_mean": 700.0, "finalise": 80.0}, "ts": 1.0, "agent_version": "0.1.0",
        })  # fmt: skip

    near = VerdictDefect(1, (0.10, 0.0, 0.1), (0.095, -0.005, 0.095), (0.105, 0.005, 0.105), 1.2, 3, ("001",))
    far = VerdictDefect(2, (0.0, 0.2, 0.1), (-0.005, 0.195, 0.095), (0.005, 0.205, 0.105), 1.1, 1, ("004",))
    blob = [DefectGT(1, "stain", np.array([0.12, 0.0, 0.1]), 0.008)]  # 15 mm from the near box: within its radius + 1 cm
    assert demo.defect_located([near], blob) and demo.defect_located([far, near], blob)
    assert not demo.defect_located([far], blob) and not demo.defect_located([], blob)
    assert not demo.defect_located([near], [DefectGT(1, "stain", np.array([0.13, 0.0, 0.1]), 0.008)])  # 25 mm: too far
    elsewhere = demo.PartStatus("part-01", "stain", 12, state="done", views_done=12, verdict=verdict([far]), truth_defects=blob)
    found = demo.PartStatus("part-02", "stain", 12, state="done", views_done=12, verdict=verdict([near]), truth_defects=blob)
    assert elsewhere.outcome == "correct" and elsewhere.located is False and found.located is True
    console = Console(width=120, record=True)
    console.print(demo.parts_table([elsewhere, found], "title"))
    lines = console.export_text().splitlines()
    assert "elsewhere" in next(x for x in lines if "part-01" in x) and "correct" in next(x for x in lines if "part-02" in x)
    summary = demo.summarise([elsewhere, found], 10.0)
    assert summary.located == (1, 2) and "(1 of 2 rejected defective parts with a defect where a true one is)" in summary.line()
