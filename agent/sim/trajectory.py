"""Robot trajectories: camera rings on a hemisphere around the fixture, looking at the part."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import trimesh

from agent.geometry import Intrinsics, look_at, project_points
from agent.sim.config import SimConfig
from agent.sim.products import ProductSpec, load_product, product_name


def camera_intrinsics(config: SimConfig) -> Intrinsics:
    """The cell camera: square pixels, horizontal field of view ``config.fov_deg``."""
    K = Intrinsics.from_fov(math.radians(config.fov_deg), config.width, config.height)
    K.validate()
    return K


def camera_distance(product: str | ProductSpec, config: SimConfig) -> float:
    """Distance from the fixture target at which the part, seen from every ring of both trajectories,
    reaches at most ``frame_fill`` of the half-width/half-height of the image."""
    return _fitted_distance(product_name(product), config.fov_deg, config.width, config.height, config.frame_fill,
                            tuple(config.enroll_elevations_deg) + tuple(config.inspect_elevations_deg))


@lru_cache(maxsize=64)
def _fitted_distance(product: str, fov_deg: float, width: int, height: int, fill: float, elevations: tuple[float, ...]) -> float:
    model = load_product(product)
    K = Intrinsics.from_fov(math.radians(fov_deg), width, height)
    hull = trimesh.Trimesh(model.mesh.vertices, model.mesh.faces).convex_hull.vertices
    half_fov = math.atan(0.5 * min(K.width / K.fx, K.height / K.fy))
    distance = model.radius / math.sin(fill * half_fov)
    for _ in range(5):
        extent = 0.0
        for pose in ring_poses(model.center, distance, elevations, 24 * len(elevations)):
            uv, _ = project_points(hull, pose, K)
            extent = max(extent, np.abs((uv[:, 0] - K.cx) / (K.width / 2)).max(), np.abs((uv[:, 1] - K.cy) / (K.height / 2)).max())
        distance *= extent / fill
    return distance


def ring_poses(target: np.ndarray, distance: float, elevations_deg, views: int, azimuth_offset_deg: float = 0.0) -> list[np.ndarray]:
    """``views`` camera-to-world poses spread over rings at ``elevations_deg`` (alternate rings staggered)."""
    rings = len(elevations_deg)
    per_ring = [views // rings + (1 if r < views % rings else 0) for r in range(rings)]
    poses = []
    for r, (elevation, count) in enumerate(zip(elevations_deg, per_ring)):
        if count == 0:
            continue
        step = 360.0 / count
        stagger = 0.5 * step if r % 2 else 0.0
        e = math.radians(elevation)
        for k in range(count):
            a = math.radians(azimuth_offset_deg + stagger + k * step)
            eye = target + distance * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
            poses.append(look_at(eye, target))
    return poses


def _target(product: str | ProductSpec) -> np.ndarray:
    return load_product(product_name(product)).center.copy()


def enrollment_poses(product: str | ProductSpec, config: SimConfig) -> list[np.ndarray]:
    """Poses of the enrollment trajectory (default 3 rings x 12 views)."""
    return ring_poses(_target(product), camera_distance(product, config), config.enroll_elevations_deg, config.enroll_views)


def inspection_poses(product: str | ProductSpec, config: SimConfig) -> list[np.ndarray]:
    """Poses of the inspection trajectory. By default its azimuths are offset by a quarter of the enrollment
    azimuth step, so no inspection view shares an azimuth with any (staggered) enrollment ring."""
    offset = config.inspect_azimuth_offset_deg
    if offset is None:
        first_ring = config.enroll_views // len(config.enroll_elevations_deg) + (1 if config.enroll_views % len(config.enroll_elevations_deg) else 0)
        offset = 0.25 * 360.0 / first_ring  # enrollment rings are staggered by half a step
    return ring_poses(_target(product), camera_distance(product, config), config.inspect_elevations_deg, config.n_views, offset)
