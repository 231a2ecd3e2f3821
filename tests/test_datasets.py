import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.capture import Capture, CaptureError, Frame, save_capture
from agent.datasets import (
    MAD_SIM_CLASSES,
    MadTestImage,
    cell_capture_dir,
    cell_objects,
    list_cell_dataset,
    load_mad_object,
    mad_objects,
    save_mad_object,
)
from agent.geometry import Intrinsics, look_at


def tiny_capture(seed: int, n: int = 2, size: int = 16) -> Capture:
    rng = np.random.default_rng(seed)
    K = Intrinsics.from_fov(0.7, size, size)
    frames = [
        Frame(
            name=str(i),
            image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            intrinsics=K,
            c2w=look_at([0.5 * math.cos(i), 0.5 * math.sin(i), 0.3], [0, 0, 0]),
        )
        for i in range(n)
    ]
    return Capture(frames=frames)


# --- "cell" protocol ---------------------------------------------------------------------------


def test_cell_dataset_listing(tmp_path):
    layout = [
        ("bracket", "train", "good", "golden"),
        ("bracket", "test", "good", "p002"),
        ("bracket", "test", "stain", "p003"),
        ("bracket", "test", "missing", "p001"),
        ("bracket", "test", "good", "p001"),
        ("housing", "train", "good", "a"),
    ]
    for i, (obj, split, cat, cid) in enumerate(layout):
        save_capture(tiny_capture(i), cell_capture_dir(tmp_path, obj, split, cat, cid))
    (tmp_path / "README.txt").write_text("files beside objects are ignored")

    assert cell_objects(tmp_path) == ["bracket", "housing"]
    items = list_cell_dataset(tmp_path)
    assert [(it.object, it.split, it.category, it.capture_id) for it in items] == [
        ("bracket", "test", "good", "p001"),
        ("bracket", "test", "good", "p002"),
        ("bracket", "test", "missing", "p001"),
        ("bracket", "test", "stain", "p003"),
        ("bracket", "train", "good", "golden"),
        ("housing", "train", "good", "a"),
    ]
    assert items[3].path == tmp_path / "bracket" / "test" / "stain" / "p003"
    assert items[5].path == tmp_path / "housing" / "train" / "a"
    loaded = items[3].load()
    assert np.array_equal(loaded.frames[1].image, tiny_capture(2).frames[1].image)


def test_cell_capture_dir_rejects_bad_names():
    assert cell_capture_dir("/d", "o", "test", "burr", "c1") == Path("/d/o/test/burr/c1")
    with pytest.raises(ValueError, match='category must be "good"'):
        cell_capture_dir("/d", "o", "train", "stain", "c1")
    with pytest.raises(ValueError, match="category must be"):
        cell_capture_dir("/d", "o", "test", "crack", "c1")
    with pytest.raises(ValueError, match="split must be one of"):
        cell_capture_dir("/d", "o", "val", "good", "c1")
    with pytest.raises(ValueError, match="capture_id '../c1' is not a safe"):
        cell_capture_dir("/d", "o", "test", "good", "../c1")


@pytest.mark.parametrize(
    "make, where, problem",
    [
        (lambda r: (r / "o" / "test" / "crack" / "c").mkdir(parents=True), "o/test/crack", 'unknown test category "crack"'),
        (lambda r: (r / "o" / "train" / "c").mkdir(parents=True), "o/train/c/transforms.json", "not a capture folder"),
        (lambda r: (r / "o" / "val").mkdir(parents=True), "o/val", "unexpected folder"),
        (lambda r: (r / "stray").mkdir(), "stray", "neither train/ nor test/"),
    ],
)
def test_cell_layout_errors(tmp_path, make, where, problem):
    save_capture(tiny_capture(0), cell_capture_dir(tmp_path, "o", "train", "good", "golden"))
    make(tmp_path)
    with pytest.raises(CaptureError) as e:
        list_cell_dataset(tmp_path)
    assert where in str(e.value) and problem in str(e.value)


