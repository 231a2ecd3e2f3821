import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.capture import (
    Capture,
    CaptureError,
    DefectGT,
    Frame,
    GroundTruth,
    load_capture,
    read_rgb,
    save_capture,
    validate_capture,
)
from agent.geometry import Intrinsics, look_at

W, H = 40, 32  # not square, so a transposed image would be caught


def make_capture(n: int = 3, *, seed: int = 0, depth=True, mask=True, gt=True, poses=True) -> Capture:
    rng = np.random.default_rng(seed)
    K = Intrinsics(50.0, 51.5, 20.25, 15.75, W, H)
    frames = []
    for i in range(n):
        angle = 2 * np.pi * i / n
        c2w = look_at([0.4 * np.cos(angle), 0.4 * np.sin(angle), 0.3], [0.0, 0.0, 0.0]) if poses else None
        frames.append(
            Frame(
                name=f"{i:03d}",
                image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
                intrinsics=K,
                c2w=c2w,
                depth=np.where(rng.random((H, W)) < 0.3, 0.0, rng.uniform(0.2, 0.6, (H, W))).astype(np.float32) if depth else None,
                mask=(rng.random((H, W)) < 0.1) if mask else None,
            )
        )
    truth = None
    if gt:
        points = rng.normal(size=(200, 3)).astype(np.float32)
        ids = np.zeros(200, dtype=np.int32)
        ids[:10], ids[10:15] = 1, 2
        truth = GroundTruth(
            label="stain",
            defects=[
                DefectGT(id=1, type="stain", center=np.array([0.01, -0.02, 0.03]), radius_m=0.008),
                DefectGT(id=2, type="dent", center=np.array([0.0, 0.1, 0.2]), radius_m=0.004),
            ],
            surface_points=points,
            defect_ids=ids,
            T_world_part=look_at([0.001, 0.002, 0.5], [0.0, 0.0, 0.0]),
        )
    return Capture(frames=frames, gt=truth)


def assert_same_capture(a: Capture, b: Capture) -> None:
    assert [f.name for f in a.frames] == [f.name for f in b.frames]
    for fa, fb in zip(a.frames, b.frames):
        assert fa.intrinsics == fb.intrinsics
        assert fb.image.dtype == np.uint8 and np.array_equal(fa.image, fb.image)
        if fa.c2w is None:
            assert fb.c2w is None
        else:
            assert np.array_equal(fa.c2w, fb.c2w)
        if fa.depth is None:
            assert fb.depth is None
        else:
            assert fb.depth.dtype == np.float32 and np.array_equal(fa.depth, fb.depth)
        if fa.mask is None:
            assert fb.mask is None
        else:
            assert fb.mask.dtype == bool and np.array_equal(fa.mask, fb.mask)
    if a.gt is None:
        assert b.gt is None
        return
    assert b.gt.label == a.gt.label
    assert [(d.id, d.type, d.radius_m) for d in a.gt.defects] == [(d.id, d.type, d.radius_m) for d in b.gt.defects]
    for da, db in zip(a.gt.defects, b.gt.defects):
        assert np.array_equal(da.center, db.center)
    assert b.gt.surface_points.dtype == np.float32 and np.array_equal(a.gt.surface_points, b.gt.surface_points)
    assert b.gt.defect_ids.dtype == np.int32 and np.array_equal(a.gt.defect_ids, b.gt.defect_ids)
    assert np.array_equal(a.gt.T_world_part, b.gt.T_world_part)


def test_png_round_trip_is_exact(tmp_path):
    cap = make_capture()
    save_capture(cap, tmp_path / "cap")
    loaded = load_capture(tmp_path / "cap")
    assert loaded.root == tmp_path / "cap"
    assert_same_capture(cap, loaded)
    meta = json.loads((tmp_path / "cap" / "transforms.json").read_text())
    assert meta["camera_model"] == "PINHOLE" and meta["w"] == W and meta["h"] == H and meta["fl_y"] == 51.5
    assert meta["frames"][1] == {
        "file_path": "images/001.png",
        "transform_matrix": cap.frames[1].c2w.tolist(),
        "depth_file_path": "depth/001.npy",
        "mask_path": "masks/001.png",
    }
    mask_png = cv2.imread(str(tmp_path / "cap" / "masks" / "001.png"), cv2.IMREAD_UNCHANGED)
    assert mask_png.dtype == np.uint8 and set(np.unique(mask_png)) <= {0, 255}
    assert {p.name for p in (tmp_path / "cap" / "gt").iterdir()} == {"label.json", "surface_points.npy", "defect_ids.npy", "pose.json"}
    assert validate_capture(tmp_path / "cap").frames[0].name == "000"


