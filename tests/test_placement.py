"""Placement refinement and single-image pose (agent/splat/placement.py).

Data: a Gaussian model from ``init_from_depth`` of a small simulated golden capture, rendered at known
placements / camera poses (64x64), so the truth is exact and the tests check the optimiser, the loss and
the pose bookkeeping rather than the model's quality (simulator accuracy is in bench/bench_placement.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agent import geometry
from agent.capture import Frame
from agent.sim import SimConfig, enrollment_poses, simulate_part
from agent.splat.init import init_from_depth
from agent.splat.placement import (
    PlacementConfig,
    SingleImagePoseConfig,
    estimate_single_image_pose,
    global_descriptor,
    refine_placement,
)

SIZE = 64
BACKDROP = (0.78, 0.78, 0.8)
# Small images: only the 32 px and 64 px levels.
CONFIG = PlacementConfig(scales=(2, 1), steps=(25, 30), min_level_size=32, warm_scales=(1,), warm_steps=(12,))
SINGLE_REFINE = PlacementConfig(
    scales=(2, 1), steps=(40, 40), min_level_size=32, lr_rotation_deg=2.0, lr_translation_mm=3.0, max_translation_m=0.2
)


def offset(tx_mm: float, ty_mm: float, yaw_deg: float, tz_mm: float = 0.0, tilt_deg: float = 0.0) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = geometry.rotation_about_axis([0.0, 0.0, 1.0], math.radians(yaw_deg)) @ geometry.rotation_about_axis(
        [1.0, 0.0, 0.0], math.radians(tilt_deg)
    )
    T[:3, 3] = np.array([tx_mm, ty_mm, tz_mm]) / 1000.0
    return T


def errors(T: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(translation error mm, rotation error deg)."""
    return float(np.linalg.norm(T[:3, 3] - truth[:3, 3]) * 1000), geometry.rotation_angle_deg(T[:3, :3].T @ truth[:3, :3])


@pytest.fixture(scope="module")
def scene():
    """A golden bracket seen from 12 poses (model source) and the model built from its depth maps."""
    config = SimConfig(width=SIZE, height=SIZE, enroll_views=12, supersample=1, shadows=False, surface_points=1000)
    poses = enrollment_poses("bracket", config)
    golden = simulate_part("bracket", None, poses, config, np.random.default_rng(0), jitter=False)
    model = init_from_depth(golden, max_points=4000)
    return model, golden


def render_views(model, frames: list[Frame], T_world_part: np.ndarray, with_depth: bool = True) -> list[Frame]:
    """The model placed at ``T_world_part`` seen by the frames' cameras, as uint8 frames (depth where alpha > 0.5)."""
    viewmats = torch.tensor(np.stack([geometry.c2w_gl_to_w2c_cv(f.c2w) for f in frames]), dtype=torch.float32)
    Ks = torch.tensor(np.stack([f.intrinsics.matrix() for f in frames]), dtype=torch.float32)
    with torch.no_grad():
        out = model.render(
            viewmats, Ks, SIZE, SIZE, object_pose=torch.tensor(T_world_part, dtype=torch.float32),
            backgrounds=torch.tensor(BACKDROP),
        )  # fmt: skip
    views = []
    for i, f in enumerate(frames):
        alpha = out.alpha[i, ..., 0].numpy()
        depth = np.where(alpha > 0.5, out.depth[i, ..., 0].numpy(), 0.0).astype(np.float32) if with_depth else None
        image = np.clip(np.round(out.rgb[i].numpy() * 255), 0, 255).astype(np.uint8)
        views.append(Frame(name=f.name, image=image, intrinsics=f.intrinsics, c2w=f.c2w, depth=depth))
    return views


@pytest.mark.slow
def test_recovers_known_offset(scene):
    model, golden = scene
    truth = offset(4.0, -3.0, 4.0)
    views = render_views(model, golden.frames[::3], truth)
    result = refine_placement(model, views, None, CONFIG)
    dt, dr = errors(result.T_world_part, truth)
    assert dt < 0.5 and dr < 0.2, (dt, dr)
    assert result.translation_m == pytest.approx(tuple(result.T_world_part[:3, 3]))
    assert result.rotation_deg == pytest.approx(4.0, abs=0.2)
    assert result.iterations == sum(result.level_iterations) == len(result.loss_history)
    assert result.loss_history[-1] < result.loss_history[0]
    geometry.check_rigid(result.T_world_part)


def test_recovers_offset_without_depth(scene):
    """Frames without depth: the foreground comes from the backdrop colour."""
    model, golden = scene
    truth = offset(-3.0, 2.0, -3.0)
    views = render_views(model, golden.frames[1::3], truth, with_depth=False)
    result = refine_placement(model, views, None, CONFIG)
    dt, dr = errors(result.T_world_part, truth)
    assert dt < 1.0 and dr < 0.6, (dt, dr)


