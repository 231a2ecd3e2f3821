"""Part reports, the line summary, the 3D exports and their commands (agent/report/, agent recipes export-model).

The pages are checked as files: content, embedded images that decode, nothing loaded from the network.
(That a browser shows them is tests/ of the browser checks.)
"""

from __future__ import annotations

import base64
import json
import re

import cv2
import numpy as np
import pytest
from plyfile import PlyData
from typer.testing import CliRunner

from agent.artifacts import ArtifactWriter
from agent.cli import app
from agent.report import render_line_summary, render_part_report, write_line_summary
from agent.report.render import PartNotFoundError, viewer_script
from agent.report.svg import HistoryPoint, nice_ticks, score_history_svg
from agent.report.volume3d import KIND_CENTROID, KIND_CORNER, KIND_VOXEL, anomaly_point_cloud, viewer_payload, write_anomaly_ply
from test_artifacts import DEFECT_AT, fake_verdict, fake_volume, record_fake_part

DATA_IMAGE = re.compile(r'data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)')
NETWORK_LOADS = [
    re.compile(r"<script[^>]*\bsrc\s*=", re.I),  # every script is inline
    re.compile(r"<link[^>]*\bhref\s*=", re.I),  # no stylesheets or preloads
    re.compile(r"""\b(src|href)\s*=\s*["']?\s*(https?:)?//""", re.I),
    re.compile(r"url\(\s*['\"]?\s*(https?:)?//", re.I),
    re.compile(r"@import", re.I),
    re.compile(r"""\b(fetch|importScripts)\s*\(\s*["'`]https?:""", re.I),
]


@pytest.fixture
def line(store, tmp_path):
    """Three parts of cell-1 with files: p-1 pass, p-2 fail (defect seen in f01), p-3 fail (f00, f02); p-4 pass, in the store only."""
    art = tmp_path / "art"
    with ArtifactWriter(art) as writer:
        record_fake_part(store, writer, "cell-1", "p-1", red_views=(), started=1000.0)
        record_fake_part(store, writer, "cell-1", "p-2", red_views=(1,), started=1010.0)
        record_fake_part(store, writer, "cell-1", "p-3", red_views=(0, 2), started=1020.0)
        assert writer.flush(20)
    record_fake_part(store, None, "cell-1", "p-4", red_views=(1,), started=1030.0, with_volume=False)
    return art


