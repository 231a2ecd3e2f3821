"""Simulate one part in the cell: placement, lighting, defect, rendered views, ground truth."""

from __future__ import annotations

import math

import numpy as np
from threadpoolctl import threadpool_limits

from agent.capture import DEFECT_TYPES, Capture, DefectGT, Frame, GroundTruth
from agent.geometry import Intrinsics, check_rigid, rotation_about_axis, transform_points
from agent.sim.config import SimConfig
from agent.sim.defects import Defect, build_part_mesh, sample_defect
from agent.sim.mesh import PartMesh, subdivide_near
from agent.sim.products import ProductModel, ProductSpec, load_product, product_name
from agent.sim.render import Lighting, Scene, defect_pixel_counts, render_view
from agent.sim.trajectory import camera_intrinsics


def sample_placement(rng: np.random.Generator, config: SimConfig) -> np.ndarray:
    """T_world_part of a part put on the fixture: uniform +- jitter_mm in x, y and +- jitter_deg about z."""
    T = np.eye(4)
    T[:3, :3] = rotation_about_axis(np.array([0.0, 0.0, 1.0]), math.radians(rng.uniform(-config.jitter_deg, config.jitter_deg)))
    T[:2, 3] = rng.uniform(-config.jitter_mm, config.jitter_mm, size=2) / 1000.0
    return T


def place_defect(
    model: ProductModel,
    defect_type: str,
    poses: list[np.ndarray],
    K: Intrinsics,
    T_world_part: np.ndarray,
    lighting: Lighting,
    config: SimConfig,
    rng: np.random.Generator,
) -> tuple[Defect, PartMesh, list[int]]:
    """A defect of ``defect_type`` visible with at least ``min_pixels_scaled`` mask pixels in at least
    ``min_defect_views`` of ``poses`` (in all of them when there are fewer); it is resampled until that holds.

    Returns (defect, mesh as made, visible pixels per view).
    """
    need_views, need_px = min(config.min_defect_views, len(poses)), config.min_pixels_scaled
    best = 0
    for _ in range(config.max_defect_attempts):
        defect = sample_defect(model, defect_type, rng)
        mesh = build_part_mesh(model, [defect])
        scene = Scene(model, mesh, T_world_part, lighting, [defect])
        counts = [defect_pixel_counts(scene, c2w, K, config.supersample)[defect.id] for c2w in poses]
        good_views = sum(c >= need_px for c in counts)
        best = max(best, good_views)
        if good_views >= need_views:
            return defect, mesh, counts
    raise RuntimeError(
        f"could not place a visible {defect_type} on {model.spec.name} in {config.max_defect_attempts} attempts "
        f"(best: {best} views with >= {need_px} px; need {need_views}). At {K.width}x{K.height} with supersample "
        f"{config.supersample} the defect may be too small to see: use larger images, more views or a lower min_defect_pixels"
    )


def ground_truth(scene: Scene, label: str, count: int, rng: np.random.Generator) -> GroundTruth:
    """Surface points of the part as placed (world frame) with defect ids, the defects and the placement.

    Points are area-uniform on the part as made, except for missing material, where they cover the
    nominal surface (the removed region included). Where uniform sampling puts fewer than 400 points on
    a defect, extra points are drawn from the (locally refined) surface within its radius until it has 400
    (at most 8 rounds of 4000 draws).
    """
    missing = any(d.removes_material for d in scene.defects)
    mesh = scene.model.mesh if missing else scene.mesh
    points, face = mesh.sample_surface(count, rng)
    source, normals = mesh.source[face], mesh.face_normals[face]
    extra_points, extra_source, extra_normals = [], [], []
    for defect in scene.defects:
        inside = int(defect.contains(points, source, normals).sum())
        if inside >= 400:
            continue
        local = subdivide_near(mesh, defect.center, defect.radius, defect.radius / 6.0)
        tri = local.triangles
        centroid = tri.mean(axis=1)
        bound = np.linalg.norm(tri - centroid[:, None], axis=2).max(axis=1)
        near = np.linalg.norm(centroid - defect.center, axis=1) - bound <= defect.radius
        for _ in range(8):
            p, f = local.sample_surface(4000, rng, near)
            keep = np.linalg.norm(p - defect.center, axis=1) <= defect.radius
            p, f = p[keep], f[keep]
            extra_points.append(p)
            extra_source.append(local.source[f])
            extra_normals.append(local.face_normals[f])
            inside += int(defect.contains(p, local.source[f], local.face_normals[f]).sum())
            if inside >= 400:
                break
    if extra_points:
        points = np.concatenate([points, *extra_points])
        source = np.concatenate([source, *extra_source])
        normals = np.concatenate([normals, *extra_normals])
    defect_ids = np.zeros(len(points), dtype=np.int32)
    for defect in scene.defects:
        defect_ids[defect.contains(points, source, normals)] = defect.id
    T = scene.T_world_part
    defects = [
        DefectGT(id=d.id, type=d.type, center=transform_points(T, d.center[None])[0], radius_m=float(d.radius))
        for d in scene.defects
    ]
    return GroundTruth(
        label=label,
        defects=defects,
        surface_points=transform_points(T, points).astype(np.float32),
        defect_ids=defect_ids,
        T_world_part=T.copy(),
    )


def simulate_part(
    product: str | ProductSpec,
    defect: str | None,
    poses: list[np.ndarray],
    config: SimConfig,
    rng: np.random.Generator,
    *,
    jitter: bool = True,
) -> Capture:
    """Simulate one part (good when ``defect`` is None) seen from ``poses``; the ground truth is filled.

    ``product`` is a name of :data:`PRODUCTS` or its spec.
    With ``jitter=False`` the part sits exactly at the fixture origin (the golden enrollment part).
    Frames are named 000, 001, ...; every frame has an image, depth and a defect mask (all False for a
    good part). All randomness comes from ``rng``.
    """
    if defect is not None and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect!r}; known: {', '.join(DEFECT_TYPES)} (or None for a good part)")
    if not poses:
        raise ValueError("simulate_part needs at least one camera pose")
    poses = [check_rigid(p, what=f"camera pose {i}") for i, p in enumerate(poses)]
    model = load_product(product_name(product))
    K = camera_intrinsics(config)
    with threadpool_limits(1):
        T_world_part = sample_placement(rng, config) if jitter else np.eye(4)
        lighting = Lighting.sample(rng, config.light_variation)
        defects: list[Defect] = []
        mesh = model.mesh
        if defect is not None:
            placed, mesh, _ = place_defect(model, defect, poses, K, T_world_part, lighting, config, rng)
            defects = [placed]
        scene = Scene(model, mesh, T_world_part, lighting, defects)
        frames = []
        for i, c2w in enumerate(poses):
            view = render_view(scene, c2w, K, config.supersample, config.shadows)
            image = view.image + rng.normal(0.0, config.noise_std, size=view.image.shape).astype(np.float32)
            image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
            depth = view.depth
            valid = depth > 0
            depth = np.where(valid, np.maximum(depth + rng.normal(0.0, config.depth_noise_std, size=depth.shape), 1e-4), 0.0).astype(np.float32)
            mask = np.zeros((K.height, K.width), dtype=bool)
            for m in view.defect_masks.values():
                mask |= m
            frames.append(Frame(name=f"{i:03d}", image=image, intrinsics=K, c2w=c2w.copy(), depth=depth, mask=mask))
        gt = ground_truth(scene, defect or "good", config.surface_points, rng)
    return Capture(frames=frames, gt=gt)