@pytest.mark.slow
def test_warm_start_converges_faster(scene):
    """Same step budget on the finest level: from the previous views' estimate it converges, from the recipe
    placement it does not; the warm-start update then also stops early."""
    model, golden = scene
    truth = offset(4.0, 3.0, -4.0)
    views = render_views(model, golden.frames[::3], truth)
    previous = refine_placement(model, views[:3], None, CONFIG)
    budget = PlacementConfig(scales=(1,), steps=(12,), min_level_size=32, warm_scales=(1,), warm_steps=(12,))
    warm = refine_placement(model, views, previous.T_world_part, budget)
    cold = refine_placement(model, views, None, budget)
    warm_err, cold_err = errors(warm.T_world_part, truth), errors(cold.T_world_part, truth)
    assert warm_err[0] < 0.5 and warm_err[1] < 0.2, warm_err
    assert cold_err[0] > 1.0, cold_err
    assert warm.loss_history[0] < cold.loss_history[0]


@pytest.mark.slow
def test_defect_does_not_pull_the_pose(scene):
    """A pasted dark blob with a depth dent in every view moves the estimate by less than the tolerance."""
    model, golden = scene
    truth = offset(2.0, -2.0, 2.0)
    clean = render_views(model, golden.frames[::3], truth)
    defective = []
    for f in clean:
        fg = np.argwhere(f.depth > 0)
        cy, cx = fg[len(fg) // 2]
        yy, xx = np.mgrid[:SIZE, :SIZE]
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 9) & (f.depth > 0)  # a disc of radius 3 px on the part
        image, depth = f.image.copy(), f.depth.copy()
        image[blob] = (40, 20, 10)
        depth[blob] += 0.01
        defective.append(Frame(name=f.name, image=image, intrinsics=f.intrinsics, c2w=f.c2w, depth=depth))
    est_clean = refine_placement(model, clean, None, CONFIG)
    est_defect = refine_placement(model, defective, None, CONFIG)
    dt, dr = errors(est_defect.T_world_part, truth)
    assert dt < 0.5 and dr < 0.2, (dt, dr)
    shift = errors(est_defect.T_world_part, est_clean.T_world_part)
    assert shift[0] < 0.5 and shift[1] < 0.2, shift


@pytest.mark.slow
def test_single_image_pose_recovers_held_out_view(scene):
    """A view between enrollment poses (camera turned 12 degrees about the part and raised) is found by
    retrieval among the other views, then refined to the true camera pose."""
    model, golden = scene
    enrollment = golden.frames
    centre = (model.means.min(0).values + model.means.max(0).values).numpy().astype(np.float64) / 2
    spin = np.eye(4)
    spin[:3, :3] = geometry.rotation_about_axis([0.0, 0.0, 1.0], math.radians(12.0))
    spin[:3, 3] = centre - spin[:3, :3] @ centre
    true_c2w = spin @ enrollment[5].c2w
    true_c2w[2, 3] += 0.01
    held_out = render_views(model, [Frame("q", enrollment[5].image, enrollment[5].intrinsics, true_c2w)], np.eye(4), False)[0]
    config = SingleImagePoseConfig(n_candidates=2, refine=SINGLE_REFINE)
    result = estimate_single_image_pose(model, held_out.image, held_out.intrinsics, enrollment, config)
    rot_err = geometry.rotation_angle_deg(result.c2w[:3, :3].T @ true_c2w[:3, :3])
    distance = np.linalg.norm(true_c2w[:3, 3] - centre)
    pos_err = np.linalg.norm(result.c2w[:3, 3] - true_c2w[:3, 3])
    assert rot_err < 1.0, rot_err
    assert pos_err < 0.02 * distance, (pos_err, distance)
    assert result.candidates[0][0] == "005"  # retrieval: the enrollment view the query was turned from
    assert result.candidate in [name for name, _ in result.candidates]
    assert len(result.losses) == len(result.candidates) == 2


def test_global_descriptor_is_shift_invariant_unit_vector(scene):
    _, golden = scene
    image = golden.frames[0].image
    shifted = np.roll(image, (3, -4), axis=(0, 1))
    a, b, c = (global_descriptor(x) for x in (image, shifted, golden.frames[6].image))
    assert np.linalg.norm(a) == pytest.approx(1.0)
    assert a @ b > 0.95 > a @ c


def test_bad_input_is_named(scene):
    model, golden = scene
    f = golden.frames[0]
    with pytest.raises(ValueError, match="frame 000 has no camera pose"):
        refine_placement(model, [Frame(name="000", image=f.image, intrinsics=f.intrinsics)], None, CONFIG)
    with pytest.raises(ValueError, match="needs at least one view"):
        refine_placement(model, [], None, CONFIG)
    with pytest.raises(ValueError, match="init"):
        refine_placement(model, [f], np.diag([1.0, 1.0, -1.0, 1.0]), CONFIG)
    small = Frame(name="001", image=f.image[:32], intrinsics=f.intrinsics, c2w=f.c2w)
    with pytest.raises(ValueError, match="frame 001 image is 64x32"):
        refine_placement(model, [small], None, CONFIG)
    with pytest.raises(ValueError, match="trim_fraction"):
        PlacementConfig(trim_fraction=0.7)
