"""Headless CPU renderer: Embree ray casting (trimesh + embreex), Blinn-Phong shading, light tent.

The scene is one part on the fixture in front of a light-tent backdrop that lies beyond the depth
sensor's range: rays that miss the part see a smooth, slightly varying light grey (brightest above)
and get depth 0. No floor is rendered. Lights are fixed in the world (cell) frame: a key light with
shadow rays, a fill light and a hemispherical ambient term; ambient, fill and the reflected light tent
are attenuated by ambient occlusion precomputed per mesh corner (so it adds no per-view noise). Rays are cast in the part frame (the
inverse placement is applied to the rays), so a product's mesh and BVH are shared by all its parts.
Each pixel averages an s x s grid of sub-pixel rays; depth comes from the ray through the pixel centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from agent.geometry import Intrinsics, pixel_rays, project_points, transform_points
from agent.sim.mesh import Hits, PartMesh
from agent.sim.products import ProductModel, Surface

SHADOW_EPS = 5e-5  # metres; shadow-ray origin offset along the face normal
AO_DISTANCE = 0.5  # ambient occlusion reach, fraction of the part's bounding radius


@dataclass(frozen=True)
class Lighting:
    """Cell lighting, world frame. Directions point from the part towards the light."""

    key_dir: np.ndarray
    key_intensity: float
    fill_dir: np.ndarray
    fill_intensity: float
    ambient: float
    backdrop: float  # brightness factor of the light tent

    @staticmethod
    def nominal() -> "Lighting":
        return Lighting(_direction(35.0, 55.0), 2.3, _direction(215.0, 20.0), 0.55, 0.42, 1.0)

    @staticmethod
    def sample(rng: np.random.Generator, variation: float) -> "Lighting":
        """Nominal lighting with intensity scaled by 1 +- ``variation`` and directions turned by up to 80 * variation degrees."""
        if variation == 0:
            return Lighting.nominal()
        turn = 80.0 * variation
        gain = 1.0 + variation * rng.uniform(-1.0, 1.0)
        key = _direction(35.0 + rng.uniform(-turn, turn), np.clip(55.0 + rng.uniform(-turn, turn) * 0.5, 20.0, 85.0))
        fill = _direction(215.0 + rng.uniform(-turn, turn), 20.0 + rng.uniform(-turn, turn) * 0.3)
        return Lighting(key, 2.3 * gain, fill, 0.55 * (1.0 + variation * rng.uniform(-1, 1)), 0.42 * gain, gain ** 0.5)


def _direction(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    return np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])


@dataclass
class Scene:
    """One part as made (defects applied), placed in the cell, under its lighting."""

    model: ProductModel
    mesh: PartMesh  # as made, part frame
    T_world_part: np.ndarray
    lighting: Lighting
    defects: list = field(default_factory=list)  # agent.sim.defects.Defect, part frame

    def rays_to_part(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        R, t = self.T_world_part[:3, :3], self.T_world_part[:3, 3]
        return (origins - t) @ R, dirs @ R


def defect_coverage(scene: Scene, origins_p: np.ndarray, dirs_p: np.ndarray, hits: Hits) -> dict[int, np.ndarray]:
    """Per defect id, a bool per ray: the ray sees that defect (part-frame rays)."""
    out: dict[int, np.ndarray] = {}
    if not scene.defects:
        return out
    nominal_hits = None
    normals = scene.mesh.face_normals[hits.face]
    source = scene.mesh.source[hits.face]
    for defect in scene.defects:
        seen = np.zeros(len(origins_p), dtype=bool)
        seen[hits.ray] = defect.contains(hits.points, source, normals)
        if defect.removes_material:
            if nominal_hits is None:
                nominal_hits = scene.model.mesh.cast(origins_p, dirs_p)
            n_normals = scene.model.mesh.face_normals[nominal_hits.face]
            n_source = np.zeros(len(nominal_hits.face), dtype=np.int16)
            seen[nominal_hits.ray] |= defect.contains(nominal_hits.points, n_source, n_normals)
        out[defect.id] = seen
    return out


def crop_intrinsics(K: Intrinsics, x0: int, y0: int, width: int, height: int) -> Intrinsics:
    """The same camera restricted to the pixel window starting at column x0, row y0."""
    return Intrinsics(K.fx, K.fy, K.cx - x0, K.cy - y0, width, height)


def defect_pixel_counts(scene: Scene, c2w: np.ndarray, K: Intrinsics, supersample: int) -> dict[int, int]:
    """Visible pixels of each defect in one view (as in the rendered mask), tracing only the window
    around the defect's bounding cube."""
    counts = {}
    for defect in scene.defects:
        centre = transform_points(scene.T_world_part, defect.center[None])
        offsets = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
        corners = centre + defect.radius * offsets
        uv, z = project_points(corners, c2w, K)
        if np.any(z <= 0):
            counts[defect.id] = 0
            continue
        x0, y0 = np.floor(uv.min(axis=0)).astype(int)
        x1, y1 = np.ceil(uv.max(axis=0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, K.width), min(y1, K.height)
        if x1 <= x0 or y1 <= y0:
            counts[defect.id] = 0
            continue
        Kc = crop_intrinsics(K, x0, y0, x1 - x0, y1 - y0)
        o, d, _ = pixel_rays(c2w, Kc, supersample)
        o_p, d_p = scene.rays_to_part(o, d)
        cov = defect_coverage(scene, o_p, d_p, scene.mesh.cast(o_p, d_p))
        per_pixel = cov[defect.id].reshape(-1, supersample * supersample).any(axis=1)
        counts[defect.id] = int(per_pixel.sum())
    return counts


def backdrop_color(dirs_world: np.ndarray, lighting: Lighting) -> np.ndarray:
    """Light-tent colour seen along world directions (sRGB, before sensor noise): brightest above,
    with a gentle left-right and front-back gradient."""
    x, y, z = dirs_world[:, 0], dirs_world[:, 1], dirs_world[:, 2]
    level = 0.80 + 0.07 * z + 0.018 * x - 0.012 * y + 0.015 * x * y - 0.01 * z * z
    tint = np.array([1.0, 0.99, 0.965], dtype=np.float32)
    return np.clip((level * lighting.backdrop).astype(np.float32)[:, None] * tint, 0.0, 1.0)


def shade_hits(scene: Scene, hits: Hits, dirs_p: np.ndarray, shadows: bool) -> np.ndarray:
    """Linear-light RGB of each hit (N x 3)."""
    mesh, material = scene.mesh, scene.model.material
    R = scene.T_world_part[:3, :3]
    n_geom = mesh.face_normals[hits.face]
    normals = mesh.shading_normals(hits.face, bary=hits.bary)
    component = mesh.component[hits.face]
    source = mesh.source[hits.face]

    surface = material.surface(hits.points, component)
    for defect in scene.defects:
        own = source == defect.id
        if own.any() and defect.shows_exposed(material):
            surface = _replace_rows(surface, own, material.exposed(hits.points[own]))
        surface, normals = defect.modify_surface(hits.points, n_geom, surface, normals, material)
    albedo, spec, shininess = surface.albedo, surface.specular, surface.shininess

    view = -dirs_p[hits.ray]
    # shading normals must face the viewer like the geometric normal does
    flip = np.einsum("nd,nd->n", n_geom, view) < 0
    n_geom = np.where(flip[:, None], -n_geom, n_geom)
    normals = np.where(flip[:, None], -normals, normals)
    ndv = np.einsum("nd,nd->n", normals, view)
    normals = normals + np.clip(0.02 - ndv, 0, None)[:, None] * view
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)

    light = scene.lighting
    lin_albedo = albedo.astype(np.float32) ** 2.2
    up_p = R[2]  # world z in the part frame
    corner_ao = mesh.ambient_visibility(AO_DISTANCE * scene.model.radius)
    ao = np.einsum("nk,nk->n", hits.bary, corner_ao[hits.face])
    ambient = light.ambient * (0.7 + 0.3 * (normals @ up_p)) * ao
    diffuse = ambient.astype(np.float32).copy()
    specular = np.zeros(len(hits.ray), dtype=np.float32)
    for direction, intensity, cast_shadow in ((light.key_dir, light.key_intensity, shadows), (light.fill_dir, light.fill_intensity * (0.3 + 0.7 * ao), False)):
        l_p = direction @ R
        ndl = np.clip(normals @ l_p, 0.0, None)
        visible = (n_geom @ l_p) > 0
        lit = visible & (ndl > 0)
        if cast_shadow and lit.any():
            idx = np.nonzero(lit)[0]
            origins = hits.points[idx] + SHADOW_EPS * n_geom[idx]
            blocked = mesh.occluded(origins, np.broadcast_to(l_p, origins.shape))
            lit[idx[blocked]] = False
        diffuse += intensity * ndl * lit
        half = l_p[None] + view
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        ndh = np.clip(np.einsum("nd,nd->n", normals, half), 0.0, 1.0)
        specular += intensity * lit * ndh ** shininess * (shininess + 8.0) / 60.0
    # mirror reflection of the light tent (no self-occlusion), Schlick Fresnel
    ndv = np.clip(np.einsum("nd,nd->n", normals, view), 0.0, 1.0)
    reflected = 2.0 * ndv[:, None] * normals - view
    env = (backdrop_color(reflected @ R.T, light).astype(np.float32) ** 2.2) * ao[:, None]
    fresnel = (1.0 - ndv) ** 5
    if material.metallic:
        f0 = material.fresnel_f0 * albedo
        f = f0 + (1.0 - f0) * fresnel[:, None]
        rgb = lin_albedo * (0.35 * diffuse)[:, None] + (spec * specular)[:, None] * (0.3 + 0.7 * lin_albedo)
        rgb += 2.6 * surface.gloss[:, None] * f * env
    else:
        f = material.fresnel_f0 + (1.0 - material.fresnel_f0) * fresnel
        rgb = lin_albedo * diffuse[:, None] * (1.0 - f * surface.gloss)[:, None] + (spec * specular)[:, None]
        rgb += 2.0 * (surface.gloss * f)[:, None] * env
    return rgb * 0.42


