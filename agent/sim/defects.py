"""Defects with exact ground truth: stain, scratch, burr, dent, missing material.

Every defect lives in the PART frame and is anchored at a point ``center`` on the nominal surface
with outward normal ``normal``; all of it lies within ``radius`` of ``center`` (the label's radius_m).

- stain:   colour blotch with an irregular, soft edge and a darker rim (appearance only).
- scratch: thin curved groove: lighter/darker line, duller finish, normals tilted across the groove
           (shading only; the depth map is unchanged).
- burr:    extra material: a jagged convex lump unioned onto the solid at an edge or on a face.
- dent:    inward displacement of the surface along -normal with a smooth (1 - s^2)^2 profile; the mesh
           is refined locally and the shading normals are transformed exactly with the displacement.
- missing: a jagged convex chunk cut out of the solid at an edge (manifold3d difference); the cavity wall
           shows the material under the finish.

``contains(points, source, normals)`` is the single definition of a defect's extent. It labels ray hits
(per-view masks: a pixel is a defect pixel when any of its sub-pixel rays sees the defect) and
ground-truth surface points alike. For missing material a pixel also counts when the surface the
removed chunk would have shown is inside the cut (found by ray casting the nominal mesh).

Placement (agent.sim.simulate.place_defect) resamples a defect until it is visible in at least
``SimConfig.min_defect_views`` (2) inspection views with at least ``SimConfig.min_pixels_scaled`` mask
pixels each: 12 pixels at 256 x 256, scaled with the image area, never fewer than 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import manifold3d as m3
import numpy as np
import trimesh
from scipy.spatial import ConvexHull

from agent.capture import DEFECT_TYPES
from agent.sim.mesh import PartMesh, part_mesh_from_manifold, subdivide_near, tag_original
from agent.sim.noise import fbm, perlin, smoothstep
from agent.sim.products import Material, ProductModel, Surface, label_vessel_inside


def _tangent_frame(normal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two unit tangents perpendicular to ``normal``, at a random angle about it."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    t1 = np.cross(normal, helper)
    t1 /= np.linalg.norm(t1)
    t2 = np.cross(normal, t1)
    a = rng.uniform(0, 2 * math.pi)
    return math.cos(a) * t1 + math.sin(a) * t2, -math.sin(a) * t1 + math.cos(a) * t2


@dataclass
class Defect:
    """Base class. Subclasses define the extent, the look and the geometry change."""

    id: int
    center: np.ndarray  # part frame, on the nominal surface
    normal: np.ndarray  # outward unit normal at the anchor
    radius: float  # the whole defect lies within this distance of ``center``
    component: int  # product component the defect sits on

    type: ClassVar[str] = ""
    removes_material: ClassVar[bool] = False

    def contains(self, points: np.ndarray, source: np.ndarray, normals: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def modify_surface(self, points, n_geom, surface: Surface, normals, material: Material):
        return surface, normals

    def shows_exposed(self, material: Material) -> bool:
        """Whether faces this defect added show the material under the finish."""
        return False

    def modify_solid(self, solid: m3.Manifold, tags: dict[int, int]) -> m3.Manifold:
        return solid

    def modify_mesh(self, mesh: PartMesh) -> PartMesh:
        return mesh


@dataclass
class Stain(Defect):
    """Colour blotch of radius about ``size`` with a noisy edge and a darker rim; it tints only where it is labelled."""

    size: float = 0.01
    seed: int = 0
    type: ClassVar[str] = "stain"
    threshold: ClassVar[float] = 0.15  # coverage above which a point is stained (and labelled)

    def _alpha(self, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(points - self.center, axis=1)
        edge = self.size * (0.8 + 0.2 * fbm((points - self.center) / (0.5 * self.size), 3, self.seed))
        facing = smoothstep(-0.2, 0.2, normals @ self.normal)
        return (1.0 - smoothstep(0.75, 1.0, d / np.maximum(edge, 1e-6))) * facing

    def contains(self, points, source, normals):
        return self._alpha(points, normals) > self.threshold

    def modify_surface(self, points, n_geom, surface, normals, material):
        near = np.linalg.norm(points - self.center, axis=1) < self.radius
        if not near.any():
            return surface, normals
        p = points[near]
        alpha = self._alpha(p, n_geom[near])
        d = np.linalg.norm(p - self.center, axis=1) / self.size
        rim = np.exp(-(((d - 0.82) / 0.08) ** 2))
        density = np.clip(alpha * (0.75 + 0.25 * fbm(p / (0.15 * self.size), 2, self.seed + 1)) + 0.35 * rim, 0.0, 1.0)
        density *= alpha > self.threshold
        w = (material.stain_opacity * density)[:, None]
        albedo = surface.albedo.copy()
        albedo[near] = albedo[near] * (1.0 - w) + np.asarray(material.stain_color, dtype=np.float32) * w
        gloss = surface.gloss.copy()
        gloss[near] *= 1.0 - 0.6 * density
        return replace(surface, albedo=albedo, gloss=gloss), normals


@dataclass
class Scratch(Defect):
    """Thin curved groove along ``tangent``: finish-coloured line, duller, normals tilted across it."""

    half_length: float = 0.015
    width: float = 0.001
    tangent: np.ndarray = None  # direction of the scratch
    bend: float = 0.0  # curvature of the centre line (1/m)
    seed: int = 0
    type: ClassVar[str] = "scratch"

    def _coords(self, points):
        d = points - self.center
        across_axis = np.cross(self.normal, self.tangent)
        u = d @ self.tangent
        h = d @ self.normal
        centre_line = self.bend * u * u + 0.12 * self.width * np.sin(u / self.half_length * 7.0 + self.seed)
        off = d @ across_axis - centre_line
        taper = np.sqrt(np.clip(1.0 - (u / self.half_length) ** 4, 0.0, 1.0))
        half_w = 0.5 * self.width * taper
        return u, h, off, half_w, across_axis

    def contains(self, points, source, normals):
        u, h, off, half_w, _ = self._coords(points)
        return (np.abs(u) < self.half_length) & (np.abs(off) < half_w) & (np.abs(h) < 0.3 * self.half_length) & (normals @ self.normal > 0.3)

    def modify_surface(self, points, n_geom, surface, normals, material):
        inside = self.contains(points, None, n_geom)
        if not inside.any():
            return surface, normals
        u, _, off, half_w, across_axis = self._coords(points[inside])
        x = off / np.maximum(half_w, 1e-9)  # -1 .. 1 across the groove
        strength = 0.8 + 0.2 * perlin(np.stack([u / self.width, x, np.zeros_like(x)], 1) * 0.7, self.seed)
        albedo, spec, gloss = surface.albedo.copy(), surface.specular.copy(), surface.gloss.copy()
        w = (0.85 * strength * (1.0 - 0.4 * x * x))[:, None].astype(np.float32)
        albedo[inside] = albedo[inside] * (1 - w) + np.asarray(material.scratch_color, dtype=np.float32) * w
        spec[inside] *= 0.4
        gloss[inside] *= 0.3
        normals = normals.copy()
        tilted = normals[inside] - (1.2 * x)[:, None] * across_axis[None]
        normals[inside] = tilted / np.linalg.norm(tilted, axis=1, keepdims=True)
        return replace(surface, albedo=albedo, specular=spec, gloss=gloss), normals


@dataclass
class Dent(Defect):
    """Inward displacement ``depth * (1 - s^2)^2`` along -normal, s = distance / ``size``; labelled where s < 0.85."""

    size: float = 0.01  # radius of the displaced region
    depth: float = 0.001
    type: ClassVar[str] = "dent"

    def contains(self, points, source, normals):
        return np.linalg.norm(points - self.center, axis=1) < 0.85 * self.size

    def modify_mesh(self, mesh: PartMesh) -> PartMesh:
        mesh = subdivide_near(mesh, self.center, self.size, self.size / 10.0)
        v = mesh.vertices
        d = v - self.center
        dist = np.linalg.norm(d, axis=1)
        s = dist / self.size
        inside = s < 1.0
        f = np.where(inside, (1.0 - s * s) ** 2, 0.0)
        df = np.where(inside, -4.0 * s * (1.0 - s * s), 0.0)
        # gradient of depth * f(|p - c| / size)
        grad = (self.depth * df / self.size)[:, None] * d / np.maximum(dist, 1e-12)[:, None]
        vertices = v - self.normal[None] * (self.depth * f)[:, None]
        # normals transform with the inverse transpose of I - normal (x) grad
        g = grad[mesh.faces].astype(np.float32)  # F x 3 x 3, per corner
        n = mesh.corner_normals
        nc = self.normal.astype(np.float32)
        denom = 1.0 - np.einsum("fkd,d->fk", g, nc)
        new_n = n + g * (np.einsum("fkd,d->fk", n, nc) / denom)[..., None]
        new_n /= np.linalg.norm(new_n, axis=2, keepdims=True)
        return PartMesh(vertices, mesh.faces, new_n.astype(np.float32), mesh.component, mesh.source)


def _jagged_hull(center: np.ndarray, axes: np.ndarray, semi: np.ndarray, rng: np.random.Generator, count: int = 28) -> np.ndarray:
    """Vertices of a jagged convex lump: points on an ellipsoid with radial jitter (part frame)."""
    u = rng.normal(size=(count, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    u *= rng.uniform(0.75, 1.1, size=(count, 1))
    local = u * semi
    pts = center + local @ axes
    return pts[ConvexHull(pts).vertices]


@dataclass
class Burr(Defect):
    """Extra material: a jagged convex lump unioned onto the solid; labelled on the lump's own faces."""

    hull_points: np.ndarray = None  # vertices of the convex lump, part frame
    type: ClassVar[str] = "burr"

    def contains(self, points, source, normals):
        return source == self.id

    def shows_exposed(self, material):
        return material.burr_shows_exposed

    def modify_solid(self, solid, tags):
        lump = tag_original(m3.Manifold.hull_points(self.hull_points), self.id, tags)
        return solid + lump


