"""Broker restarts and SIGTERM: no verdict is lost, parts in flight are recorded."""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.service import CellConfig, InspectionService, MqttConfig, ServiceConfig
from storage import ResultStore
from test_service_doubles import Cell, RedPixelInspector, ServiceThread, c2w_at, factory_for, forget_sessions, unique_cell

pytestmark = pytest.mark.mqtt
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A private Mosquitto with persistence on a spare port (the system broker is never restarted)."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.dir = tmp / "mosquitto"
        self.dir.mkdir()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {self.dir}/\n"
            "autosave_interval 1\nlog_dest stderr\n"
            f"user {getpass.getuser()}\n"  # started as root, mosquitto would switch to a user that cannot write here
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=open(self.dir / "log.txt", "ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"mosquitto did not start: {(self.dir / 'log.txt').read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # saves the persistence database
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


def test_broker_restart_in_the_middle_of_a_part_loses_no_verdict(broker, tmp_path):
    cell_id = unique_cell()
    store = ResultStore(f"sqlite:///{tmp_path / 'r.db'}")
    config = ServiceConfig(
        cells=(CellConfig(cell_id),),
        mqtt=MqttConfig(port=broker.port, client_id="agent", reconnect_min_s=0.1, reconnect_max_s=0.5),
        metrics_port=None,
        part_timeout_s=1.0,
    )
    service = InspectionService(config, factory_for(RedPixelInspector()), store, recipe_names=lambda: ["redtest"])
    cell = Cell(cell_id, port=broker.port, persistent=True)  # QoS 1 subscription kept by the broker while it is away
    try:
        with ServiceThread(service):
            cell.start("p1")
            t = time.time()
            cell.frame("p1", "f0", t, c2w=c2w_at(0))
            cell.frame("p1", "f1", t, c2w=c2w_at(1), red=True)
            cell.wait_for("progress", count=2)
            broker.stop()  # the part times out while the broker is down: its verdict waits in the outbox
            time.sleep(1.5)
            assert store.get_part("p1", cell=cell_id).verdict.verdict == "fail"  # stored already
            broker.start()
            verdict = cell.wait_for("verdict", timeout=15)[0]
            assert verdict.part_id == "p1" and verdict.verdict == "fail" and verdict.n_views == 2
            # and a part across a second restart, frames on both sides of it
            cell.start("p2")
            cell.frame("p2", "f0", t, c2w=c2w_at(0))
            cell.wait_for("progress", lambda p: p.part_id == "p2")
            broker.stop()
            broker.start()
            deadline = time.monotonic() + 15
            while not cell.client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.05)
            cell.frame("p2", "f1", t, c2w=c2w_at(1))
            cell.end("p2")
            v2 = cell.wait_for("verdict", lambda v: v.part_id == "p2", timeout=15)[0]
            assert v2.verdict == "pass" and v2.n_views == 2
            assert f'agent_mqtt_reconnects_total{{cell="{cell_id}"}}' in service.metrics.scrape()
        assert len(cell.of("verdict")) == 2
    finally:
        cell.close()
        store.close()


def test_sigterm_records_parts_in_flight_and_goes_offline(tmp_path):
    cell_id = unique_cell()
    db = tmp_path / "r.db"
    config = tmp_path / "cell.toml"
    config.write_text(
        f'[mqtt]\nclient_id = "agent-{cell_id}"\n\n[[cells]]\nid = "{cell_id}"\n\n'
        f'[database]\nurl = "sqlite:///{db}"\n\n[metrics]\nenabled = false\n\n[workers]\nshutdown_grace_s = 0.5\n'
    )
    cell = Cell(cell_id)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.service.cli", "run", "--config", str(config), "--inspector-factory", "test_service_doubles:slow_factory"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        cell.wait_for("status", lambda s: s.state == "online", timeout=30)
        cell.start("p1")
        cell.start("p2")
        t = time.time()
        for i in range(4):
            cell.frame("p1", f"f{i}", t, c2w=c2w_at(i))  # 0.3 s each: still busy when SIGTERM comes
        cell.frame("p2", "f0", t, c2w=c2w_at(0))
        cell.wait_for("progress")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()
        verdicts = {v.part_id: v for v in cell.wait_for("verdict", count=2)}
        assert verdicts["p1"].verdict == "incomplete" and verdicts["p2"].verdict == "incomplete"
        assert any(e.code == "internal" and "shutdown" in e.message for e in cell.errors())
        assert cell.wait_for("status", lambda s: s.state == "offline")
        with ResultStore(f"sqlite:///{db}") as store:
            assert {p.part_id: p.state for p in store.list_parts(cell=cell_id)} == {"p1": "incomplete", "p2": "incomplete"}
            assert all(store.get_part(p, cell=cell_id).incomplete_reason.startswith("shutdown") for p in ("p1", "p2"))
            assert any("shutdown" in e.message for e in store.list_errors(cell=cell_id))
    finally:
        if proc.poll() is None:
            proc.kill()
        cell.close()
        forget_sessions([f"agent-{cell_id}.{cell_id}"])