def test_round_trip_with_per_frame_intrinsics_and_without_optional_parts(tmp_path):
    cap = make_capture(depth=False, mask=False, gt=False)
    cap.frames[1].intrinsics = Intrinsics(60.0, 60.0, 20.0, 16.0, W, H)
    small = Intrinsics(30.0, 30.0, 10.0, 8.0, 20, 16)
    cap.frames[2].intrinsics = small
    cap.frames[2].image = cap.frames[2].image[:16, :20].copy()
    save_capture(cap, tmp_path / "cap")
    frames = json.loads((tmp_path / "cap" / "transforms.json").read_text())["frames"]
    assert set(frames[0]) == {"file_path", "transform_matrix"}  # shares the top-level intrinsics
    assert frames[1]["fl_x"] == 60.0 and "w" not in frames[1]  # only what differs is repeated
    assert frames[2]["w"] == 20 and frames[2]["h"] == 16
    loaded = load_capture(tmp_path / "cap")
    assert_same_capture(cap, loaded)
    assert not (tmp_path / "cap" / "gt").exists() and not (tmp_path / "cap" / "depth").exists()


def test_per_frame_intrinsics_win_over_global(tmp_path):
    save_capture(make_capture(gt=False), tmp_path / "cap")
    tf = tmp_path / "cap" / "transforms.json"
    meta = json.loads(tf.read_text())
    meta["frames"][0]["fl_x"] = 77.0
    meta["frames"][0]["camera_model"] = "OPENCV"  # nerfstudio's export, fine without distortion
    meta["frames"][0]["k1"] = 0.0
    tf.write_text(json.dumps(meta))
    loaded = load_capture(tmp_path / "cap")
    assert loaded.frames[0].intrinsics.fx == 77.0 and loaded.frames[1].intrinsics.fx == 50.0


def test_jpeg_images(tmp_path):
    cap = make_capture(gt=False)
    cap.frames[0].image = np.full((H, W, 3), (200, 30, 90), dtype=np.uint8)  # flat colour survives JPEG
    save_capture(cap, tmp_path / "cap", image_format="jpg")
    assert (tmp_path / "cap" / "images" / "000.jpg").is_file()
    loaded = load_capture(tmp_path / "cap")
    assert loaded.frames[0].name == "000"
    assert np.abs(loaded.frames[0].image.astype(int) - (200, 30, 90)).max() <= 3  # RGB order kept
    assert np.array_equal(loaded.frames[1].depth, cap.frames[1].depth)
    with pytest.raises(ValueError, match="image_format"):
        save_capture(cap, tmp_path / "other", image_format="bmp")


def test_frames_without_poses(tmp_path):
    save_capture(make_capture(poses=False, gt=False), tmp_path / "cap")
    assert "transform_matrix" not in json.loads((tmp_path / "cap" / "transforms.json").read_text())["frames"][0]
    with pytest.raises(CaptureError) as e:
        load_capture(tmp_path / "cap")
    assert e.value.path.name == "transforms.json" and "missing transform_matrix" in str(e.value)
    loaded = load_capture(tmp_path / "cap", require_poses=False)
    assert all(f.c2w is None for f in loaded.frames)


def test_rgba_and_grey_images_are_read_as_rgb(tmp_path):
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)  # RGB
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1:, :, 3] = 0, 128, 255
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    rgb = read_rgb(tmp_path / "a.png")
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (255, 255, 255)  # transparent -> white background
    assert tuple(rgb[2, 2]) == (10, 20, 30)  # opaque -> unchanged
    assert tuple(rgb[0, 1]) == tuple(round((c * 128 + 255 * 127) / 255) for c in (10, 20, 30))
    cv2.imwrite(str(tmp_path / "g.png"), np.full((4, 5), 77, dtype=np.uint8))
    assert np.all(read_rgb(tmp_path / "g.png") == 77)


def test_capture_error_names_file_and_problem_and_pickles():
    err = CaptureError(Path("/x/images/000.png"), "image file not found")
    assert str(err) == "/x/images/000.png: image file not found"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.path == err.path and again.problem == err.problem


# --- validation: each case breaks one thing in a saved capture --------------------------------


