"""`agent simulate dataset`: both layouts load back with agent.capture / agent.datasets."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.capture import DEFECT_TYPES
from agent.cli import app
from agent.datasets import list_cell_dataset, load_mad_object
from agent.sim.dataset import plan_parts

ARGS = ["simulate", "dataset", "--recipe", "bracket", "--good", "1", "--defective", "5", "--size", "64",
        "--enroll-views", "6", "--views", "4", "--seed", "5", "--workers", "1", "--teach-in", "1"]


def test_plan_spreads_defects_over_the_types_and_is_seeded_per_part():
    jobs = plan_parts("vase", good=2, defective=7, seed=1)
    assert [j.split for j in jobs] == ["train"] + ["test"] * 9
    assert [j.category for j in jobs[3:]] == list(DEFECT_TYPES) + ["stain", "scratch"]
    assert [j.capture_id for j in jobs if j.category == "stain"] == ["000", "001"]
    again = plan_parts("vase", good=2, defective=7, seed=1)
    assert all(a.seed.generate_state(2).tolist() == b.seed.generate_state(2).tolist() for a, b in zip(jobs, again))
    assert jobs[1].seed.generate_state(2).tolist() != jobs[2].seed.generate_state(2).tolist()


def test_teach_in_parts_are_nominal_train_captures_after_the_golden_part_and_change_no_other_part():
    plain = plan_parts("vase", good=2, defective=3, seed=1)
    jobs = plan_parts("vase", good=2, defective=3, seed=1, teach_in=2)
    teach = [j for j in jobs if j.teach_in]
    assert [(j.split, j.category, j.capture_id) for j in teach] == [("train", "good", "001"), ("train", "good", "002")]
    assert jobs[0].capture_id == "000" and not jobs[0].teach_in
    state = lambda js: [j.seed.generate_state(2).tolist() for j in js]  # noqa: E731
    assert state([j for j in jobs if not j.teach_in]) == state(plain)
    assert not set(map(tuple, state(teach))) & set(map(tuple, state(plain)))
    with pytest.raises(ValueError, match="teach-in"):
        plan_parts("vase", good=2, defective=3, seed=1, teach_in=-1)


def test_cell_layout_round_trips(tmp_path):
    result = CliRunner().invoke(app, ARGS + ["--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    items = list_cell_dataset(tmp_path)
    assert {(i.split, i.category) for i in items} == {("train", "good"), ("test", "good")} | {("test", t) for t in DEFECT_TYPES}
    for item in items:
        capture = item.load()
        gt = capture.gt
        assert gt is not None and gt.label == item.category
        if item.split == "train" and item.capture_id == "000":  # the golden part: enrollment trajectory, no jitter
            assert len(capture.frames) == 6 and np.allclose(gt.T_world_part, np.eye(4))
            continue
        if item.split == "train":  # the teach-in part: a good part run through the cell like a test part
            assert item.capture_id == "001" and item.category == "good" and not gt.defects
            assert len(capture.frames) == 4 and not np.allclose(gt.T_world_part, np.eye(4))
            continue
        assert len(capture.frames) == 4
        frame = capture.frames[0]
        assert frame.image.shape == (64, 64, 3) and frame.depth.shape == (64, 64) and frame.c2w.shape == (4, 4)
        if item.category == "good":
            assert not gt.defects and not (gt.defect_ids > 0).any()
        else:
            assert [d.type for d in gt.defects] == [item.category]
            assert (gt.defect_ids == 1).sum() > 0
            assert sum(f.mask.sum() >= 3 for f in capture.frames) >= 2
    assert (tmp_path / "bracket" / "contact_sheet.png").is_file()


def test_mad_layout_round_trips(tmp_path):
    result = CliRunner().invoke(app, ARGS + ["--out", str(tmp_path), "--protocol", "mad"])
    assert result.exit_code == 0, result.output
    obj = load_mad_object(tmp_path / "bracket")
    assert len(obj.train.frames) == 6 and all(f.c2w is not None for f in obj.train.frames)
    categories = {item.category for item in obj.test}
    assert categories == {"good", *DEFECT_TYPES}
    assert sum(item.category == "good" for item in obj.test) == 4  # every view of the good part
    for item in obj.test:
        image, mask = item.load()
        assert image.shape == (64, 64, 3)
        assert (item.mask_path is None) == (item.category == "good")
        if item.category != "good":
            assert mask.sum() >= 3
    assert (tmp_path / "bracket" / "contact_sheet.png").is_file()


def test_unknown_recipe_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["simulate", "dataset", "--recipe", "chair", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown --recipe chair" in result.output


def test_worker_processes_give_the_same_data_as_one_process():
    from agent.sim.config import SimConfig
    from agent.sim.dataset import simulate_parts

    config = SimConfig(width=48, height=48, enroll_views=3, n_views=2, surface_points=2000)
    jobs = plan_parts("mug", good=1, defective=1, seed=9)
    serial = list(simulate_parts(jobs, config, workers=1))
    parallel = list(simulate_parts(jobs, config, workers=2))
    assert [j.category for j, _ in parallel] == [j.category for j, _ in serial]
    for (_, a), (_, b) in zip(serial, parallel):
        assert all(np.array_equal(fa.image, fb.image) and np.array_equal(fa.mask, fb.mask) for fa, fb in zip(a.frames, b.frames))
        assert np.array_equal(a.gt.surface_points, b.gt.surface_points)