def test_cell_missing_root(tmp_path):
    with pytest.raises(CaptureError, match="dataset folder not found"):
        list_cell_dataset(tmp_path / "nope")


# --- "mad" protocol: a fixture in the real MAD-Sim layout ------------------------------------

ANGLE = 0.6911112070083618  # the NeRF-synthetic camera_angle_x


def _png(path: Path, rgb_or_rgba: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    code = cv2.COLOR_RGBA2BGRA if rgb_or_rgba.shape[-1] == 4 else cv2.COLOR_RGB2BGR
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb_or_rgba, code))


def _white_with_square(size: int, colour, alpha: bool = False) -> np.ndarray:
    img = np.full((size, size, 4 if alpha else 3), 255, dtype=np.uint8)
    if alpha:
        img[..., 3] = 0  # transparent background, garbage colour underneath
        img[..., :3] = 17
        img[8:20, 8:20] = (*colour, 255)
    else:
        img[8:20, 8:20] = colour
    return img


def build_mad_sim_object(root: Path, size: int = 32) -> dict:
    """13Pheonix in the real MAD-Sim layout: non-padded names, mixed file_path forms, RGB and RGBA."""
    obj = root / "13Pheonix"
    poses = [look_at([0.6 * math.cos(a), 0.6 * math.sin(a), 0.4], [0, 0, 0]) for a in (0.0, 1.0, 2.0)]
    _png(obj / "train" / "good" / "0.png", _white_with_square(size, (200, 10, 10)))
    _png(obj / "train" / "good" / "1.png", _white_with_square(size, (10, 200, 10), alpha=True))
    _png(obj / "train" / "good" / "10.png", _white_with_square(size, (10, 10, 200)))
    meta = {
        "camera_angle_x": ANGLE,
        "frames": [
            {"file_path": "train/good/0", "transform_matrix": poses[0].tolist()},
            {"file_path": "./train/good/1.png", "transform_matrix": poses[1].tolist()},
            {"file_path": "./train/good/10", "transform_matrix": poses[2].tolist()},
        ],
    }
    (obj / "transforms.json").write_text(json.dumps(meta))
    _png(obj / "test" / "good" / "0.png", _white_with_square(size, (1, 2, 3)))
    for name in ("10", "2", "0"):
        _png(obj / "test" / "Burrs" / f"{name}.png", _white_with_square(size, (5, 5, 5)))
        mask = np.zeros((size, size), np.uint8)
        mask[10:12, 10:13] = 1  # binary masks: > 0 is defect
        (obj / "ground_truth" / "Burrs").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(obj / "ground_truth" / "Burrs" / f"{name}_mask.png"), mask)
    _png(obj / "test" / "Stains" / "0.png", _white_with_square(size, (90, 60, 30), alpha=True))
    _png(obj / "ground_truth" / "Stains" / "0_mask.png", np.full((size, size, 3), 255, np.uint8))
    return {"dir": obj, "poses": poses}


