"""Recipe files: save/load round trip, content hash, rejection of tampered or malformed files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from agent.geometry import Intrinsics, look_at
from agent.memory_bank import MemoryBank
from agent.recipe import (
    BANK_FILE,
    CALIBRATION_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    RECIPE_FILE,
    Calibration,
    Recipe,
    RecipeError,
    RecipeSettings,
    list_recipes,
    load_recipe,
    save_recipe,
    verify_recipe_files,
)
from agent.splat.model import GaussianModel


def make_recipe(name: str = "bracket") -> Recipe:
    rng = np.random.default_rng(0)
    n = 50
    model = GaussianModel.from_activated(
        torch.tensor(rng.normal(0, 0.05, (n, 3)), dtype=torch.float32),
        torch.tensor([[1.0, 0, 0, 0]] * n),
        torch.full((n, 3), 0.004),
        torch.full((n,), 0.6),
        torch.tensor(rng.uniform(0.1, 0.9, (n, 3)), dtype=torch.float32),
    )
    bank = MemoryBank(rng.normal(size=(40, 8)).astype(np.float32), metadata={"backbone": "efficientnet-lite0"})
    settings = RecipeSettings(name=name, camera=Intrinsics(100, 100, 48, 48, 96, 96), voxel_size_m=0.004,
                              backbone="efficientnet-lite0", expected_views=8, min_views=4)  # fmt: skip
    poses = [look_at(np.array([0.5, 0.1 * i, 0.3]), np.zeros(3)) for i in range(3)]
    calibration = Calibration([1.0, 0.2, 0.0], [2.0, 0.5, 0.3], 1.7, [1.1, 1.2], [0.8, 0.8, 0.8], poses,
                              ["000", "001", "002"], 0.003, 1.5, 3)  # fmt: skip
    return Recipe(settings, model, bank, calibration)


@pytest.fixture
def saved(tmp_path):
    recipe = make_recipe()
    root = save_recipe(recipe, tmp_path)
    return recipe, root


def test_round_trip_keeps_every_artefact_and_the_version(saved):
    recipe, root = saved
    assert recipe.version.startswith("sha256:") and len(recipe.version) == 7 + 64
    loaded = load_recipe(root)
    assert loaded.version == recipe.version
    assert loaded.settings == recipe.settings
    assert torch.allclose(loaded.model.means, recipe.model.means)
    np.testing.assert_array_equal(loaded.bank.features, recipe.bank.features)
    assert loaded.calibration.raw_threshold == pytest.approx(1.7)
    np.testing.assert_allclose(loaded.calibration.enrollment_poses[2], recipe.calibration.enrollment_poses[2])


def test_version_changes_with_content(tmp_path):
    a = make_recipe()
    save_recipe(a, tmp_path / "a")
    b = make_recipe()
    b.calibration.raw_threshold = 1.8
    save_recipe(b, tmp_path / "b")
    assert a.version != b.version


@pytest.mark.parametrize("name", [RECIPE_FILE, MODEL_FILE, BANK_FILE, CALIBRATION_FILE])
def test_tampered_artefact_is_rejected_naming_the_file(saved, name):
    _, root = saved
    with open(root / name, "ab") as f:
        f.write(b" ")
    with pytest.raises(RecipeError, match=name.replace(".", r"\.") + ".*sha256 does not match"):
        load_recipe(root)


def test_missing_artefact_and_manifest_problems(saved):
    _, root = saved
    (root / BANK_FILE).unlink()
    with pytest.raises(RecipeError, match=f"{BANK_FILE}: file listed in the manifest is missing"):
        load_recipe(root)
    (root / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(RecipeError, match=f"{MANIFEST_FILE}: malformed JSON"):
        verify_recipe_files(root)
    (root / MANIFEST_FILE).unlink()
    with pytest.raises(RecipeError, match="manifest not found"):
        load_recipe(root)


def _rewrite(root, name: str, text: str) -> None:
    """Replace an artefact and re-sign the manifest, as a careless hand edit with a fixed manifest would."""
    from agent.recipe import sha256_file

    (root / name).write_text(text)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    manifest["files"][name] = sha256_file(root / name)
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_malformed_but_hash_consistent_files_are_rejected_clearly(saved):
    _, root = saved
    original = (root / RECIPE_FILE).read_text()
    _rewrite(root, RECIPE_FILE, original.replace("voxel_size_m = 0.004", "voxel_size_m = -1.0"))
    with pytest.raises(RecipeError, match=f"{RECIPE_FILE}: voxel_size_m must be"):
        load_recipe(root)
    _rewrite(root, RECIPE_FILE, original.replace('backbone = "efficientnet-lite0"', 'backbone = "resnet9000"'))
    with pytest.raises(RecipeError, match="backbone must be one of"):
        load_recipe(root)
    _rewrite(root, RECIPE_FILE, "name = [")
    with pytest.raises(RecipeError, match=f"{RECIPE_FILE}: malformed TOML"):
        load_recipe(root)
    _rewrite(root, RECIPE_FILE, original)
    calibration = json.loads((root / CALIBRATION_FILE).read_text())
    calibration["channel_scale"] = [1.0, -2.0, 1.0]
    _rewrite(root, CALIBRATION_FILE, json.dumps(calibration))
    with pytest.raises(RecipeError, match=f"{CALIBRATION_FILE}: malformed calibration: channel_scale must be > 0"):
        load_recipe(root)
    calibration["channel_scale"] = [1.0, 2.0, 1.0]
    calibration["teach_in_part_scores"] = [0.5, float("nan")]
    _rewrite(root, CALIBRATION_FILE, json.dumps(calibration))
    with pytest.raises(RecipeError, match="teach_in_part_scores must be finite"):
        load_recipe(root)
    calibration["teach_in_part_scores"] = []
    calibration["enrollment_poses"][0][0][0] = 3.0
    _rewrite(root, CALIBRATION_FILE, json.dumps(calibration))
    with pytest.raises(RecipeError, match="enrollment_poses\\[0\\] is not rigid"):
        load_recipe(root)
    # a recipe enrolled before the missing-material surface channel: three surface scales, no channel list
    old = make_recipe().calibration.to_json()
    del old["surface_channels"]
    old["surface_channel_scale"] = [1.0, 1.0, 1.0]
    _rewrite(root, CALIBRATION_FILE, json.dumps(old))
    with pytest.raises(RecipeError, match="enrolled with surface channels \\['extra', 'inside', 'colour'\\]; .* enrol the recipe again"):
        load_recipe(root)
    old["surface_channels"] = ["extra", "inside", "colour", "missing"]
    _rewrite(root, CALIBRATION_FILE, json.dumps(old))
    with pytest.raises(RecipeError, match="surface_channel_scale must be 4 positive values"):
        load_recipe(root)
    _rewrite(root, CALIBRATION_FILE, json.dumps(make_recipe().calibration.to_json()))
    # a recipe enrolled before part scores followed min_defect_voxels: calibrated on the maximum, 2 voxels asked for
    del old["part_score_min_voxels"]
    old["surface_channel_scale"] = [1.0] * 4
    _rewrite(root, CALIBRATION_FILE, json.dumps(old))
    _rewrite(root, RECIPE_FILE, original.replace("min_defect_voxels = 1", "min_defect_voxels = 2"))
    with pytest.raises(RecipeError, match="calibrated on part scores over regions of 1 voxel\\(s\\); recipe.toml asks for min_defect_voxels = 2: enrol"):
        load_recipe(root)
    _rewrite(root, RECIPE_FILE, original)
    _rewrite(root, CALIBRATION_FILE, json.dumps(make_recipe().calibration.to_json()))
    _rewrite(root, MODEL_FILE, "ply\nnot really\n")
    with pytest.raises(RecipeError, match=f"{MODEL_FILE}: not a readable PLY"):
        load_recipe(root)


def test_list_recipes_reports_broken_ones(tmp_path):
    save_recipe(make_recipe("good-one"), tmp_path)
    root = save_recipe(make_recipe("broken"), tmp_path)
    (root / MODEL_FILE).write_bytes(b"x")
    infos = {i.name: i for i in list_recipes(tmp_path)}
    assert infos["good-one"].version.startswith("sha256:") and infos["good-one"].error is None
    assert infos["broken"].version is None and "sha256 does not match" in infos["broken"].error


def test_recipes_cli_list_and_show(saved):
    from agent.pipeline_cli import recipes_app

    recipe, root = saved
    runner = CliRunner()
    result = runner.invoke(recipes_app, ["list", "--recipes-dir", str(root.parent)])
    assert result.exit_code == 0, result.output
    assert "bracket" in result.output and recipe.version[:19] in result.output
    result = runner.invoke(recipes_app, ["show", "bracket", "--recipes-dir", str(root.parent), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["version"] == recipe.version and shown["settings"]["fusion"]["voxel_size_m"] == 0.004
    assert shown["threshold"][0].startswith("threshold (features path): leave-views-out, raw ")
    (root / BANK_FILE).write_bytes(b"x")
    result = runner.invoke(recipes_app, ["show", "bracket", "--recipes-dir", str(root.parent)])
    assert result.exit_code == 1 and "sha256 does not match" in result.output


def _with_surface(recipe: Recipe) -> Recipe:
    from agent.surface import NominalSurface

    rng = np.random.default_rng(1)
    n = 64
    normals = rng.normal(size=(n, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    recipe.surface = NominalSurface(rng.normal(0, 0.05, (n, 3)).astype(np.float32), normals, rng.uniform(0, 1, (n, 3)).astype(np.float32),
                                    np.full(n, 0.0005, np.float32), np.full(n, 0.08, np.float32), 0.002)  # fmt: skip
    recipe.calibration.surface_raw_threshold = 2.5
    recipe.calibration.surface_nominal_part_scores = [1.5, 2.0]
    return recipe


def test_surface_round_trip_and_tampering(tmp_path):
    from agent.recipe import SURFACE_FILE

    recipe = _with_surface(make_recipe())
    root = save_recipe(recipe, tmp_path)
    loaded = load_recipe(root)
    np.testing.assert_array_equal(loaded.surface.points, recipe.surface.points)
    assert loaded.calibration.surface_raw_threshold == pytest.approx(2.5)
    assert loaded.calibration.threshold_source(surface=True) == "leave-views-out"
    recipe.calibration.surface_teach_in_part_scores = [1.0, 1.25]
    loaded = load_recipe(save_recipe(recipe, tmp_path / "taught"))
    assert loaded.calibration.surface_teach_in_part_scores == [1.0, 1.25]
    assert loaded.calibration.threshold_source(surface=True) == "teach-in"
    assert loaded.calibration.threshold_source(surface=False) == "leave-views-out"
    data = bytearray((root / SURFACE_FILE).read_bytes())
    data[-20] ^= 0xFF
    (root / SURFACE_FILE).write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="sha256"):
        load_recipe(root)


def test_surface_file_not_in_the_manifest_is_rejected(saved):
    from agent.recipe import SURFACE_FILE

    _, root = saved
    other = save_recipe(_with_surface(make_recipe("other")), root.parent)
    (root / SURFACE_FILE).write_bytes((other / SURFACE_FILE).read_bytes())
    with pytest.raises(RecipeError, match="not listed in the manifest"):
        load_recipe(root)


def test_surface_threshold_without_surface_is_rejected(tmp_path):
    recipe = make_recipe()
    recipe.calibration.surface_raw_threshold = 2.0
    root = save_recipe(recipe, tmp_path)
    with pytest.raises(RecipeError, match="surface_raw_threshold"):
        load_recipe(root)


def _with_references(recipe: Recipe) -> Recipe:
    from agent.reference_views import ReferenceViews

    recipe = _with_surface(recipe)
    K = recipe.settings.camera
    n = 4
    poses = np.stack([look_at(np.array([0.5, 0.1 * (i % 2), 0.3]), np.zeros(3)) for i in range(n)])
    recipe.references = ReferenceViews(np.full((n, K.height, K.width, 3), 128, np.uint8), np.full((n, K.height, K.width), 0.5, np.float32),
                                       poses, np.tile(np.eye(4), (n, 1, 1)), np.array([0, 0, 1, 1]), K)  # fmt: skip
    recipe.calibration.surface_teach_in_part_scores = [1.0, 1.25]
    recipe.calibration.reference_channel_scale = [0.2, 0.15, 0.05, 0.3]
    recipe.calibration.surface_fused_geometry_scale = 1.1
    return recipe


def test_reference_views_round_trip_and_rejections(tmp_path):
    from agent.recipe import REFERENCE_VIEWS_FILE

    recipe = _with_references(make_recipe())
    loaded = load_recipe(save_recipe(recipe, tmp_path))
    np.testing.assert_array_equal(loaded.references.images, recipe.references.images)
    assert loaded.calibration.reference_channel_scale == pytest.approx([0.2, 0.15, 0.05, 0.3])
    assert loaded.calibration.surface_scale(True) == pytest.approx([0.2, 0.15, 0.05, 0.3])
    assert loaded.calibration.surface_scale(False) == loaded.calibration.surface_channel_scale
    assert loaded.calibration.surface_fused_geometry_scale == pytest.approx(1.1)
    from agent.recipe import Calibration

    for bad in (0.0, -1.0, float("nan")):
        data = loaded.calibration.to_json() | {"surface_fused_geometry_scale": bad}
        with pytest.raises(RecipeError, match="surface_fused_geometry_scale must be > 0"):
            Calibration.from_json(data, tmp_path / "calibration.json")
    from agent.pipeline_cli import recipes_app

    result = CliRunner().invoke(recipes_app, ["show", "bracket", "--recipes-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["reference_views"] == {"views": 4, "teach_in_parts": 2}
    # the views without the scale that goes with them, and the scale without the views
    no_scale = _with_references(make_recipe("noscale"))
    no_scale.calibration.reference_channel_scale = None
    with pytest.raises(RecipeError, match="reference_channel_scale must be set exactly"):
        load_recipe(save_recipe(no_scale, tmp_path))
    no_views = _with_references(make_recipe("noviews"))
    no_views.references = None
    with pytest.raises(RecipeError, match="reference_channel_scale must be set exactly"):
        load_recipe(save_recipe(no_views, tmp_path))
    # a reference views file slipped in after enrollment, and a tampered one
    plain = save_recipe(_with_surface(make_recipe("plain")), tmp_path)
    (plain / REFERENCE_VIEWS_FILE).write_bytes((tmp_path / "bracket" / REFERENCE_VIEWS_FILE).read_bytes())
    with pytest.raises(RecipeError, match="not listed in the manifest"):
        load_recipe(plain)
    data = bytearray((tmp_path / "bracket" / REFERENCE_VIEWS_FILE).read_bytes())
    data[-30] ^= 0xFF
    (tmp_path / "bracket" / REFERENCE_VIEWS_FILE).write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="sha256"):
        load_recipe(tmp_path / "bracket")
