"""The MQTT contract: topics, message round trips, every error code, image/depth payloads, the image_uri allow-list."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent import contract as c
from agent.contract import ContractError
from agent.geometry import Intrinsics, look_at

CELL = "cell-1"
H, W = 12, 16


@pytest.fixture()
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


@pytest.fixture()
def K() -> Intrinsics:
    return Intrinsics(20.0, 20.0, W / 2, H / 2, W, H)


@pytest.fixture()
def c2w() -> np.ndarray:
    return look_at(np.array([0.3, -0.2, 0.4]), np.zeros(3))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def frame_payload(rgb: np.ndarray, **extra) -> dict:
    d = {"part_id": "p-1", "frame_id": "000", "ts": 100.0, "image": {"encoding": "png", "data_b64": b64(c.encode_image(rgb))}}
    d.update(extra)
    return {k: v for k, v in d.items() if v is not None}


def raw(d: dict) -> bytes:
    return json.dumps(d).encode()


def expect(code: str, fn, *args, **kwargs) -> ContractError:
    with pytest.raises(ContractError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


FRAME_TOPIC = c.frame_topic(CELL, "cam0")


def make_verdict(**over) -> c.Verdict:
    kw = dict(
        part_id="p-0001",
        recipe="stool",
        recipe_version="sha256:abc",
        verdict="fail",
        score=2.4,
        threshold=1.0,
        defects=[c.VerdictDefect(1, (0.1, 0.2, 0.3), (0.09, 0.19, 0.29), (0.11, 0.21, 0.31), 2.4, 37, ["3", "4"])],
        n_views=12,
        placement=c.Placement((0.001, -0.002, 0.0), 1.2),
        timings_ms=c.Timings(2900.0, 210.0, 120.0),
        ts=1732190000.0,
        agent_version="0.1.0",
    )
    kw.update(over)
    return c.Verdict(**kw)


# ------------------------------------------------------------------------------------------------ topics


def test_topic_builders_and_parser_agree():
    cases = [
        (c.part_start_topic(CELL), "inspect/cell-1/part/start", c.TopicInfo("part_start", CELL)),
        (c.frame_topic(CELL, "cam.A_1"), "inspect/cell-1/camera/cam.A_1/frame", c.TopicInfo("frame", CELL, camera_id="cam.A_1")),
        (c.robot_pose_topic(CELL), "inspect/cell-1/robot/pose", c.TopicInfo("robot_pose", CELL)),
        (c.part_end_topic(CELL), "inspect/cell-1/part/end", c.TopicInfo("part_end", CELL)),
        (c.verdict_topic(CELL), "inspect/cell-1/verdict", c.TopicInfo("verdict", CELL)),
        (c.progress_topic(CELL, "p-9"), "inspect/cell-1/part/p-9/progress", c.TopicInfo("progress", CELL, part_id="p-9")),
        (c.status_topic(CELL), "inspect/cell-1/status", c.TopicInfo("status", CELL)),
        (c.error_topic(CELL), "inspect/cell-1/error", c.TopicInfo("error", CELL)),
    ]
    for built, expected, info in cases:
        assert built == expected
        assert c.parse_topic(built) == info
    # a part called "start" still has a distinct progress topic
    assert c.parse_topic(c.progress_topic(CELL, "start")).kind == "progress"


def test_subscriptions():
    assert c.inbound_subscriptions(CELL) == [
        ("inspect/cell-1/part/start", 1),
        ("inspect/cell-1/camera/+/frame", 1),
        ("inspect/cell-1/robot/pose", 1),
        ("inspect/cell-1/part/end", 1),
    ]
    assert c.cell_filter(CELL) == "inspect/cell-1/#"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "a b", "é", "x" * 129, ".", ".."])
def test_ids_are_validated(bad):
    expect("bad_id", c.check_id, bad)
    expect("bad_id", c.part_start_topic, bad)
    expect("bad_id", c.frame_topic, CELL, bad)


def test_id_limits_accepted():
    assert c.check_id("x" * 128) == "x" * 128
    assert c.check_id("A.b_c-9") == "A.b_c-9"


@pytest.mark.parametrize(
    "topic",
    ["other/cell-1/part/start", "inspect/cell-1", "inspect/cell-1/part/begin", "inspect/cell-1/camera/cam0/image", "inspect/cell-1/part/start/x"],
)
def test_bad_topic(topic):
    expect("bad_topic", c.parse_inbound, topic, b"{}")


def test_bad_id_in_topic(rgb):
    expect("bad_id", c.parse_inbound, "inspect/cell-1/camera/ca m/frame", raw(frame_payload(rgb)))
    expect("bad_id", c.parse_inbound, "inspect/ce ll/part/end", raw({"part_id": "p", "ts": 1.0}))


def test_wrong_cell_and_direction_are_bad_topic():
    end = raw({"part_id": "p", "ts": 1.0})
    expect("bad_topic", c.parse_inbound, c.part_end_topic("other"), end, cell=CELL)
    expect("bad_topic", c.parse_inbound, c.verdict_topic(CELL), make_verdict().to_payload())
    expect("bad_topic", c.parse_outbound, c.part_end_topic(CELL), end)


# ------------------------------------------------------------------------------------------ round trips


def test_part_start_round_trip():
    full = c.PartStart("p-1", "stool", 5.5, expected_views=12, meta={"line": 3})
    back = c.parse_inbound(c.part_start_topic(CELL), full.to_payload())
    assert back == full
    assert json.loads(full.to_payload()) == {"part_id": "p-1", "recipe": "stool", "ts": 5.5, "expected_views": 12, "meta": {"line": 3}}
    minimal = c.PartStart("p-2", "stool", 6)
    back = c.PartStart.from_payload(minimal.to_payload())
    assert back == minimal and back.expected_views is None and back.meta == {}
    assert full.topic_for(CELL) == c.part_start_topic(CELL) and c.PartStart.qos == 1


def test_part_end_and_pose_round_trip(c2w):
    end = c.PartEnd("p-1", 7.25)
    assert c.parse_inbound(c.part_end_topic(CELL), end.to_payload()) == end
    pose = c.RobotPose(8.5, "cam0", c2w)
    back = c.parse_inbound(pose.topic_for(CELL), pose.to_payload())
    assert isinstance(back, c.RobotPose) and back.camera_id == "cam0" and back.ts == 8.5
    np.testing.assert_array_equal(back.c2w, c2w)
    assert set(json.loads(pose.to_payload())) == {"ts", "camera_id", "c2w"}


@pytest.mark.parametrize("depth_encoding", ["npy", "png16mm"])
def test_frame_round_trip_png_with_everything(rgb, K, c2w, depth_encoding):
    depth = np.random.default_rng(1).uniform(0.2, 0.6, size=(H, W)).astype(np.float32)
    depth[0, 0] = 0.0
    msg = c.FrameMessage.from_arrays("p-1", "003", "cam0", 9.0, rgb, intrinsics=K, c2w=c2w, depth=depth, depth_encoding=depth_encoding)
    payload = msg.to_payload()
    assert set(json.loads(payload)) == {"part_id", "frame_id", "ts", "image", "intrinsics", "c2w", "depth"}
    back = c.parse_inbound(msg.topic_for(CELL), payload, cell=CELL)
    assert isinstance(back, c.FrameMessage)
    assert (back.part_id, back.frame_id, back.camera_id, back.ts) == ("p-1", "003", "cam0", 9.0)
    assert back.intrinsics == K
    np.testing.assert_array_equal(back.c2w, c2w)
    np.testing.assert_array_equal(back.rgb, rgb)
    assert back.depth_m.dtype == np.float32 and back.depth_m[0, 0] == 0.0
    tol = 0 if depth_encoding == "npy" else 0.0005 + 1e-6
    np.testing.assert_allclose(back.depth_m, depth, atol=tol, rtol=0)
    assert back.to_dict() == msg.to_dict()


@pytest.mark.parametrize("progressive", [False, True])
def test_frame_jpeg_minimal(progressive):
    jj, ii = np.mgrid[0:H, 0:W]
    rgb = np.stack([ii * 15, jj * 20, np.full_like(ii, 128)], axis=2).astype(np.uint8)  # smooth: JPEG keeps it
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    assert ok
    assert c.image_size("jpeg", buf.tobytes()) == (W, H)
    payload = {"part_id": "p-1", "frame_id": "1", "ts": 1.0, "image": {"encoding": "jpeg", "data_b64": b64(buf.tobytes())}}
    back = c.parse_inbound(FRAME_TOPIC, raw(payload))
    assert back.rgb.shape == (H, W, 3) and back.rgb.dtype == np.uint8
    np.testing.assert_array_equal(back.rgb, cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])
    assert np.abs(back.rgb.astype(int) - rgb.astype(int)).max() < 12  # lossy, but the same picture in RGB order
    assert back.c2w is None and back.intrinsics is None and back.depth is None and back.depth_m is None


def test_grey_png_decodes_to_rgb():
    grey = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    ok, buf = cv2.imencode(".png", grey)
    out = c.decode_image("png", buf.tobytes())
    assert out.shape == (H, W, 3)
    np.testing.assert_array_equal(out[:, :, 0], grey)


def test_rgb_channel_order(rgb):
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    data = c.encode_image(red)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert bgr[0, 0].tolist() == [0, 0, 255]  # a real PNG of a red image
    assert c.decode_image("png", data)[0, 0].tolist() == [255, 0, 0]


def test_verdict_round_trip_and_exact_keys():
    v = make_verdict()
    d = json.loads(v.to_payload())
    assert list(d) == [
        "part_id", "recipe", "recipe_version", "verdict", "score", "threshold", "defects",
        "n_views", "placement", "timings_ms", "ts", "agent_version",
    ]  # fmt: skip
    assert set(d["defects"][0]) == {"id", "centroid", "bbox_min", "bbox_max", "peak_score", "n_voxels", "frames"}
    assert set(d["placement"]) == {"translation_m", "rotation_deg"}
    assert set(d["timings_ms"]) == {"total", "per_view_mean", "finalise"}
    assert d["defects"][0]["frames"] == ["3", "4"] and d["defects"][0]["centroid"] == [0.1, 0.2, 0.3]
    back = c.parse_outbound(c.verdict_topic(CELL), v.to_payload(), cell=CELL)
    assert back == v
    assert v.topic_for(CELL) == "inspect/cell-1/verdict" and c.Verdict.qos == 1


def test_verdict_accepts_numpy_numbers():
    v = make_verdict(score=np.float32(0.5), verdict="pass", defects=[], n_views=np.int64(3), placement=c.Placement(np.zeros(3), np.float64(0.0)))
    d = json.loads(v.to_payload())
    assert d["score"] == 0.5 and d["n_views"] == 3 and d["placement"]["translation_m"] == [0.0, 0.0, 0.0]


def test_incomplete_verdict_may_have_null_score_and_placement():
    v = make_verdict(verdict="incomplete", score=None, placement=None, defects=[], n_views=1)
    d = json.loads(v.to_payload())
    assert d["score"] is None and d["placement"] is None
    assert c.Verdict.from_payload(v.to_payload()) == v
    with pytest.raises(ContractError) as info:
        make_verdict(verdict="pass", score=None).to_payload()
    assert info.value.code == "bad_field" and "score" in info.value.message


def test_progress_status_error_round_trip():
    p = c.Progress("p-1", "004", 0.42, 210.5, 5, 11.0)
    assert p.topic_for(CELL) == "inspect/cell-1/part/p-1/progress" and c.Progress.qos == 0
    assert c.parse_outbound(p.topic_for(CELL), p.to_payload()) == p
    expect("bad_field", c.parse_outbound, c.progress_topic(CELL, "other"), p.to_payload())

    s = c.Status("online", "0.1.0", ["stool", "bracket"], 12.0)
    assert c.Status.qos == 1 and c.Status.retain is True and c.PartStart.retain is False
    assert c.parse_outbound(s.topic_for(CELL), s.to_payload()) == s
    assert json.loads(s.to_payload()) == {"state": "online", "version": "0.1.0", "recipes": ["stool", "bracket"], "ts": 12.0}

    e = ContractError("no_pose", "no pose of cam0 within 20 ms").to_error_message(topic=FRAME_TOPIC, part_id="p-1", ts=13.0)
    assert json.loads(e.to_payload()) == {"ts": 13.0, "code": "no_pose", "message": "no pose of cam0 within 20 ms", "topic": FRAME_TOPIC, "part_id": "p-1"}
    assert c.parse_outbound(e.topic_for(CELL), e.to_payload()) == e
    anon = c.ErrorMessage(14.0, "bad_json", "not JSON", "inspect/cell-1/part/start", None)
    assert json.loads(anon.to_payload())["part_id"] is None
    assert c.ErrorMessage.from_payload(anon.to_payload()) == anon


# ------------------------------------------------------------------------------------------- error codes


def test_error_table_documents_every_code():
    expected = {
        "bad_json", "bad_topic", "missing_field", "bad_field", "bad_id", "bad_base64", "bad_image", "bad_image_size",
        "bad_pose", "bad_intrinsics", "bad_depth", "payload_too_large", "no_pose", "unknown_recipe", "unknown_part",
        "uri_not_allowed", "internal",
    }  # fmt: skip
    assert set(c.ERROR_CODES) == expected
    docs = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    assert docs == c.render_error_table(), "docs/errors.md is stale: regenerate it from agent.contract.render_error_table()"
    for code in expected:
        assert f"| `{code}` |" in docs


def test_unknown_code_is_a_programming_error():
    with pytest.raises(ValueError):
        ContractError("no_such_code", "x")
    again = pickle.loads(pickle.dumps(ContractError("bad_pose", "c2w is not rigid")))
    assert (again.code, again.message) == ("bad_pose", "c2w is not rigid")
    for code in ("no_pose", "unknown_recipe", "unknown_part", "internal"):  # raised by the agent service
        err = ContractError(code, "m")
        assert err.code == code and str(err) == f"{code}: m"
    expect("bad_field", c.ErrorMessage.from_payload, raw({"ts": 1.0, "code": "whatever", "message": "m", "topic": "t", "part_id": None}))


@pytest.mark.parametrize("payload", [b"not json", b"\xff\xfe{}", b"[1, 2]", b'"text"', b""])
def test_bad_json(payload):
    expect("bad_json", c.parse_inbound, c.part_end_topic(CELL), payload)


def test_missing_field(rgb):
    expect("missing_field", c.parse_inbound, c.part_start_topic(CELL), raw({"part_id": "p", "ts": 1.0}))
    expect("missing_field", c.parse_inbound, c.part_end_topic(CELL), raw({"part_id": "p"}))
    expect("missing_field", c.parse_inbound, c.robot_pose_topic(CELL), raw({"ts": 1.0, "camera_id": "cam0"}))
    err = expect("missing_field", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, image={"encoding": "png"})))
    assert "image.data_b64" in err.message
    err = expect("missing_field", c.parse_inbound, FRAME_TOPIC, raw({"part_id": "p", "frame_id": "1", "ts": 1.0}))
    assert "image" in err.message
    d = make_verdict().to_dict()
    del d["timings_ms"]["finalise"]
    err = expect("missing_field", c.parse_outbound, c.verdict_topic(CELL), raw(d))
    assert "timings_ms.finalise" in err.message


@pytest.mark.parametrize(
    "field,value",
    [("expected_views", "3"), ("expected_views", True), ("expected_views", 0), ("expected_views", 2.5), ("ts", "now"), ("ts", -1.0), ("meta", [1])],
)
def test_bad_field_part_start(field, value):
    d = {"part_id": "p", "recipe": "stool", "ts": 1.0, field: value}
    err = expect("bad_field", c.parse_inbound, c.part_start_topic(CELL), raw(d))
    assert field in err.message


def test_bad_field_nan_ts():
    err = expect("bad_field", c.parse_inbound, c.part_end_topic(CELL), b'{"part_id": "p", "ts": NaN}')
    assert "ts" in err.message


def test_bad_field_frame(rgb):
    png = b64(c.encode_image(rgb))
    err = expect("bad_field", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, image={"encoding": "gif", "data_b64": png})))
    assert "image.encoding" in err.message
    err = expect("bad_field", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, image_uri="file:///tmp/x.png")))
    assert "image_uri" in err.message
    err = expect("bad_field", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, depth={"encoding": "exr", "data_b64": png})))
    assert "depth.encoding" in err.message
    expect("bad_field", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, image="abc")))


def test_bad_field_verdict():
    for key, value in [("verdict", "maybe"), ("n_views", -1), ("threshold", "1"), ("defects", {})]:
        d = make_verdict().to_dict()
        d[key] = value
        err = expect("bad_field", c.parse_outbound, c.verdict_topic(CELL), raw(d))
        assert key in err.message
    d = make_verdict().to_dict()
    d["defects"][0]["centroid"] = [1, 2]
    assert "defects[0].centroid" in expect("bad_field", c.Verdict.from_payload, raw(d)).message
    with pytest.raises(ContractError):
        make_verdict(verdict="maybe").to_payload()  # nothing invalid is ever sent


@pytest.mark.parametrize("field,value", [("part_id", "a/b"), ("part_id", ""), ("frame_id", "x" * 129), ("part_id", 7), ("frame_id", "..")])
def test_bad_id_in_payload(rgb, field, value):
    err = expect("bad_id", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, **{field: value})))
    assert field in err.message


def test_bad_id_recipe_and_pose_camera(c2w):
    expect("bad_id", c.parse_inbound, c.part_start_topic(CELL), raw({"part_id": "p", "recipe": "../etc", "ts": 1.0}))
    expect("bad_id", c.parse_inbound, c.robot_pose_topic(CELL), raw({"ts": 1.0, "camera_id": "cam/0", "c2w": c2w.tolist()}))


@pytest.mark.parametrize("data", ["@@@@", "abc", "aGVsbG8=\n", ""])
def test_bad_base64(rgb, data):
    expect("bad_base64", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, image={"encoding": "png", "data_b64": data})))
    expect("bad_base64", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, depth={"encoding": "npy", "data_b64": data})))


def test_bad_image(rgb):
    png = c.encode_image(rgb)
    jpeg = c.encode_image(rgb, "jpeg")
    for encoding, data in [("png", b"hello world, not an image at all"), ("png", jpeg), ("jpeg", png), ("png", png[:60]), ("jpeg", b"\xff\xd8\xff\xe0\x00")]:
        expect("bad_image", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, image={"encoding": encoding, "data_b64": b64(data)})))


def test_bad_image_size(rgb):
    K = Intrinsics(20.0, 20.0, 16.0, 16.0, 32, 32)
    err = expect("bad_image_size", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, intrinsics=c._intrinsics_to_json(K))))
    assert "32x32" in err.message and f"{W}x{H}" in err.message


@pytest.mark.parametrize(
    "make",
    [
        lambda T: T[:3].tolist(),  # 3x4
        lambda T: [row[:3] for row in T.tolist()],  # 4x3
        lambda T: "identity",
        lambda T: [["a"] * 4] * 4,
        lambda T: (T * np.diag([2.0, 2.0, 2.0, 1.0])).tolist(),  # scaled
        lambda T: (T @ np.diag([1.0, 1.0, -1.0, 1.0])).tolist(),  # reflection
        lambda T: (T + np.array([[0, 0.3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])).tolist(),  # shear
        lambda T: T.tolist()[:3] + [[0, 0, 1, 1]],  # last row
        lambda T: [[True, False, False, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
    ],
)
def test_bad_pose(rgb, c2w, make):
    expect("bad_pose", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, c2w=make(c2w))))
    expect("bad_pose", c.parse_inbound, c.robot_pose_topic(CELL), raw({"ts": 1.0, "camera_id": "cam0", "c2w": make(c2w)}))


def test_bad_pose_nan(c2w):
    text = json.dumps({"ts": 1.0, "camera_id": "cam0", "c2w": c2w.tolist()}).replace(str(c2w[0, 3]), "NaN", 1)
    assert "NaN" in text
    err = expect("bad_pose", c.parse_inbound, c.robot_pose_topic(CELL), text.encode())
    assert "NaN" in err.message


@pytest.mark.parametrize(
    "intrinsics",
    [
        {"fx": -20.0, "fy": 20.0, "cx": 8.0, "cy": 6.0, "width": W, "height": H},
        {"fx": 20.0, "fy": 0.0, "cx": 8.0, "cy": 6.0, "width": W, "height": H},
        {"fx": 20.0, "fy": 20.0, "cx": 80.0, "cy": 6.0, "width": W, "height": H},
        {"fx": "20", "fy": 20.0, "cx": 8.0, "cy": 6.0, "width": W, "height": H},
        {"fx": 20.0, "fy": 20.0, "cx": 8.0, "cy": 6.0, "width": 16.5, "height": H},
        {"fx": 20.0, "fy": 20.0, "cx": 8.0, "cy": 6.0, "width": 0, "height": H},
        [20.0, 20.0, 8.0, 6.0],
    ],
)
def test_bad_intrinsics(rgb, intrinsics):
    expect("bad_intrinsics", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, intrinsics=intrinsics)))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_bad_depth(rgb):
    ok, png8 = cv2.imencode(".png", np.zeros((H, W), np.uint8))
    negative = np.full((H, W), 0.3, np.float32)
    negative[2, 2] = -0.1
    nan = np.full((H, W), 0.3, np.float32)
    nan[1, 1] = np.nan
    cases = [
        ("npy", b"not an npy file"),
        ("npy", _npy(np.zeros((H, W), np.int32))),  # millimetres as int: wrong type
        ("npy", _npy(np.zeros((H // 2, W), np.float32))),  # wrong size
        ("npy", _npy(np.zeros((H, W, 1), np.float32))),
        ("npy", _npy(negative)),
        ("npy", _npy(nan)),
        ("npy", _npy(np.array([{"a": 1}], dtype=object))),  # pickles are refused
        ("png16mm", png8.tobytes()),  # 8-bit
        ("png16mm", c.encode_image(rgb)),  # colour
        ("png16mm", _npy(np.zeros((H, W), np.float32))),
    ]
    for encoding, data in cases:
        expect("bad_depth", c.parse_inbound, FRAME_TOPIC, raw(frame_payload(rgb, depth={"encoding": encoding, "data_b64": b64(data)})))


def test_payload_too_large(rgb):
    payload = raw(frame_payload(rgb))
    expect("payload_too_large", c.parse_inbound, FRAME_TOPIC, payload, max_payload_bytes=len(payload) - 1)
    assert c.parse_inbound(FRAME_TOPIC, payload, max_payload_bytes=len(payload)).rgb.shape == (H, W, 3)
    expect("payload_too_large", c.parse_inbound, FRAME_TOPIC, payload, max_image_pixels=H * W - 1)


def test_decompression_bomb_is_refused_before_decoding():
    # A 20000 x 20000 PNG header: only the header is read, so this is fast and allocates nothing big.
    big = np.zeros((1, 1), np.uint8)
    ok, buf = cv2.imencode(".png", big)
    data = bytearray(buf.tobytes())
    data[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")
    assert c.image_size("png", bytes(data)) == (20000, 20000)
    expect("payload_too_large", c.decode_image, "png", bytes(data))


def test_png16mm_depth_round_trip_and_limit():
    depth = np.array([[0.0, 0.0005, 1.2344], [65.535, 0.25, 3.0]], np.float32)
    back = c.decode_depth("png16mm", c.encode_depth(depth, "png16mm"))
    np.testing.assert_allclose(back, np.rint(depth.astype(np.float64) * 1000) / 1000, atol=1e-6)
    with pytest.raises(ValueError):
        c.encode_depth(np.full((2, 2), 70.0), "png16mm")


def test_match_pose(c2w):
    poses = [c.RobotPose(10.000, "cam0", c2w), c.RobotPose(10.015, "cam1", c2w), c.RobotPose(10.500, "cam0", c2w)]
    assert c.match_pose(poses, "cam0", 10.004) is poses[0]
    assert c.match_pose(poses, "cam0", 10.490) is poses[2]
    assert c.match_pose(poses, "cam1", 10.030) is poses[1]
    assert c.match_pose(poses, "cam0", 10.030) is None  # nearest is 30 ms away
    assert c.match_pose(poses, "cam2", 10.0) is None
    assert c.match_pose(poses, "cam0", 10.030, tolerance_s=0.05) is poses[0]


# ------------------------------------------------------------------------------------- image_uri allow-list


@pytest.fixture()
def uri_tree(tmp_path: Path, rgb) -> dict[str, Path]:
    allowed = tmp_path / "allowed"
    secret = tmp_path / "secret"
    (allowed / "sub").mkdir(parents=True)
    secret.mkdir()
    png = c.encode_image(rgb)
    (allowed / "sub" / "ok.png").write_bytes(png)
    (allowed / "photo.jpg").write_bytes(c.encode_image(rgb, "jpeg"))
    (secret / "s.png").write_bytes(png)
    (allowed / "escape.png").symlink_to(secret / "s.png")
    (allowed / "escape_dir").symlink_to(secret, target_is_directory=True)
    (allowed / "inner_link.png").symlink_to(allowed / "sub" / "ok.png")
    (allowed / "notes.txt").write_text("hello")
    return {"allowed": allowed, "secret": secret}


def test_uri_reads_inside_allowed(uri_tree, rgb):
    allowed = uri_tree["allowed"]
    np.testing.assert_array_equal(c.read_image_uri((allowed / "sub" / "ok.png").as_uri(), [allowed]), rgb)
    np.testing.assert_array_equal(c.read_image_uri((allowed / "inner_link.png").as_uri(), [allowed]), rgb)  # link staying inside
    assert c.read_image_uri((allowed / "photo.jpg").as_uri(), [str(allowed)]).shape == (H, W, 3)
    assert c.read_image_uri(f"file://localhost{allowed}/sub/ok.png", [allowed]).shape == (H, W, 3)


def test_uri_through_parse_inbound(uri_tree, rgb, K):
    allowed = uri_tree["allowed"]
    payload = raw({"part_id": "p", "frame_id": "1", "ts": 1.0, "image_uri": (allowed / "sub" / "ok.png").as_uri(), "intrinsics": c._intrinsics_to_json(K)})
    frame = c.parse_inbound(FRAME_TOPIC, payload, allowed_uri_dirs=[allowed])
    np.testing.assert_array_equal(frame.rgb, rgb)
    assert frame.image is None and json.loads(frame.to_payload())["image_uri"].startswith("file://")
    expect("uri_not_allowed", c.parse_inbound, FRAME_TOPIC, payload)  # nothing allowed by default
    expect("uri_not_allowed", c.parse_inbound, FRAME_TOPIC, payload, allowed_uri_dirs=[uri_tree["secret"]])


def test_uri_escapes_are_refused(uri_tree):
    allowed, secret = uri_tree["allowed"], uri_tree["secret"]
    escapes = [
        (secret / "s.png").as_uri(),
        f"file://{allowed}/../secret/s.png",
        f"file://{allowed}/sub/../../secret/s.png",
        f"file://{allowed}/%2e%2e/secret/s.png",  # percent-encoded ..
        (allowed / "escape.png").as_uri(),  # symlinked file pointing outside
        f"file://{allowed}/escape_dir/s.png",  # symlinked directory pointing outside
        f"http://example.com{allowed}/sub/ok.png",
        f"file://otherhost{allowed}/sub/ok.png",
        f"file://{allowed}/sub/ok.png?x=1",
        "sub/ok.png",
        f"file://{allowed}/sub/ok%00.png",
        "file:///etc/passwd",
    ]
    for uri in escapes:
        expect("uri_not_allowed", c.read_image_uri, uri, [allowed])
    expect("uri_not_allowed", c.read_image_uri, (allowed / "sub" / "ok.png").as_uri(), [])


def test_allowed_dir_given_through_a_symlink(uri_tree, tmp_path, rgb):
    link = tmp_path / "link_to_allowed"
    link.symlink_to(uri_tree["allowed"], target_is_directory=True)
    np.testing.assert_array_equal(c.read_image_uri(f"file://{link}/sub/ok.png", [link]), rgb)
    np.testing.assert_array_equal(c.read_image_uri((uri_tree["allowed"] / "sub" / "ok.png").as_uri(), [link]), rgb)


def test_uri_unreadable_files_are_bad_image(uri_tree):
    allowed = uri_tree["allowed"]
    expect("bad_image", c.read_image_uri, (allowed / "missing.png").as_uri(), [allowed])
    expect("bad_image", c.read_image_uri, (allowed / "notes.txt").as_uri(), [allowed])
    expect("bad_image", c.read_image_uri, (allowed / "sub").as_uri(), [allowed])
    fifo = allowed / "fifo.png"
    os.mkfifo(fifo)
    expect("bad_image", c.read_image_uri, fifo.as_uri(), [allowed])  # not a regular file, and no hang
    expect("payload_too_large", c.read_image_uri, (allowed / "sub" / "ok.png").as_uri(), [allowed], max_bytes=10)


def test_error_for_names_the_part_when_it_can():
    topic = c.part_start_topic(CELL)
    payload = raw({"part_id": "p-7", "recipe": "stool", "ts": "yesterday"})
    err = expect("bad_field", c.parse_inbound, topic, payload)
    msg = c.error_for(topic, payload, err, ts=3.0)
    assert msg == c.ErrorMessage(3.0, "bad_field", err.message, topic, "p-7")
    assert c.error_for(topic, b"\xff garbage", err).part_id is None
    assert c.error_for(topic, raw({"part_id": "a/b"}), err).part_id is None
    assert c.ErrorMessage.from_payload(msg.to_payload()) == msg


def test_hostile_json_is_refused_cleanly(c2w):
    expect("bad_json", c.parse_inbound, c.part_end_topic(CELL), b"[" * 100_000 + b"]" * 100_000)
    expect("bad_field", c.parse_inbound, c.part_end_topic(CELL), raw({"part_id": "p", "ts": 10**400}))
    huge = c2w.tolist()
    huge[0][3] = 10**400
    expect("bad_pose", c.parse_inbound, c.robot_pose_topic(CELL), raw({"ts": 1.0, "camera_id": "cam0", "c2w": huge}))
    err = expect("bad_id", c.parse_inbound, c.part_end_topic(CELL), raw({"part_id": "x/" * 100_000, "ts": 1.0}))
    assert len(err.message) < 300  # error messages quote values, cut short


def test_npy_depth_header_is_checked_before_allocating(rgb):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (200_000, 200_000)})
    data = header.getvalue()  # magic + header promising 320 GB, no data
    expect("payload_too_large", c.decode_depth, "npy", data)
    expect("bad_depth", c.decode_depth, "npy", data, max_pixels=None)  # header promises more than the data holds
    small = io.BytesIO()
    np.lib.format.write_array_header_1_0(small, {"descr": "<f4", "fortran_order": False, "shape": (H, W)})
    expect("bad_depth", c.decode_depth, "npy", small.getvalue() + b"\x00" * 10)