def test_load_mad_sim_object(tmp_path):
    fx = build_mad_sim_object(tmp_path)
    mad = load_mad_object(fx["dir"])
    assert mad.name == "13Pheonix" and mad.name in MAD_SIM_CLASSES and mad.camera_angle_x == ANGLE
    assert [f.name for f in mad.train.frames] == ["0", "1", "10"]  # transforms.json order
    f_expected = 0.5 * 32 / math.tan(0.5 * ANGLE)
    for frame, pose in zip(mad.train.frames, fx["poses"]):
        assert frame.intrinsics == Intrinsics(f_expected, f_expected, 16.0, 16.0, 32, 32)
        assert np.array_equal(frame.c2w, pose)
        assert frame.image.shape == (32, 32, 3) and frame.image.dtype == np.uint8
    rgba_view = mad.train.frames[1].image
    assert tuple(rgba_view[0, 0]) == (255, 255, 255)  # transparent background composited on white
    assert tuple(rgba_view[10, 10]) == (10, 200, 10)
    assert tuple(mad.train.frames[0].image[10, 10]) == (200, 10, 10)  # RGB order, not BGR

    assert [(t.category, t.name) for t in mad.test] == [
        ("Burrs", "0"), ("Burrs", "2"), ("Burrs", "10"), ("Stains", "0"), ("good", "0"),
    ]  # fmt: skip
    good = mad.test[-1]
    assert good.mask_path is None and not good.is_defective
    image, mask = good.load()
    assert image.shape == (32, 32, 3) and mask.shape == (32, 32) and not mask.any()
    burr = mad.test[1]
    assert burr.mask_path == fx["dir"] / "ground_truth" / "Burrs" / "2_mask.png"
    _, mask = burr.load()
    assert mask.dtype == bool and mask.sum() == 6 and mask[10:12, 10:13].all()
    stain_image, stain_mask = mad.test[3].load()
    assert tuple(stain_image[0, 0]) == (255, 255, 255) and stain_mask.all()
    assert mad_objects(tmp_path) == ["13Pheonix"]


def test_mad_800x800_image(tmp_path):
    obj = tmp_path / "01Gorilla"
    _png(obj / "train" / "good" / "0.png", _white_with_square(800, (1, 2, 3), alpha=True))
    pose = look_at([0, -1.0, 0.5], [0, 0, 0])
    (obj / "transforms.json").write_text(json.dumps({"camera_angle_x": ANGLE, "frames": [{"file_path": "train/good/0", "transform_matrix": pose.tolist()}]}))
    _png(obj / "test" / "good" / "0.png", _white_with_square(800, (1, 2, 3)))
    mad = load_mad_object(obj)
    K = mad.train.frames[0].intrinsics
    assert (K.width, K.height, K.cx, K.cy) == (800, 800, 400.0, 400.0)
    assert math.isclose(K.fx, 400 / math.tan(0.5 * ANGLE)) and K.fx == K.fy
    assert mad.train.frames[0].image.shape == (800, 800, 3)
    assert mad.test[0].load_image().shape == (800, 800, 3)


@pytest.mark.parametrize(
    "breaker, where, problem",
    [
        (lambda o: (o / "ground_truth" / "Burrs" / "2_mask.png").unlink(), "2_mask.png", "mask file not found for test image test/Burrs/2.png"),
        (lambda o: (o / "train" / "good" / "10.png").unlink(), "train/good/10", "image file not found (frames[2].file_path"),
        (lambda o: (o / "transforms.json").write_text(json.dumps({"frames": []})), "transforms.json", 'missing "camera_angle_x"'),
        (lambda o: (o / "transforms.json").write_text("{oops"), "transforms.json", "malformed JSON"),
        (
            lambda o: (o / "transforms.json").write_text(json.dumps({"camera_angle_x": ANGLE, "frames": [{"file_path": "train/good/0"}]})),
            "transforms.json",
            "frames[0] (train/good/0): missing transform_matrix",
        ),
        (
            lambda o: (o / "transforms.json").write_text(
                json.dumps({"camera_angle_x": ANGLE, "frames": [{"file_path": "train/good/0", "transform_matrix": (3 * np.eye(4)).tolist()}]})
            ),
            "transforms.json",
            "transform_matrix last row",
        ),
    ],
)
def test_mad_errors(tmp_path, breaker, where, problem):
    obj = build_mad_sim_object(tmp_path)["dir"]
    breaker(obj)
    with pytest.raises(CaptureError) as e:
        load_mad_object(obj)
    assert where in str(e.value) and problem in str(e.value), str(e.value)