@dataclass
class Missing(Defect):
    """A jagged convex chunk cut out of the solid; labelled on the cavity wall and inside the cut."""

    hull_points: np.ndarray = None  # vertices of the convex cut, part frame
    type: ClassVar[str] = "missing"
    removes_material: ClassVar[bool] = True

    def __post_init__(self):
        hull = ConvexHull(self.hull_points)
        self._planes = hull.equations  # n . x + d <= 0 inside

    def inside(self, points: np.ndarray, tol: float = 1e-6) -> np.ndarray:
        return (points @ self._planes[:, :3].T + self._planes[:, 3]).max(axis=1) <= tol

    def contains(self, points, source, normals):
        return (source == self.id) | self.inside(points)

    def shows_exposed(self, material):
        return True

    def modify_solid(self, solid, tags):
        cut = tag_original(m3.Manifold.hull_points(self.hull_points), self.id, tags)
        return solid - cut


# ----------------------------------------------------------------------------------------------
# Placing defects


_EDGE_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _convex_edges(model: ProductModel) -> tuple[np.ndarray, np.ndarray]:
    """Convex sharp edges of a product where chips and burrs form (E x 2 x 3, E x 3 outward normals)."""
    if model.spec.name in _EDGE_CACHE:
        return _EDGE_CACHE[model.spec.name]
    merged = trimesh.Trimesh(vertices=model.mesh.vertices, faces=model.mesh.faces, process=True)
    keep = (merged.face_adjacency_angles > math.radians(35.0)) & merged.face_adjacency_convex
    edges = merged.vertices[merged.face_adjacency_edges[keep]]
    pair = merged.face_adjacency[keep]
    n = merged.face_normals[pair[:, 0]] + merged.face_normals[pair[:, 1]]
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    ok = (n[:, 2] > -0.5) & (edges[:, :, 2].min(axis=1) > 0.003)
    _EDGE_CACHE[model.spec.name] = edges[ok], n[ok]
    return _EDGE_CACHE[model.spec.name]