def _replace_rows(surface: Surface, rows: np.ndarray, other: Surface) -> Surface:
    """``surface`` with the properties of ``rows`` taken from ``other`` (len(other) == rows.sum())."""
    out = Surface(surface.albedo.copy(), surface.specular.copy(), surface.shininess.copy(), surface.gloss.copy())
    out.albedo[rows], out.specular[rows], out.shininess[rows], out.gloss[rows] = other.albedo, other.specular, other.shininess, other.gloss
    return out


@lru_cache(maxsize=8)
def _camera_rays(K: Intrinsics, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Ray directions in the camera (OpenGL) frame: the s x s sub-pixel rays of every pixel, then, for even
    s, one ray through each pixel centre. Returns (dirs, z per unit length of the centre rays,
    index of each pixel's centre ray, number of sub-pixel rays)."""
    _, d_sub, _ = pixel_rays(np.eye(4), K, s)
    n_sub = len(d_sub)
    _, d_centre, zf = pixel_rays(np.eye(4), K, 1)
    if s % 2 == 1:
        centre_index = np.arange(K.height * K.width) * s * s + (s // 2) * s + s // 2
        dirs = d_sub
    else:
        centre_index = n_sub + np.arange(K.height * K.width)
        dirs = np.concatenate([d_sub, d_centre])
    for array in (dirs, zf, centre_index):
        array.setflags(write=False)
    return dirs, zf, centre_index, n_sub


@dataclass
class ViewRender:
    """A noise-free rendered view."""

    image: np.ndarray  # H x W x 3 float32 sRGB in [0, 1]
    depth: np.ndarray  # H x W float32 metres, 0 = background
    defect_masks: dict[int, np.ndarray]  # id -> H x W bool (any sub-pixel ray sees the defect)


def render_view(scene: Scene, c2w: np.ndarray, K: Intrinsics, supersample: int = 2, shadows: bool = True) -> ViewRender:
    """Render one view of ``scene`` from the OpenGL camera-to-world pose ``c2w``."""
    s = int(supersample)
    if s < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    H, W = K.height, K.width
    d_cam, zf, centre_index, n_sub = _camera_rays(K, s)
    d = d_cam @ np.asarray(c2w, dtype=np.float64)[:3, :3].T
    o = np.broadcast_to(np.asarray(c2w, dtype=np.float64)[:3, 3], d.shape)
    o_p, d_p = scene.rays_to_part(o, d)
    hits = scene.mesh.cast(o_p, d_p)

    # depth from the ray through each pixel centre
    t_all = np.zeros(len(o), dtype=np.float64)
    t_all[hits.ray] = hits.t
    depth = (t_all[centre_index] * zf).astype(np.float32).reshape(H, W)

    sub = hits.ray < n_sub
    sub_hits = hits.subset(sub)
    rgb_lin = np.zeros((n_sub, 3), dtype=np.float32)
    rgb_lin[sub_hits.ray] = shade_hits(scene, sub_hits, d_p, shadows)
    color = np.clip(rgb_lin, 0.0, 1.0) ** (1.0 / 2.2)
    missed = np.ones(n_sub, dtype=bool)
    missed[sub_hits.ray] = False
    color[missed] = backdrop_color(d[:n_sub][missed], scene.lighting)
    image = color.reshape(H * W, s * s, 3).mean(axis=1).reshape(H, W, 3)

    coverage = defect_coverage(scene, o_p[:n_sub], d_p[:n_sub], sub_hits)
    masks = {k: v.reshape(H * W, s * s).any(axis=1).reshape(H, W) for k, v in coverage.items()}
    return ViewRender(image=image.astype(np.float32), depth=depth, defect_masks=masks)
