"""deploy/: the files parse, reference what exists, and match the service (metrics, config)."""

from __future__ import annotations

import getpass
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from agent.service import ServiceMetrics, load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_dashboard_queries_only_metrics_the_service_exports():
    metrics = ServiceMetrics()
    server = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    exported = set()
    for name, kind in families.items():
        exported |= {name, f"{name}_total"} if kind == "counter" else {name}
        if kind == "histogram":
            exported |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    dashboard = json.loads((DEPLOY / "grafana/dashboards/edge-agent.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bagent_[a-z_]+", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= exported, (panel["title"], names - exported)
            used |= names
    # and every family of the service is on the dashboard
    assert {n for n in families} <= {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in used} | {n for n in used}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "edge-agent"


def test_compose_and_provisioning_yaml_are_valid_and_reference_existing_files():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"agent", "mosquitto", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
    build = compose["services"]["agent"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana/dashboards/edge-agent.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {ds["datasources"][0]["uid"]}
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/edge-agent.yml").read_text())
    mounted = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    assert mounted[providers["providers"][0]["options"]["path"]] == "./grafana/dashboards"
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    agent_target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
    config = load_config(DEPLOY / "cell.compose.toml")
    assert agent_target == f"agent:{config.metrics_port}" and config.mqtt.host == "mosquitto"


def test_example_configs_load():
    for name in ("cell.toml", "cell.compose.toml"):
        config = load_config(DEPLOY / name)
        assert config.cells[0].id == "cell-1" and config.workers == 1 and config.pose_tolerance_s == pytest.approx(0.020)


def test_systemd_unit_runs_the_agent_with_a_config():
    unit = (DEPLOY / "systemd/edge-agent.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
    assert exec_start[1:3] == ["run", "--config"] and exec_start[0].endswith("/agent")
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.M) and "[Install]" in unit


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus/prometheus.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")
def test_mosquitto_starts_with_the_deploy_config(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = (DEPLOY / "mosquitto/mosquitto.conf").read_text()
    assert re.search(r"^listener 1883$", conf, re.M) and re.search(r"^persistence true$", conf, re.M)
    # the same file, with the port and data directory of this test (and no privilege drop as root)
    conf = conf.replace("listener 1883", f"listener {port} 127.0.0.1").replace("/mosquitto/data/", f"{tmp_path}/")
    (tmp_path / "m.conf").write_text(conf + f"user {getpass.getuser()}\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "m.conf")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("mosquitto did not listen")
    finally:
        proc.terminate()
        proc.wait(10)
    assert (tmp_path / "mosquitto.db").exists()  # persistence on: the database is written at exit