def _surface_anchor(model: ProductModel, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    mesh = model.mesh
    centroid_z = mesh.triangles[:, :, 2].mean(axis=1)
    allowed = (mesh.face_normals[:, 2] > -0.3) & (centroid_z > 0.004)
    if model.spec.vessel:
        allowed &= mesh.component != 1
    points, face = mesh.sample_surface(1, rng, allowed)
    normal = mesh.shading_normals(face, points)[0].astype(np.float64)
    return points[0], normal / np.linalg.norm(normal), int(mesh.component[face[0]])


def _edge_anchor(model: ProductModel, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    edges, normals = _convex_edges(model)
    if len(edges) == 0:
        return _surface_anchor(model, rng)
    lengths = np.linalg.norm(edges[:, 1] - edges[:, 0], axis=1)
    k = rng.choice(len(edges), p=lengths / lengths.sum())
    point = edges[k, 0] + rng.random() * (edges[k, 1] - edges[k, 0])
    return point, normals[k], _component_at(model.mesh, point, normals[k])


def _component_at(mesh: PartMesh, point: np.ndarray, normal: np.ndarray) -> int:
    """Component of the face under ``point`` (ray cast back along ``-normal``; nearest centroid as fallback)."""
    hits = mesh.cast((point + 1e-3 * normal)[None], (-normal)[None])
    face = int(hits.face[0]) if len(hits.face) else -1
    if face < 0:
        face = int(np.argmin(np.linalg.norm(mesh.triangles.mean(axis=1) - point, axis=1)))
    return int(mesh.component[face])


def sample_defect(model: ProductModel, defect_type: str, rng: np.random.Generator, defect_id: int = 1) -> Defect:
    """One random defect of ``defect_type`` on ``model`` (part frame); visibility is not checked here."""
    if defect_type not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect_type!r}; known: {', '.join(DEFECT_TYPES)}")
    spec = model.spec
    r = rng.uniform(*spec.defect_radius_mm) / 1000.0
    seed = int(rng.integers(0, 2**31 - 1))
    if defect_type == "stain":
        c, n, comp = _surface_anchor(model, rng)
        return Stain(defect_id, c, n, 1.1 * r, comp, size=r, seed=seed)
    if defect_type == "scratch":
        c, n, comp = _surface_anchor(model, rng)
        tangent, _ = _tangent_frame(n, rng)
        half = rng.uniform(1.3, 2.0) * r
        width = spec.scratch_width_mm / 1000.0
        bend = rng.uniform(-0.12, 0.12) / half
        return Scratch(defect_id, c, n, half + width + abs(bend) * half * half, comp, half_length=half, width=width,
                       tangent=tangent, bend=bend, seed=seed % 1000)
    if defect_type == "dent":
        c, n, comp = _surface_anchor(model, rng)
        depth = min(spec.dent_depth_mm / 1000.0, 0.25 * r) * rng.uniform(0.7, 1.0)
        return Dent(defect_id, c, n, r, comp, size=r, depth=depth)
    if defect_type == "burr":
        c, n, comp = _edge_anchor(model, rng) if rng.random() < 0.7 else _surface_anchor(model, rng)
        t1, t2 = _tangent_frame(n, rng)
        axes = np.stack([t1, t2, n])
        pts = _jagged_hull(c - 0.1 * r * n, axes, np.array([0.9 * r, 0.5 * r, 0.55 * r]), rng)
        return Burr(defect_id, c, n, float(np.linalg.norm(pts - c, axis=1).max()), comp, hull_points=pts)
    # missing material: a chunk cut at an edge
    c, n, comp = _edge_anchor(model, rng)
    t1, t2 = _tangent_frame(n, rng)
    axes = np.stack([t1, t2, n])
    pts = _jagged_hull(c + 0.15 * r * n, axes, np.array([r, 0.8 * r, 0.75 * r]), rng)
    return Missing(defect_id, c, n, float(np.linalg.norm(pts - c, axis=1).max()), comp, hull_points=pts)


def build_part_mesh(model: ProductModel, defects: list[Defect]) -> PartMesh:
    """The part as made: the nominal solid with the defects' geometry changes applied."""
    solid = model.solid
    tags = dict(model.component_of)
    sources: dict[int, int] = {}
    for defect in defects:
        before = set(tags)
        solid = defect.modify_solid(solid, tags)
        for oid in set(tags) - before:
            sources[oid] = defect.id
            tags[oid] = defect.component
    if sources:
        mesh = part_mesh_from_manifold(solid, tags, sources, crease_deg=model.spec.crease_deg)
        if model.spec.vessel:
            label_vessel_inside(mesh)
    else:
        mesh = model.mesh
    for defect in defects:
        mesh = defect.modify_mesh(mesh)
    return mesh