def _edit_json(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _tf(fn):
    return lambda d: _edit_json(d / "transforms.json", fn)


def _frame1(fn):
    return _tf(lambda m: fn(m["frames"][1]))


def _write_png(path: Path, shape) -> None:
    cv2.imwrite(str(path), np.zeros(shape, dtype=np.uint8))


def _scale(m):
    T = np.array(m["frames"][1]["transform_matrix"])
    T[:3, :3] *= 1.1
    m["frames"][1]["transform_matrix"] = T.tolist()


def _set(d: dict, key, value):
    d[key] = value


BROKEN = {
    "no transforms.json": (lambda d: (d / "transforms.json").unlink(), "transforms.json", "file not found"),
    "malformed json": (lambda d: (d / "transforms.json").write_text('{"frames": [}'), "transforms.json", "malformed JSON"),
    "json not an object": (lambda d: (d / "transforms.json").write_text("[1, 2]"), "transforms.json", "top level must be a JSON object"),
    "no frames": (_tf(lambda m: _set(m, "frames", [])), "transforms.json", '"frames" must be a non-empty list'),
    "missing file_path": (_frame1(lambda f: f.pop("file_path")), "transforms.json", "frames[1]: missing file_path"),
    "missing image": (lambda d: (d / "images" / "001.png").unlink(), "001.png", "image file not found"),
    "unreadable image": (lambda d: (d / "images" / "001.png").write_bytes(b"not a png"), "001.png", "cannot read image"),
    "16-bit image": (
        lambda d: cv2.imwrite(str(d / "images" / "001.png"), np.zeros((H, W, 3), np.uint16)),
        "001.png",
        "must be 8-bit, got uint16",
    ),
    "image size": (lambda d: _write_png(d / "images" / "001.png", (H, W + 1, 3)), "001.png", f"image is {W + 1}x{H} but transforms.json says w={W}, h={H}"),
    "depth size": (lambda d: np.save(d / "depth" / "001.npy", np.zeros((H, W - 1), np.float32)), "001.npy", f"depth is {W - 1}x{H} but the image is {W}x{H}"),
    "depth not float": (lambda d: np.save(d / "depth" / "001.npy", np.zeros((H, W), np.int32)), "001.npy", "depth must be a float array"),
    "depth 3-D": (lambda d: np.save(d / "depth" / "001.npy", np.zeros((H, W, 1), np.float32)), "001.npy", "depth must be a 2-D H x W array"),
    "depth NaN": (lambda d: np.save(d / "depth" / "001.npy", np.full((H, W), np.nan, np.float32)), "001.npy", "NaN"),
    "depth negative": (lambda d: np.save(d / "depth" / "001.npy", np.full((H, W), -1.0, np.float32)), "001.npy", "negative"),
    "depth missing": (lambda d: (d / "depth" / "001.npy").unlink(), "001.npy", "depth file not found"),
    "depth garbage": (lambda d: (d / "depth" / "001.npy").write_bytes(b"garbage"), "001.npy", "cannot read depth"),
    "mask size": (lambda d: _write_png(d / "masks" / "001.png", (H - 2, W)), "masks/001.png", f"mask is {W}x{H - 2} but the image is {W}x{H}"),
    "mask missing": (lambda d: (d / "masks" / "001.png").unlink(), "masks/001.png", "mask file not found"),
    "non-rigid transform": (_tf(_scale), "transforms.json", "frames[1] (images/001.png).transform_matrix is not rigid"),
    "NaN transform": (_frame1(lambda f: f["transform_matrix"][0].__setitem__(3, float("nan"))), "transforms.json", "NaN"),
    "transform 3x4": (_frame1(lambda f: f["transform_matrix"].pop()), "transforms.json", "must be 4x4"),
    "transform strings": (_frame1(lambda f: _set(f, "transform_matrix", "eye")), "transforms.json", "must be a 4x4 array of numbers"),
    "missing transform": (_frame1(lambda f: f.pop("transform_matrix")), "transforms.json", "frames[1] (images/001.png): missing transform_matrix"),
    "negative focal": (_frame1(lambda f: _set(f, "fl_x", -5.0)), "transforms.json", "focal lengths must be positive"),
    "principal point": (_tf(lambda m: _set(m, "cx", 500.0)), "transforms.json", "principal point"),
    "missing intrinsic": (_tf(lambda m: m.pop("fl_y")), "transforms.json", 'missing intrinsics key "fl_y"'),
    "intrinsic not a number": (_tf(lambda m: _set(m, "w", "40")), "transforms.json", "frames[0] (images/000.png).w must be a number"),
    "fractional size": (_tf(lambda m: _set(m, "h", 32.5)), "transforms.json", "whole number of pixels"),
    "unknown camera model": (_tf(lambda m: _set(m, "camera_model", "OPENCV_FISHEYE")), "transforms.json", "unknown camera_model 'OPENCV_FISHEYE'"),
    "distortion": (_frame1(lambda f: f.update(camera_model="OPENCV", k1=0.1)), "transforms.json", "lens distortion k1=0.1 is not supported"),
    "duplicate names": (_frame1(lambda f: _set(f, "file_path", "images/000.png")), "transforms.json", 'same frame name "000"'),
    "gt without label": (lambda d: (d / "gt" / "label.json").unlink(), "label.json", "file not found"),
    "gt malformed label": (lambda d: (d / "gt" / "label.json").write_text("{"), "label.json", "malformed JSON"),
    "gt unknown label": (lambda d: _edit_json(d / "gt" / "label.json", lambda m: _set(m, "label", "crack")), "label.json", "\"label\" must be"),
    "gt good with defects": (lambda d: _edit_json(d / "gt" / "label.json", lambda m: _set(m, "label", "good")), "label.json", 'label "good" but "defects" is not empty'),
    "gt defect radius": (lambda d: _edit_json(d / "gt" / "label.json", lambda m: _set(m["defects"][0], "radius_m", 0)), "label.json", "defects[0].radius_m must be positive"),
    "gt defect center": (lambda d: _edit_json(d / "gt" / "label.json", lambda m: _set(m["defects"][1], "center", [1, 2])), "label.json", "defects[1].center must be [x, y, z]"),
    "gt duplicate id": (lambda d: _edit_json(d / "gt" / "label.json", lambda m: _set(m["defects"][1], "id", 1)), "label.json", "id 1 is used twice"),
    "gt points float64": (lambda d: np.save(d / "gt" / "surface_points.npy", np.zeros((200, 3))), "surface_points.npy", "must be float32, got float64"),
    "gt points shape": (lambda d: np.save(d / "gt" / "surface_points.npy", np.zeros((200, 2), np.float32)), "surface_points.npy", "must be N x 3"),
    "gt ids dtype": (lambda d: np.save(d / "gt" / "defect_ids.npy", np.zeros(200, np.int64)), "defect_ids.npy", "must be int32, got int64"),
    "gt ids length": (lambda d: np.save(d / "gt" / "defect_ids.npy", np.zeros(199, np.int32)), "defect_ids.npy", "199 defect ids for 200 surface points"),
    "gt ids unknown": (lambda d: np.save(d / "gt" / "defect_ids.npy", np.full(200, 7, np.int32)), "defect_ids.npy", "defect ids [7] are not defects listed"),
    "gt ids without points": (lambda d: (d / "gt" / "surface_points.npy").unlink(), "defect_ids.npy", "without gt/surface_points.npy"),
    "gt pose not rigid": (lambda d: (d / "gt" / "pose.json").write_text(json.dumps({"T_world_part": (2 * np.eye(4)).tolist()})), "pose.json", "T_world_part last row"),
    "gt pose key": (lambda d: (d / "gt" / "pose.json").write_text("{}"), "pose.json", 'missing "T_world_part"'),
}


@pytest.fixture(scope="module")
def saved_capture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "cap"
    save_capture(make_capture(), path)
    return path


@pytest.mark.parametrize("case", list(BROKEN))
def test_every_validation_error_names_the_file_and_the_problem(case, saved_capture, tmp_path):
    import shutil

    breaker, file_name, problem = BROKEN[case]
    cap = tmp_path / "cap"
    shutil.copytree(saved_capture, cap)
    load_capture(cap)  # intact before breaking
    breaker(cap)
    with pytest.raises(CaptureError) as e:
        load_capture(cap)
    message = str(e.value)
    assert file_name in message, message
    assert problem in message, message
    assert str(e.value.path).endswith(file_name) and e.value.problem in message


def test_missing_capture_folder(tmp_path):
    with pytest.raises(CaptureError, match="capture folder not found"):
        load_capture(tmp_path / "nope")


SAVE_BROKEN = {
    "float image": (lambda c: setattr(c.frames[0], "image", c.frames[0].image.astype(np.float32)), "image must be H x W x 3 uint8"),
    "image vs intrinsics": (lambda c: setattr(c.frames[0], "image", c.frames[0].image[:, :-1]), f"image is {W - 1}x{H} but intrinsics say {W}x{H}"),
    "unsafe name": (lambda c: setattr(c.frames[0], "name", "../x"), "not a safe file stem"),
    "duplicate name": (lambda c: setattr(c.frames[1], "name", "000"), 'two frames are named "000"'),
    "non-rigid pose": (lambda c: setattr(c.frames[0], "c2w", 2 * np.eye(4)), "c2w last row"),
    "int depth": (lambda c: setattr(c.frames[0], "depth", np.zeros((H, W), np.int32)), "depth must be a float"),
    "mask shape": (lambda c: setattr(c.frames[0], "mask", np.zeros((H, W + 1), bool)), "mask shape"),
    "gt ids length": (lambda c: setattr(c.gt, "defect_ids", c.gt.defect_ids[:5]), "lengths must match"),
    "gt type": (lambda c: setattr(c.gt.defects[0], "type", "crack"), "type must be one of"),
}


@pytest.mark.parametrize("case", list(SAVE_BROKEN))
def test_save_checks_everything_before_writing(case, tmp_path):
    cap = make_capture()
    breaker, problem = SAVE_BROKEN[case]
    breaker(cap)
    with pytest.raises(CaptureError, match=None) as e:
        save_capture(cap, tmp_path / "cap")
    assert problem in str(e.value)
    assert not (tmp_path / "cap").exists()
