"""Service configuration (TOML) and the frame/pose pairing rule, without a broker."""

from __future__ import annotations

import numpy as np
import pytest

from agent.contract import RobotPose
from agent.service import ConfigError, PosePairing, config_from_dict, load_config


def test_full_config_is_read_with_units_and_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "cell.toml").write_text(
        """
[mqtt]
host = "broker"
port = 1884
client_id = "a1"
username = "u"
password = "p"
[[cells]]
id = "c1"
default_recipe = "stool"
[[cells]]
id = "c2"
[pairing]
tolerance_ms = 15
wait_ms = 100
[parts]
timeout_s = 5
[image_uri]
allowed_dirs = ["imgs"]
[queues]
views = 4
[database]
url = "sqlite:///x.db"
[metrics]
port = 9200
[recipes]
dir = "recipes"
[workers]
count = 2
"""
    )
    c = load_config(tmp_path / "cell.toml")
    assert (c.mqtt.host, c.mqtt.port, c.mqtt.client_id, c.mqtt.username) == ("broker", 1884, "a1", "u")
    assert [(x.id, x.default_recipe) for x in c.cells] == [("c1", "stool"), ("c2", None)]
    assert c.pose_tolerance_s == pytest.approx(0.015) and c.pose_wait_s == pytest.approx(0.1) and c.part_timeout_s == 5.0
    assert c.allowed_image_dirs == ((tmp_path / "imgs").resolve(),) and c.recipes_dir == tmp_path / "recipes"
    assert (c.view_queue, c.metrics_port, c.workers, c.database_url) == (4, 9200, 2, "sqlite:///x.db")


def test_defaults():
    c = config_from_dict({"cells": [{"id": "c1"}]})
    assert c.pose_tolerance_s == pytest.approx(0.020) and c.workers == 1 and c.mqtt.port == 1883 and c.metrics_port == 9108
    assert config_from_dict({"cells": [{"id": "c1"}], "metrics": {"enabled": False}}).metrics_port is None


@pytest.mark.parametrize(
    "raw, key",
    [
        ({}, "'cells'"),
        ({"cells": [{"default_recipe": "x"}]}, "'cells[0].id'"),
        ({"cells": [{"id": "bad/id"}]}, "'cells[0].id'"),
        ({"cells": [{"id": "a"}, {"id": "a"}]}, "'cells'"),
        ({"cells": [{"id": "a"}], "mqtt": {"port": 70000}}, "'mqtt.port'"),
        ({"cells": [{"id": "a"}], "mqtt": {"port": "1883"}}, "'mqtt.port'"),
        ({"cells": [{"id": "a"}], "mqtt": {"hots": "x"}}, "'mqtt.hots'"),
        ({"cells": [{"id": "a"}], "mqtt": {"password": "x"}}, "'mqtt.password'"),
        ({"cells": [{"id": "a"}], "pairing": {"tolerance_ms": -1}}, "'pairing.tolerance_ms'"),
        ({"cells": [{"id": "a"}], "parts": {"timeout_s": float("nan")}}, "'parts.timeout_s'"),
        ({"cells": [{"id": "a"}], "workers": {"count": 0}}, "'workers.count'"),
        ({"cells": [{"id": "a"}], "image_uri": {"allowed_dirs": ["/nonexistent/dir"]}}, "'image_uri.allowed_dirs[0]'"),
        ({"cells": [{"id": "a"}], "queues": {"views": True}}, "'queues.views'"),
        ({"cells": [{"id": "a"}], "metrics": {"enabled": "yes"}}, "'metrics.enabled'"),
        ({"cells": [{"id": "a"}], "typo": {}}, "'typo'"),
    ],
)
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(raw)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[mqtt\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "key.toml").write_text('[[cells]]\nid = "a"\n[mqtt]\nport = 0\n')
    with pytest.raises(ConfigError, match=r"key.toml: key 'mqtt.port'"):
        load_config(tmp_path / "key.toml")


def _pose(ts, x, cam="cam0"):
    T = np.eye(4)
    T[0, 3] = x
    return RobotPose(ts, cam, T)


def test_pairing_rule():
    p = PosePairing(tolerance_s=0.02, wait_s=0.25, history=3)
    assert p.match("cam0", 1.0) is None and p.can_still_arrive("cam0", 1.0)
    p.wait("cam0", 1.0, now=100.0, item="early")
    p.wait("cam1", 1.0, now=100.0, item="other camera")
    assert p.add_pose(_pose(0.97, 1)) == []  # 30 ms away
    [(item, pose)] = p.add_pose(_pose(1.004, 2))
    assert item == "early" and pose.c2w[0, 3] == 2
    assert p.waiting_items() == ["other camera"]
    assert p.expire(100.1) == [] and p.expire(100.25) == ["other camera"]
    # nearest within tolerance wins; a pose stream past the frame means no pose can come any more
    p.add_pose(_pose(1.015, 3))
    assert p.match("cam0", 1.012).c2w[0, 3] == 3
    assert not p.can_still_arrive("cam0", 0.9)
    p.wait("cam0", 0.9, now=200.0, item="stale")
    assert p.expire(200.0) == ["stale"]
    # bounded history: the oldest poses are dropped
    assert [q.ts for q in p.poses("cam0")] == [0.97, 1.004, 1.015][-3:]
    p.add_pose(_pose(2.0, 4))
    assert [q.ts for q in p.poses("cam0")] == [1.004, 1.015, 2.0]
    with pytest.raises(ValueError):
        PosePairing(-1, 0.1, 3)
