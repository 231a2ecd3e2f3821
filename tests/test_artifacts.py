"""Per-part artifact files (agent/artifacts.py): the overlay, the folder layout, the service observer.

Also the builders of a fake inspected part (store rows + artifact files) that tests/test_report.py uses.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import cv2
import numpy as np
import pytest

from agent.artifacts import ArtifactWriter, PartArtifactLayout, map_overlay, read_part_artifacts, write_inspection_output
from agent.capture import Frame
from agent.contract import Placement, Timings, Verdict, VerdictDefect
from agent.fusion import SparseVolume, find_defects
from agent.inspection import InspectionResult, ViewResult
from agent.service.config import config_from_dict
from agent.service.service import VerdictEvent, ViewEvent
from test_service_doubles import K, RedPixelInspector, RedPixelPart, c2w_at

SIZE = 64
VOXEL = 0.004
DEFECT_AT = (0.012, -0.014, 0.022)  # on the box's y = min face


# ------------------------------------------------------------------------------------------- fake data


def view_image(red: bool) -> np.ndarray:
    """A grey 64x64 view with a darker part in the middle; ``red``: with a red blob on it."""
    img = np.full((SIZE, SIZE, 3), 170, np.uint8)
    img[12:52, 16:48] = (90, 95, 100)
    if red:
        cv2.circle(img, (30, 30), 7, (230, 20, 20), -1)
    return img


def view_map(red: bool) -> np.ndarray:
    """The anomaly map of :func:`view_image`: low noise, a blob of 2.5 on the red spot."""
    rng = np.random.default_rng(1 if red else 0)
    score = rng.uniform(0.0, 0.4, (SIZE, SIZE)).astype(np.float32)
    if red:
        yy, xx = np.mgrid[:SIZE, :SIZE]
        score += 2.5 * np.exp(-((xx - 30) ** 2 + (yy - 30) ** 2) / (2 * 5.0**2)).astype(np.float32)
    return score


def fake_volume(with_defect: bool = True) -> SparseVolume:
    """The shell of a 48 x 32 x 40 mm box of 4 mm voxels scoring 0.1 .. 0.6, plus a 3-voxel-wide blob of 1.5 .. 3 at DEFECT_AT."""
    dims = np.array([12, 8, 10])
    ijk = np.stack(np.meshgrid(*[np.arange(d) for d in dims], indexing="ij"), -1).reshape(-1, 3)
    shell = ijk[np.any((ijk == 0) | (ijk == dims - 1), axis=1)]
    rng = np.random.default_rng(0)
    score = rng.uniform(0.1, 0.6, len(shell)).astype(np.float32)
    origin = np.array([-0.024, -0.016, 0.0])
    if with_defect:
        centre = np.floor((np.array(DEFECT_AT) - origin) / VOXEL).astype(int)
        near = np.abs(shell - centre).max(axis=1) <= 1
        score[near] = 3.0 - np.abs(shell[near] - centre).sum(axis=1).astype(np.float32) * 0.5
    return SparseVolume(VOXEL, origin, shell.astype(np.int32), score)


def fake_verdict(part_id: str, volume: SparseVolume | None, frames_with_defect: tuple[str, ...], n_views: int, recipe: str = "redtest") -> tuple[Verdict, InspectionResult]:
    defects = [dataclasses.replace(d, frames=frames_with_defect) for d in find_defects(volume, 1.0)] if volume is not None else []
    score = float(volume.score.max()) if volume is not None else 0.4
    result = InspectionResult("fail" if defects else "pass", score, 1.0, defects, n_views, (0.001, -0.0005, 0.0002), 0.4, 12.0, volume)
    verdict = Verdict(part_id, recipe, "sha256:" + "ab" * 32, result.verdict, score, 1.0, [VerdictDefect.from_region(d) for d in defects], n_views,
                      Placement((0.001, -0.0005, 0.0002), 0.4), Timings(1850.0, 140.0, 12.0), time.time(), "0.1.0")  # fmt: skip
    return verdict, result


def record_fake_part(store, writer: ArtifactWriter | None, cell: str, part_id: str, *, n_views: int = 4, red_views: tuple[int, ...] = (1,),
                     with_volume: bool = True, started: float | None = None) -> Verdict:  # fmt: skip
    """A part in the store (start, views, verdict) and, with a writer, its artifact files (through the observer interface)."""
    started = time.time() if started is None else started
    store.start_part(cell, part_id, "redtest", ts=started, expected_views=n_views, recipe_version="sha256:" + "ab" * 32)
    frames = [f"f{i:02d}" for i in range(n_views)]
    for i, frame_id in enumerate(frames):
        red = i in red_views
        anomaly_map = view_map(red)
        result = ViewResult(frame_id, float(anomaly_map.max()), 120.0 + i, anomaly_map, {"placement": 60.0 + i, "features": 40.0, "fusion": 8.0})
        path = writer.anomaly_map_path(cell, part_id, frame_id) if writer is not None else None
        stored = dataclasses.replace(result, anomaly_map=None)
        store.record_view(cell, part_id, stored, camera_id="cam0", ts=started + 0.1 * (i + 1), c2w=c2w_at(0.1 * i), anomaly_map_path=path)
        if writer is not None:
            frame = Frame(frame_id, view_image(red), K, c2w_at(0.1 * i))
            writer.on_view(ViewEvent(cell, part_id, "redtest", frame, result, i + 1, n_views))
    volume = fake_volume(with_defect=bool(red_views)) if with_volume else None
    verdict, result = fake_verdict(part_id, volume, tuple(frames[i] for i in red_views), n_views)
    assert store.record_verdict(cell, verdict)
    if writer is not None:
        writer.on_verdict(VerdictEvent(cell, verdict, result))
    return verdict


# ------------------------------------------------------------------------------------------- the overlay


def test_map_overlay_outlines_the_regions_at_the_threshold():
    image = view_image(False)
    score = np.zeros((SIZE, SIZE), np.float32)
    score[20:40, 20:40] = 1.5  # one square at the threshold, the rest 0
    out = map_overlay(image, score)
    assert out.shape == image.shape and out.dtype == np.uint8
    white = np.all(out == 255, axis=2)
    assert white[20, 20:40].mean() > 0.5 and white[39, 20:40].mean() > 0.5  # the square's edges are outlined
    assert not white[30, 30] and not white[5, 5]  # inside and far outside are not
    below = map_overlay(image, np.full((SIZE, SIZE), 0.99, np.float32))
    assert not np.all(below == 255, axis=2).any()  # nothing reaches the threshold: no outline
    small = map_overlay(image, score[::2, ::2])  # a map of another size is resized to the image
    assert small.shape == image.shape and np.all(small == 255, axis=2).any()
    with pytest.raises(ValueError, match="uint8"):
        map_overlay(image.astype(np.float32), score)


# ------------------------------------------------------------------------------------------- the observer


def test_artifact_writer_writes_the_spec_layout_from_service_events(store, tmp_path):
    with ArtifactWriter(tmp_path / "art") as writer:
        verdict = record_fake_part(store, writer, "cell-1", "p-0001")
        assert writer.flush(10)
    root = tmp_path / "art" / "cell-1" / "p-0001"
    assert sorted(p.name for p in (root / "maps").iterdir()) == sorted([f"f{i:02d}.{s}" for i in range(4) for s in ("npy", "png")])
    assert sorted(p.name for p in (root / "views").iterdir()) == [f"f{i:02d}.jpg" for i in range(4)]
    assert json.loads((root / "verdict.json").read_text()) == verdict.to_dict()
    volume = SparseVolume.load_npz(root / "anomaly_volume.npz")
    assert len(volume) == len(fake_volume()) and np.array_equal(volume.score, fake_volume().score)
    np.testing.assert_array_equal(np.load(root / "maps" / "f01.npy"), view_map(True))
    overlay = cv2.imread(str(root / "maps" / "f01.png"))
    jpg = cv2.imread(str(root / "views" / "f01.jpg"))
    assert overlay.shape == jpg.shape == (SIZE, SIZE, 3)
    assert np.abs(jpg.astype(int)[..., ::-1] - view_image(True)).mean() < 6  # the observed image (JPEG, RGB)
    # the store names the map file the writer wrote
    part = store.get_part("p-0001", "cell-1")
    assert [v.anomaly_map_path for v in part.views] == [str(root / "maps" / f"f{i:02d}.npy") for i in range(4)]
    # and the folder reads back
    back = read_part_artifacts(root)
    assert back.verdict["verdict"] == "fail" and len(back.volume) == len(volume) and sorted(back.views) == ["f00", "f01", "f02", "f03"]
    assert back.views["f02"].overlay is not None and back.views["f02"].image is not None and back.problems == []
    assert writer.written == 5 and writer.dropped == 0 and writer.failed == 0


def test_artifact_writer_never_blocks_a_full_queue_drops_and_counts(tmp_path, monkeypatch, caplog):
    import agent.artifacts as artifacts

    gate = threading.Event()
    real = artifacts.write_view_artifacts

    def slow_write(*args):
        gate.wait(10)
        real(*args)

    monkeypatch.setattr(artifacts, "write_view_artifacts", slow_write)
    writer = ArtifactWriter(tmp_path / "art", max_queue=2)
    result = ViewResult("f00", 2.0, 1.0, view_map(True), {})
    t0 = time.perf_counter()
    for i in range(6):
        frame = Frame(f"f{i:02d}", view_image(True), K, c2w_at(0))
        writer.on_view(ViewEvent("c", "p", "redtest", frame, result, i + 1, None))
    assert time.perf_counter() - t0 < 0.5  # queued or dropped, never waited for the disk
    assert writer.dropped >= 3 and "dropped" in caplog.text  # 1 being written + 2 queued at most
    gate.set()
    writer.close()
    written = sorted(p.name for p in (tmp_path / "art" / "c" / "p" / "views").iterdir())
    assert len(written) == writer.written == 6 - writer.dropped and writer.failed == 0
    writer.on_view(ViewEvent("c", "p", "redtest", frame, result, 7, None))  # after close: dropped, not raised
    assert writer.dropped == 6 - len(written) + 1


def test_artifact_writer_refuses_ids_that_are_not_safe_path_components(tmp_path):
    writer = ArtifactWriter(tmp_path / "art")
    frame = Frame("f0", view_image(False), K, c2w_at(0))
    result = ViewResult("f0", 0.1, 1.0, None, {})
    for cell, part_id in (("c", "../escape"), ("..", "p"), ("c", "a/b")):
        with pytest.raises(ValueError, match="must match"):
            writer.on_view(ViewEvent(cell, part_id, "redtest", frame, result, 1, None))
    with pytest.raises(ValueError, match="frame_id"):
        writer.on_view(ViewEvent("c", "p", "redtest", dataclasses.replace(frame, name="../../x"), result, 1, None))
    writer.close()
    assert not (tmp_path / "escape").exists() and list((tmp_path / "art").iterdir()) == []
    with pytest.raises(ValueError, match="not a directory"):
        (tmp_path / "file").write_text("x")
        ArtifactWriter(tmp_path / "file")


def test_write_inspection_output_is_the_spec_layout(tmp_path):
    volume = fake_volume()
    verdict, result = fake_verdict("cap-1", volume, ("a",), 2)
    views = [ViewResult("a", 2.5, 100.0, view_map(True)), ViewResult("b", 0.3, 90.0, None)]
    write_inspection_output(tmp_path / "out", verdict, result, views, {"a": view_image(True), "b": view_image(False)})
    layout = PartArtifactLayout(tmp_path / "out")
    assert layout.verdict.is_file() and layout.volume.is_file()
    assert layout.map_npy("a").is_file() and layout.map_png("a").is_file() and not layout.map_npy("b").exists()
    assert layout.view_jpg("a").is_file() and layout.view_jpg("b").is_file()


def test_artifacts_dir_in_the_service_config_is_relative_to_the_file(tmp_path):
    base = {"cells": [{"id": "cell-1"}]}
    assert config_from_dict(base, tmp_path).artifacts_dir is None
    assert config_from_dict({**base, "artifacts": {"dir": "art"}}, tmp_path).artifacts_dir == tmp_path / "art"
    assert config_from_dict({**base, "artifacts": {"dir": "/abs/art"}}, tmp_path).artifacts_dir.as_posix() == "/abs/art"
    from agent.service.config import ConfigError

    with pytest.raises(ConfigError, match="artifacts.dir"):
        config_from_dict({**base, "artifacts": {"dir": ""}}, tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'artifacts.path'"):
        config_from_dict({**base, "artifacts": {"path": "x"}}, tmp_path)


# ------------------------------------------------------------------------------------------- in the service


class MappedRedPart(RedPixelPart):
    """The red-pixel double with an anomaly map per view (red pixels score 2) and a volume."""

    def add_view(self, frame):
        result = super().add_view(frame)
        img = frame.image.astype(np.int16)
        red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
        return dataclasses.replace(result, anomaly_map=red.astype(np.float32) * 2.0)

    def finalise(self):
        return dataclasses.replace(super().finalise(), volume=fake_volume())


@dataclasses.dataclass
class MappedRedInspector(RedPixelInspector):
    part_class: type = MappedRedPart

    def start_part(self, part_id):
        part = self.part_class(self, part_id)
        self.parts[part_id] = part
        return part


def run_two_views(store, tmp_path, inspector, *, red_second: bool) -> tuple[str, list, list]:
    """Part p1 with views f0 and f1 (f1 red when ``red_second``) through the real service with an ArtifactWriter
    under ``tmp_path / "art"``; returns the cell id, the progress messages and the verdicts."""
    from agent.service import CellConfig, InspectionService, MqttConfig, ServiceConfig
    from test_service_doubles import Cell, ServiceThread, factory_for, forget_sessions, unique_cell

    cell_id = unique_cell("art")
    config = ServiceConfig(cells=(CellConfig(cell_id),), mqtt=MqttConfig(client_id=f"agent-{cell_id}", reconnect_min_s=0.1), metrics_port=None, recipes_dir=tmp_path)
    writer = ArtifactWriter(tmp_path / "art")
    service = InspectionService(config, factory_for(inspector), store, recipe_names=lambda: [inspector.name], observers=[writer])
    cell = Cell(cell_id)
    try:
        with ServiceThread(service):
            cell.start("p1", expected_views=2)
            t = time.time()
            cell.frame("p1", "f0", t, c2w=c2w_at(0))
            cell.frame("p1", "f1", t + 0.1, red=red_second, c2w=c2w_at(0.1))
            progress = cell.wait_for("progress", count=2)
            verdicts = cell.wait_for("verdict")
        writer.close()
    finally:
        cell.close()
        forget_sessions([f"agent-{cell_id}.{cell_id}"])
    return cell_id, progress, verdicts


@pytest.mark.mqtt
def test_the_service_writes_artifacts_and_records_the_map_paths(store, tmp_path):
    cell_id, _, verdicts = run_two_views(store, tmp_path, MappedRedInspector(), red_second=True)
    assert verdicts[0].verdict == "fail"
    root = tmp_path / "art" / cell_id / "p1"
    assert json.loads((root / "verdict.json").read_text())["verdict"] == "fail"
    assert (root / "anomaly_volume.npz").is_file() and (root / "maps" / "f1.png").is_file() and (root / "views" / "f0.jpg").is_file()
    assert np.load(root / "maps" / "f1.npy").max() == 2.0
    part = store.get_part("p1", cell_id)
    assert sorted(v.anomaly_map_path for v in part.views) == [str(root / "maps" / "f0.npy"), str(root / "maps" / "f1.npy")]


class RevisingRedPart(MappedRedPart):
    """Scores its first view again at finalise (as a part session does once the placement froze): a revised map."""

    def finalise(self):
        revised = ViewResult(self.frames[0].name, 3.0, 1.0, np.full(self.frames[0].image.shape[:2], 3.0, np.float32), {"rescore": 5.0})
        return dataclasses.replace(super().finalise(), revised_views=[revised])


@pytest.mark.mqtt
def test_the_service_stores_and_writes_the_revised_views(store, tmp_path):
    cell_id, progress, verdicts = run_two_views(store, tmp_path, MappedRedInspector(part_class=RevisingRedPart), red_second=False)
    assert verdicts[0].verdict == "pass"  # the double's verdict; the revision is about the views
    progress = [p.view_score for p in progress]
    assert progress == [0.0, 0.0]  # progress went out as the views were scored
    root = tmp_path / "art" / cell_id / "p1"
    assert np.load(root / "maps" / "f0.npy").max() == 3.0 and np.load(root / "maps" / "f1.npy").max() == 0.0
    assert cv2.imread(str(root / "maps" / "f0.png")) is not None
    views = {v.frame_id: v for v in store.get_part("p1", cell_id).views}
    assert views["f0"].view_score == 3.0 and views["f0"].timings_ms == {"rescore": 5.0}
    assert views["f1"].view_score == 0.0 and views["f0"].anomaly_map_path == str(root / "maps" / "f0.npy")
