"""`agent eval` end to end on tiny simulated datasets: complete reports, the baseline in the same run, JSON round trip,
the table, recipe reuse, the CLI. Metric values themselves are tested in test_metrics.py."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from agent.eval.report import CELL_METRICS, MAD_METRICS, OURS, TYPE_METRICS, EvalReport, print_report, read_report, write_report
from agent.pipeline import EnrollConfig
from agent.sim.config import SimConfig
from agent.sim.dataset import write_dataset
from agent.splat.placement import SingleImagePoseConfig

TINY = EnrollConfig(enrich_renders=4, pseudo_parts=10)


def _sim(root, protocol, good, defective, views, teach_in=0):
    config = SimConfig(width=96, height=96, enroll_views=16, n_views=views, surface_points=5_000, shadows=False)
    write_dataset(root, "stool", good, defective, seed=3, config=config, protocol=protocol, teach_in=teach_in)
    return root


@pytest.fixture(scope="module")
def cell_run(tmp_path_factory):
    from agent.eval.run import EvalOptions, evaluate_cell_dataset

    root = _sim(tmp_path_factory.mktemp("cell"), "cell", good=2, defective=2, views=4, teach_in=2)
    work = tmp_path_factory.mktemp("work")
    stages = []
    options = EvalOptions(fast=True, baseline="patchcore-max", work_dir=work, enroll=TINY)
    report = evaluate_cell_dataset(root, options, lambda s, d, t: stages.append(s))
    return root, work, report, stages


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


@pytest.mark.slow
def test_cell_report_is_complete_with_the_baseline(cell_run):
    _, _, report, stages = cell_run
    assert report.protocol == "cell" and [o.name for o in report.objects] == ["stool"]
    assert report.methods == [OURS, "patchcore-max"]
    assert any("inspecting" in s for s in stages)
    obj = report.objects[0]
    assert obj.recipe["reused"] is False and obj.recipe["voxel_size_m"] > 0
    for name, res in obj.methods.items():
        # 2 good + 2 defective parts with defect masks and ground truth: every metric is defined.
        for key in CELL_METRICS:
            assert _finite(res.metrics[key]), (name, key, res.metrics[key])
            assert 0.0 <= res.metrics[key] <= 1.0
        assert set(res.per_type) == {"stain", "scratch"}  # defect types in turn
        for values in res.per_type.values():
            assert all(_finite(values[k]) for k in TYPE_METRICS), values
        assert sorted(p.label for p in res.parts) == [0, 0, 1, 1]
        for p in res.parts:
            assert _finite(p.score) and p.n_views == 4 and len(p.view_scores) == 4
            assert p.verdict == ("fail" if p.score >= res.threshold else "pass")
            # the evidence at the defect (beyond the spec): only defective parts have it, and it is part of the volume
            if p.label == 0:
                assert p.defect_peak is None and p.elsewhere_peak is None
            else:
                peaks = [v for v in (p.defect_peak, p.elsewhere_peak) if v is not None]
                assert peaks and max(peaks) >= p.score - 1e-6
        L = res.latency
        assert L.n_views == 16 and 0 < L.per_view_ms_p50 <= L.per_view_ms_p95
        assert _finite(L.last_view_to_verdict_ms_mean) and L.last_view_to_verdict_ms_mean > 0
        assert report.mean[name]["i_auroc"] == pytest.approx(res.metrics["i_auroc"])
    assert obj.methods[OURS].threshold == 1.0
    assert "stool: enrolled from train/000; threshold from 2 teach-in parts (train/001, train/002)" in report.notes
    assert obj.recipe["threshold_source"] == "teach-in" and obj.recipe["teach_in_captures"] == ["001", "002"]
    assert {"anomaly_map", "fusion", "placement"} <= set(obj.methods[OURS].latency.stage_ms_mean)
    assert obj.methods["patchcore-max"].threshold > 0
    m = report.machine
    assert m["cores"] >= 1 and m["torch"] and m["cpu_model"] and m["image_size"] == "96x96" and m["device"]


@pytest.mark.slow
def test_cell_report_json_round_trip_and_table(cell_run, tmp_path):
    _, _, report, _ = cell_run
    path = write_report(report, tmp_path / "out" / "report.json")
    back = read_report(path)
    assert back.to_json() == report.to_json()
    assert back.objects[0].methods[OURS].parts[2].score == report.objects[0].methods[OURS].parts[2].score
    from rich.console import Console

    buf = io.StringIO()
    print_report(back, Console(file=buf, width=220))
    text = buf.getvalue()
    assert "stool" in text and "patchcore-max" in text and "latency" in text and "per defect type" in text
    assert f"{100 * report.mean[OURS]['p_auroc']:.1f}" in text


def test_read_report_names_the_file(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="r.json"):
        read_report(bad)


@pytest.mark.slow
def test_cell_recipe_is_reused_while_the_capture_is_unchanged(cell_run):
    from agent.eval.run import EvalOptions, evaluate_cell_dataset

    root, work, first, _ = cell_run
    report = evaluate_cell_dataset(root, EvalOptions(fast=True, work_dir=work, enroll=TINY, refine_placement=False))
    obj = report.objects[0]
    assert obj.recipe["reused"] is True and obj.recipe["version"] == first.objects[0].recipe["version"]
    assert report.methods == [OURS]


def test_unknown_object_and_baseline_are_clear_errors(tmp_path):
    from typer.testing import CliRunner
    import typer

    from agent.eval.cli import eval_command
    from agent.eval.run import EvalOptions

    with pytest.raises(ValueError, match="baseline"):
        EvalOptions(baseline="nope")
    (tmp_path / "ds" / "vase" / "train").mkdir(parents=True)
    app = typer.Typer()
    app.command()(eval_command)
    result = CliRunner().invoke(app, [str(tmp_path / "ds"), "--objects", "stool", "--work-dir", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert "no object stool" in result.output and "vase" in result.output


@pytest.mark.slow
def test_mad_report_scores_single_images_with_the_baseline(tmp_path):
    from agent.eval.run import EvalOptions, evaluate_mad_dataset

    root = _sim(tmp_path / "mad", "mad", good=1, defective=2, views=2)
    options = EvalOptions(fast=True, baseline="patchcore-max", work_dir=tmp_path / "w", mad_pose=SingleImagePoseConfig(n_candidates=1))
    report = evaluate_mad_dataset(root, options)
    assert report.protocol == "mad" and report.methods == [OURS, "patchcore-max"]
    assert report.references["SplatPose (MAD-Sim)"] == {"i_auroc": 93.9, "p_auroc": 99.5}
    for res in report.objects[0].methods.values():
        n_good = sum(p.label == 0 for p in res.parts)
        assert n_good == 2 and len(res.parts) > n_good  # every view of the good part, the defective views that show it
        assert all(_finite(res.metrics[k]) for k in MAD_METRICS), res.metrics
        assert all(p.n_views == 1 and _finite(p.score) for p in res.parts)
        assert res.threshold is None
    back = EvalReport.from_json(report.to_json())
    assert back.to_json() == report.to_json()
    assert np.isfinite(back.objects[0].methods[OURS].latency.per_view_ms_mean)