def decoded_images(page: str) -> list[np.ndarray]:
    images = []
    for _, payload in DATA_IMAGE.findall(page):
        image = cv2.imdecode(np.frombuffer(base64.b64decode(payload), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.size > 0
        images.append(image)
    return images


def assert_self_contained(page: str) -> None:
    for pattern in NETWORK_LOADS:
        assert not pattern.search(page), f"the page loads something: {pattern.pattern} matches {pattern.search(page).group(0)!r}"


def volume_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="anomaly-volume-data">(.*?)</script>', page, re.S)
    assert m, "no 3D view data in the page"
    return json.loads(m.group(1))


# ------------------------------------------------------------------------------------------- the part report


def test_part_report_shows_verdict_defects_views_plots_and_the_3d_view(store, line):
    page = render_part_report(store, "p-2", artifacts_root=line)
    assert "<title>p-2: fail" in page and 'class="badge fail" id="verdict">fail<' in page
    assert "sha256:abababababab" in page and "redtest" in page  # recipe and its version
    # the defect with its 3D position (mm, world) and the view that saw it
    record = store.get_part("p-2", "cell-1")
    defect = record.verdict.defects[0]
    assert ", ".join(f"{x * 1000:.1f}" for x in defect.centroid) in page
    assert np.allclose(defect.centroid, DEFECT_AT, atol=0.004)
    assert '<a href="#view-f01">f01</a>' in page and '<span class="tag">defect 1</span>' in page
    # every view with its image and heatmap: 4 views x 2 pictures, all decodable
    images = decoded_images(page)
    assert len(images) == 8 and all(im.shape == (64, 64, 3) for im in images)
    for i in range(4):
        assert f'id="view-f{i:02d}"' in page
    # plots: the gauge, the line's score history (3 earlier-or-equal parts) and per-view scores
    assert page.count("<svg") == 3 and "this part" in page and "threshold 1" in page
    assert "last 2 parts up to this one" in page  # p-1 and p-2 (p-3 and p-4 started later)
    # timings and per-stage table
    assert "placement" in page and "1850 ms from its first message" in page
    # the 3D view: the bundled viewer inline, the volume as data
    assert "window.AnomalyViewer" in page and "AnomalyViewer.mount(" in page
    data = volume_data(page)
    n = data["n_volume"]
    assert n == len(fake_volume()) and len(base64.b64decode(data["ijk"])) == 6 * n and len(base64.b64decode(data["rgb"])) == 3 * n
    scores = np.frombuffer(base64.b64decode(data["score"]), "<f4")
    assert np.all(np.diff(scores) >= 0) and data["defects"][0]["id"] == 1 and len(data["cameras"]) == 4
    assert_self_contained(page)


def test_part_report_finds_the_files_through_the_stored_map_paths(store, line):
    page = render_part_report(store, "p-3", cell="cell-1")  # no artifacts root: the store names the maps
    assert len(decoded_images(page)) == 8 and "AnomalyViewer.mount(" in page
    assert page.count('<span class="tag">defect 1</span>') == 2  # f00 and f02 saw it


def test_part_report_without_files_says_so(store, line):
    page = render_part_report(store, "p-4", artifacts_root=line)
    assert "No artifact files for this part" in page and "no image file" in page
    assert decoded_images(page) == [] and "AnomalyViewer" not in page
    assert 'id="verdict">pass<' in page and 'id="view-f01"' in page  # the stored verdict and views are still there
    assert_self_contained(page)


def test_part_report_unknown_part_and_ambiguous_ids(store, line):
    with pytest.raises(PartNotFoundError, match="no part 'nope'"):
        render_part_report(store, "nope")
    record_fake_part(store, None, "cell-2", "p-1", red_views=())
    with pytest.raises(ValueError, match="several cells"):
        render_part_report(store, "p-1")
    assert "cell-2" in render_part_report(store, "p-1", cell="cell-2")


# ------------------------------------------------------------------------------------------- the line summary


def test_write_line_summary_writes_a_page_linking_every_part_report(store, line, tmp_path):
    summary = write_line_summary(store, line, tmp_path / "site")
    assert summary == tmp_path / "site" / "summary.html"
    page = summary.read_text()
    for part_id in ("p-1", "p-2", "p-3", "p-4"):
        href = f"reports/cell-1__{part_id}.html"
        assert f'<a href="{href}">{part_id}</a>' in page
        report = (tmp_path / "site" / href).read_text()
        assert f"Part {part_id}" in report and 'href="../summary.html"' in report
        assert_self_contained(report)
    # heatmap thumbnails of the 3 parts with files, 4 views each, decodable
    thumbs = decoded_images(page)
    assert len(thumbs) == 12 and all(t.shape[0] == 64 for t in thumbs)
    assert "1 of 4 parts have no files" in page
    assert re.search(r'<div class="k">fail</div><div class="v">2</div>', page) and re.search(r'<div class="k">pass</div><div class="v"[^>]*>2</div>', page)
    # point clouds next to the reports of the parts with a volume, linked from them
    assert sorted(p.name for p in (tmp_path / "site" / "reports").glob("*.ply")) == ["cell-1__p-1.ply", "cell-1__p-2.ply", "cell-1__p-3.ply"]
    assert 'href="cell-1__p-2.ply" download' in (tmp_path / "site" / "reports" / "cell-1__p-2.html").read_text()
    # the history in a report links to the sibling reports
    assert 'href="cell-1__p-1.html"' in (tmp_path / "site" / "reports" / "cell-1__p-2.html").read_text()
    assert_self_contained(page)


def test_line_summary_without_artifacts_and_of_chosen_parts(store, line):
    page = render_line_summary(store, None, parts=[("cell-1", "p-2"), ("cell-1", "p-1")], title="Shift A")
    assert "<title>Shift A</title>" in page and "No artifacts folder given" in page
    assert "p-2" in page and "p-1" in page and "p-3" not in page and decoded_images(page) != []  # the store's map paths still find files
    with pytest.raises(PartNotFoundError):
        render_line_summary(store, None, parts=[("cell-1", "nope")])


# ------------------------------------------------------------------------------------------- 3D exports


def test_anomaly_ply_opens_with_colours_scores_and_defect_markers(tmp_path):
    volume = fake_volume()
    verdict, result = fake_verdict("p", volume, ("f1",), 3)
    path = write_anomaly_ply(tmp_path / "p.ply", volume, verdict.defects, 1.0, part="cell-1/p")
    ply = PlyData.read(str(path))
    assert ply.text is False and ply.byte_order == "<" and any("threshold 1" in c for c in ply.comments)
    v = ply["vertex"]
    types = {p.name: p.val_dtype for p in v.properties}
    assert types["red"] == types["green"] == types["blue"] == "u1" and types["x"] == "f4" and types["score"] == "f4"
    assert len(v.data) == len(volume) + 9 * len(verdict.defects) and len(verdict.defects) == 1
    kind, ids, score = np.asarray(v["kind"]), np.asarray(v["defect_id"]), np.asarray(v["score"])
    assert (kind == KIND_VOXEL).sum() == len(volume) and (kind == KIND_CENTROID).sum() == 1 and (kind == KIND_CORNER).sum() == 8
    voxel = kind == KIND_VOXEL
    assert np.array_equal(ids[voxel] == 1, score[voxel] >= 1.0)  # the defect's voxels are exactly those at/above the threshold here
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1)[voxel], volume.centres(), atol=1e-6)
    rgb = np.stack([v["red"], v["green"], v["blue"]], 1).astype(int)
    saturation = rgb.max(1) - rgb.min(1)
    assert saturation[voxel & (ids == 1)].min() > saturation[voxel & (ids == 0)].max()  # defect voxels in full colour, the rest faded
    centroid = np.array([v["x"][kind == KIND_CENTROID][0], v["y"][kind == KIND_CENTROID][0], v["z"][kind == KIND_CENTROID][0]])
    np.testing.assert_allclose(centroid, verdict.defects[0].centroid, atol=1e-6)