def test_mad_mask_size_mismatch_is_reported_on_load(tmp_path):
    obj = build_mad_sim_object(tmp_path)["dir"]
    cv2.imwrite(str(obj / "ground_truth" / "Burrs" / "0_mask.png"), np.zeros((31, 32), np.uint8))
    item = load_mad_object(obj).test[0]
    with pytest.raises(CaptureError, match="0_mask.png: mask is 32x31 but the image 0.png is 32x32"):
        item.load()


def test_save_mad_object_round_trip(tmp_path):
    train = tiny_capture(5, n=3, size=24)
    train.frames[0].name = "000"  # names on disk are the frame index, not zero-padded
    rng = np.random.default_rng(1)
    burr_mask = rng.random((24, 24)) < 0.2
    tests = (
        t
        for t in [
            MadTestImage("good", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)),
            MadTestImage("Burrs", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), burr_mask),
            MadTestImage("Burrs", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), ~burr_mask),
            MadTestImage("good", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), np.zeros((24, 24), bool)),
        ]
    )  # a generator: items are written as they come
    out = tmp_path / "07Owl"
    save_mad_object(out, train, tests)

    meta = json.loads((out / "transforms.json").read_text())
    assert [f["file_path"] for f in meta["frames"]] == ["train/good/0.png", "train/good/1.png", "train/good/2.png"]
    assert sorted(p.name for p in (out / "ground_truth" / "Burrs").iterdir()) == ["0_mask.png", "1_mask.png"]
    assert not (out / "ground_truth" / "good").exists()

    mad = load_mad_object(out)
    assert [f.name for f in mad.train.frames] == ["0", "1", "2"]
    for a, b in zip(train.frames, mad.train.frames):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.c2w, b.c2w)
        assert math.isclose(a.intrinsics.fx, b.intrinsics.fx, rel_tol=1e-12) and b.intrinsics.cx == 12.0
    assert [(t.category, t.name) for t in mad.test] == [("Burrs", "0"), ("Burrs", "1"), ("good", "0"), ("good", "1")]
    _, m0 = mad.test[0].load()
    _, m1 = mad.test[1].load()
    assert np.array_equal(m0, burr_mask) and np.array_equal(m1, ~burr_mask)


def test_save_mad_object_refuses_what_the_layout_cannot_hold(tmp_path):
    train = tiny_capture(0)
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(CaptureError, match='defect category "Stains" needs a mask'):
        save_mad_object(tmp_path / "a", train, [MadTestImage("Stains", img)])
    with pytest.raises(CaptureError, match="good test image cannot have defect pixels"):
        save_mad_object(tmp_path / "b", train, [MadTestImage("good", img, np.ones((16, 16), bool))])
    with pytest.raises(CaptureError, match='two test images of category "good" are named "x"'):
        save_mad_object(tmp_path / "c", train, [MadTestImage("good", img, name="x"), MadTestImage("good", img, name="x")])
    off_centre = tiny_capture(0)
    off_centre.frames[1].intrinsics = Intrinsics(20.0, 20.0, 7.0, 8.0, 16, 16)
    with pytest.raises(CaptureError, match="principal point at the image centre"):
        save_mad_object(tmp_path / "d", off_centre, [])
    wider = tiny_capture(0)
    wider.frames[1].intrinsics = Intrinsics.from_fov(0.9, 16, 16)
    with pytest.raises(CaptureError, match="camera_angle_x .* differs"):
        save_mad_object(tmp_path / "e", wider, [])
    unposed = tiny_capture(0)
    unposed.frames[0].c2w = None
    with pytest.raises(CaptureError, match="need a pose"):
        save_mad_object(tmp_path / "f", unposed, [])
    assert not (tmp_path / "d" / "transforms.json").exists()


def test_mad_class_names():
    assert len(MAD_SIM_CLASSES) == 20 and MAD_SIM_CLASSES[0] == "01Gorilla" and MAD_SIM_CLASSES[-1] == "20Puppy"
    assert "13Pheonix" in MAD_SIM_CLASSES