def test_viewer_payload_keeps_the_defect_voxels_when_it_subsamples():
    volume = fake_volume()
    defects = fake_verdict("p", volume, (), 1)[0].defects
    data = viewer_payload(volume, defects, 1.0, max_points=60)
    scores = np.frombuffer(base64.b64decode(data["score"]), "<f4")
    assert len(scores) == 60 and data["n_volume"] == len(volume)
    assert (scores >= 1.0).sum() == (volume.score >= 1.0).sum()  # every voxel at/above the threshold kept
    ijk = np.frombuffer(base64.b64decode(data["ijk"]), "<i2").reshape(-1, 3)
    centres = np.asarray(data["origin"]) + (ijk + 0.5) * data["voxel_size"]
    assert np.isin(np.round(centres, 6).view([("", float)] * 3), np.round(volume.centres(), 6).view([("", float)] * 3)).all()
    assert viewer_payload(volume, defects, 1.0, max_points=60) == data  # deterministic


def test_point_cloud_without_defects_has_no_markers():
    cloud = anomaly_point_cloud(fake_volume(with_defect=False), [], 1.0)
    assert len(cloud) == len(fake_volume(with_defect=False)) and set(np.unique(cloud["kind"])) == {KIND_VOXEL}


# ------------------------------------------------------------------------------------------- plots and viewer


def test_nice_ticks_and_history_plot():
    assert nice_ticks(0, 2.16) == [0, 0.5, 1.0, 1.5, 2.0]
    assert nice_ticks(0, 7.3) == [0, 2, 4, 6]
    svg = score_history_svg([HistoryPoint("a", 0.5, "pass"), HistoryPoint("b <x>", None, "incomplete"), HistoryPoint("c", 3.0, "fail", highlight=True, href="c.html")], 1.0)
    assert svg.count("<circle") == 3 and "b &lt;x&gt;" in svg and '<a href="c.html">' in svg and "this part" in svg


def test_the_bundled_viewer_is_packaged_with_its_licence():
    from importlib import resources

    js = viewer_script()
    assert len(js) > 100_000 and "AnomalyViewer" in js and "</script" not in js.lower()
    licences = resources.files("agent.report").joinpath("static/THIRD_PARTY_LICENSES.txt").read_text()
    assert "three" in licences and "MIT License" in licences


# ------------------------------------------------------------------------------------------- commands


def test_agent_report_command(store, line, tmp_path):
    runner = CliRunner()
    db = store.engine.url.render_as_string(hide_password=False)
    out, ply = tmp_path / "r" / "p2.html", tmp_path / "r" / "p2.ply"
    result = runner.invoke(app, ["report", "p-2", "--db", db, "--artifacts", str(line), "--out", str(out), "--ply", str(ply)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "Part p-2" in page and len(decoded_images(page)) == 8 and 'href="p2.ply" download' in page
    assert len(PlyData.read(str(ply))["vertex"].data) == len(fake_volume()) + 9
    # errors: exit 2 with a message
    for args, message in [
        (["report", "nope", "--db", db], "error: no part 'nope'"),
        (["report", "p-4", "--db", db, "--artifacts", str(line), "--ply", str(tmp_path / "x.ply")], "has no anomaly volume"),
        (["report", "p-2", "--db", f"sqlite:///{tmp_path / 'missing.db'}"], "no results database"),
        (["report", "p-2", "--db", db, "--artifacts", str(tmp_path / "nowhere")], "is not a directory"),
        (["report", "p-2", "--db", db, "--out", str(tmp_path)], "is a directory"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (tmp_path / "x.ply").exists()


def test_recipes_export_model_writes_the_3dgs_ply(tmp_path):
    from agent.recipe import save_recipe
    from agent.splat.ply import load_ply
    from test_recipe import make_recipe

    recipe = make_recipe("bracket")
    save_recipe(recipe, tmp_path / "recipes")
    runner = CliRunner()
    out = tmp_path / "model" / "bracket.ply"
    result = runner.invoke(app, ["recipes", "export-model", "bracket", str(out), "--recipes-dir", str(tmp_path / "recipes")])
    assert result.exit_code == 0, result.output
    model = load_ply(out)
    assert len(model) == len(recipe.model) and {p.name for p in PlyData.read(str(out))["vertex"].properties} >= {"f_dc_0", "opacity", "scale_0", "rot_0"}
    result = runner.invoke(app, ["recipes", "export-model", "nope", str(out), "--recipes-dir", str(tmp_path / "recipes")])
    assert result.exit_code == 2 and "error:" in result.output
