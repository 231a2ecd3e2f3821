"""Triangle meshes of simulated parts: built from manifold3d solids, tagged per face, ray-castable.

A :class:`PartMesh` is in the PART frame (metres, base at z = 0). Each face carries
- ``component``: which piece of the product it belongs to (seat, leg, ...; selects the texture frame),
- ``source``: 0 for the product's own surface, k >= 1 for geometry added by defect k (a burr's
  surface, the wall of a missing-material cavity),
and per-corner shading normals (smooth within a crease angle, sharp across it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import manifold3d as m3
import numpy as np
import trimesh
from embreex import rtcore_scene
from embreex.mesh_construction import TriangleMesh


@dataclass
class Hits:
    """First hits of a batch of rays on a mesh (part frame)."""

    ray: np.ndarray  # indices of the rays that hit
    face: np.ndarray
    t: np.ndarray  # ray length
    points: np.ndarray  # part frame
    bary: np.ndarray  # barycentric coordinates of the hit in its face

    def subset(self, keep: np.ndarray) -> "Hits":
        return Hits(self.ray[keep], self.face[keep], self.t[keep], self.points[keep], self.bary[keep])


@dataclass
class PartMesh:
    """A ray-castable part surface with per-face tags and per-corner shading normals."""

    vertices: np.ndarray  # V x 3 float64, part frame
    faces: np.ndarray  # F x 3 int64
    corner_normals: np.ndarray  # F x 3 x 3 float32, unit shading normals at the face corners
    component: np.ndarray  # F int16
    source: np.ndarray  # F int16, 0 = nominal surface, k = geometry of defect k
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def trimesh(self) -> trimesh.Trimesh:
        return trimesh.Trimesh(vertices=self.vertices, faces=self.faces, process=False, validate=False)

    @cached_property
    def _embree(self) -> tuple[rtcore_scene.EmbreeScene, np.ndarray]:
        origin = self.vertices.mean(axis=0)
        scene = rtcore_scene.EmbreeScene()
        TriangleMesh(scene=scene, vertices=(self.vertices - origin).astype(np.float32), indices=self.faces.astype(np.int32))
        return scene, origin

    def cast(self, origins: np.ndarray, dirs: np.ndarray) -> Hits:
        """First intersection of each ray (unit directions) with the surface; rays that miss are absent."""
        scene, origin = self._embree
        if len(origins) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return Hits(empty, empty, np.zeros(0), np.zeros((0, 3)), np.zeros((0, 3), dtype=np.float32))
        out = scene.run((origins - origin).astype(np.float32), dirs.astype(np.float32), output=1)
        ray = np.nonzero(out["geomID"] >= 0)[0]
        t = out["tfar"][ray].astype(np.float64)
        u, v = out["u"][ray], out["v"][ray]
        bary = np.stack([1.0 - u - v, u, v], axis=1).astype(np.float32)
        points = origins[ray] + t[:, None] * dirs[ray]
        return Hits(ray, out["primID"][ray].astype(np.int64), t, points, bary)

    def occluded(self, origins: np.ndarray, dirs: np.ndarray, max_distance: float | None = None) -> np.ndarray:
        """True for rays that hit the surface (within ``max_distance`` when given)."""
        scene, origin = self._embree
        if len(origins) == 0:
            return np.zeros(0, dtype=bool)
        dists = None if max_distance is None else np.full(len(origins), max_distance, dtype=np.float32)
        return scene.run((origins - origin).astype(np.float32), dirs.astype(np.float32), dists=dists, query="OCCLUDED") >= 0

    @cached_property
    def triangles(self) -> np.ndarray:
        return self.vertices[self.faces]

    @cached_property
    def face_normals(self) -> np.ndarray:
        t = self.triangles
        n = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-30)

    @cached_property
    def face_areas(self) -> np.ndarray:
        t = self.triangles
        return 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1)

    def ambient_visibility(self, max_distance: float, samples: int = 48) -> np.ndarray:
        """Unoccluded fraction of the cosine-weighted hemisphere at each face corner (F x 3 float32).

        Computed once per distinct (position, shading normal) corner with ``samples`` rays that count as
        blocked when they hit the surface within ``max_distance``; cached on the mesh.
        """
        key = ("ambient", round(max_distance, 9), samples)
        if key in self._cache:
            return self._cache[key]
        corners = np.concatenate([self.vertices[self.faces].reshape(-1, 3), self.corner_normals.reshape(-1, 3)], axis=1)
        unique, inverse = np.unique(np.round(corners, 7), axis=0, return_inverse=True)
        pos, nrm = unique[:, :3], unique[:, 3:] / np.linalg.norm(unique[:, 3:], axis=1, keepdims=True)
        # cosine-weighted hemisphere directions about +z (a Fibonacci spiral), turned per corner
        k = np.arange(samples) + 0.5
        r, phi = np.sqrt(k / samples), k * math.pi * (3.0 - math.sqrt(5.0))
        local = np.stack([r * np.cos(phi), r * np.sin(phi), np.sqrt(1.0 - r * r)], axis=1)
        helper = np.where(np.abs(nrm[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
        t1 = np.cross(nrm, helper)
        t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
        t2 = np.cross(nrm, t1)
        visible = np.empty(len(pos), dtype=np.float32)
        chunk = max(1, 400_000 // samples)
        for start in range(0, len(pos), chunk):
            sl = slice(start, start + chunk)
            dirs = (local[None, :, :1] * t1[sl, None] + local[None, :, 1:2] * t2[sl, None] + local[None, :, 2:] * nrm[sl, None]).reshape(-1, 3)
            origins = np.repeat(pos[sl] + 2e-5 * nrm[sl], samples, axis=0)
            blocked = self.occluded(origins, dirs, max_distance)
            visible[sl] = 1.0 - blocked.reshape(-1, samples).mean(axis=1)
        out = visible[inverse.reshape(-1)].reshape(-1, 3)
        self._cache[key] = out
        return out

    def is_watertight(self) -> bool:
        """True when the surface (with coincident vertices merged) is closed and consistently oriented."""
        merged = trimesh.Trimesh(vertices=self.vertices, faces=self.faces, process=True)
        return bool(merged.is_watertight and merged.is_winding_consistent)

    def sample_surface(self, count: int, rng: np.random.Generator, face_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Area-uniform random points. Returns (points count x 3, face index count)."""
        weights = self.face_areas.copy()
        if face_mask is not None:
            weights[~face_mask] = 0.0
        if weights.sum() <= 0:
            raise ValueError("cannot sample a surface with zero area")
        face = rng.choice(len(weights), size=count, p=weights / weights.sum())
        r1, r2 = rng.random(count), rng.random(count)
        s = np.sqrt(r1)
        bary = np.stack([1.0 - s, s * (1.0 - r2), s * r2], axis=1)
        points = np.einsum("nk,nkd->nd", bary, self.triangles[face])
        return points, face

    def shading_normals(self, face: np.ndarray, points: np.ndarray | None = None, bary: np.ndarray | None = None) -> np.ndarray:
        """Interpolated corner normals at ``points`` (or barycentric coordinates ``bary``) on faces ``face``."""
        if bary is None:
            bary = trimesh.triangles.points_to_barycentric(self.triangles[face], points)
        n = np.einsum("nk,nkd->nd", bary.astype(np.float32), self.corner_normals[face])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)

    def sharp_edges(self, min_angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
        """Edges whose two faces meet at more than ``min_angle_deg``: (E x 2 x 3 endpoints, E x 3 mean normals)."""
        merged = trimesh.Trimesh(vertices=self.vertices, faces=self.faces, process=True)
        sharp = merged.face_adjacency_angles > np.radians(min_angle_deg)
        edges = merged.vertices[merged.face_adjacency_edges[sharp]]
        pair = merged.face_adjacency[sharp]
        n = merged.face_normals[pair[:, 0]] + merged.face_normals[pair[:, 1]]
        return edges, n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def tag_original(solid: m3.Manifold, tag: int, tags: dict[int, int]) -> m3.Manifold:
    """Mark ``solid`` as an original mesh and remember which tag its faces carry."""
    solid = solid.as_original()
    tags[solid.original_id()] = tag
    return solid


def part_mesh_from_manifold(
    solid: m3.Manifold,
    component_of: dict[int, int],
    source_of: dict[int, int] | None = None,
    crease_deg: float = 40.0,
    default_component: int = 0,
) -> PartMesh:
    """Convert a manifold3d solid to a :class:`PartMesh`, mapping original mesh ids to face tags.

    ``component_of`` / ``source_of`` map manifold original ids to the face's component / source tag;
    faces from unlisted originals get ``default_component`` / source 0.
    """
    if solid.is_empty():
        raise ValueError("the solid is empty (a boolean removed everything)")
    mesh = solid.calculate_normals(0, crease_deg).to_mesh()
    props = np.asarray(mesh.vert_properties, dtype=np.float64)
    faces = np.asarray(mesh.tri_verts, dtype=np.int64)
    run_index = np.asarray(mesh.run_index, dtype=np.int64) // 3
    run_ids = list(mesh.run_original_id)
    component = np.full(len(faces), default_component, dtype=np.int16)
    source = np.zeros(len(faces), dtype=np.int16)
    for r, oid in enumerate(run_ids):
        sl = slice(run_index[r], run_index[r + 1])
        component[sl] = component_of.get(oid, default_component)
        if source_of:
            source[sl] = source_of.get(oid, 0)
    normals = props[:, 3:6].astype(np.float32)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return PartMesh(
        vertices=props[:, :3].copy(),
        faces=faces,
        corner_normals=normals[faces],
        component=component,
        source=source,
    )


def subdivide_near(mesh: PartMesh, center: np.ndarray, radius: float, max_edge: float, max_rounds: int = 14) -> PartMesh:
    """Split faces near a ball (1 -> 4 at edge midpoints) until those meeting it have edges <= ``max_edge``.

    Every face whose bounding sphere meets the ball is split each round, so new T-junctions only occur
    on faces that do not meet the ball: a displacement field that vanishes outside the ball opens no cracks.
    """
    tri = mesh.vertices[mesh.faces]
    normals, component, source = mesh.corner_normals, mesh.component, mesh.source
    done_tri, done_n, done_c, done_s = [], [], [], []
    for _ in range(max_rounds):
        centroid = tri.mean(axis=1)
        bound = np.linalg.norm(tri - centroid[:, None], axis=2).max(axis=1)
        near = np.linalg.norm(centroid - center, axis=1) - bound <= radius
        edge_len = np.linalg.norm(tri - np.roll(tri, -1, axis=1), axis=2).max(axis=1)
        if not near.any() or edge_len[near].max() <= max_edge:
            break
        keep = ~near
        done_tri.append(tri[keep]), done_n.append(normals[keep]), done_c.append(component[keep]), done_s.append(source[keep])
        t, n = tri[near], normals[near]
        mids = 0.5 * (t + np.roll(t, -1, axis=1))  # mid of edges (0,1), (1,2), (2,0)
        nmid = n + np.roll(n, -1, axis=1)
        nmid /= np.maximum(np.linalg.norm(nmid, axis=2, keepdims=True), 1e-12)
        # children: (v0, m01, m20), (m01, v1, m12), (m20, m12, v2), (m01, m12, m20)
        child_p, child_n = [], []
        for a, b, c in [((0, "v"), (0, "m"), (2, "m")), ((0, "m"), (1, "v"), (1, "m")), ((2, "m"), (1, "m"), (2, "v")), ((0, "m"), (1, "m"), (2, "m"))]:
            child_p.append(np.stack([t[:, k] if kind == "v" else mids[:, k] for k, kind in (a, b, c)], axis=1))
            child_n.append(np.stack([n[:, k] if kind == "v" else nmid[:, k] for k, kind in (a, b, c)], axis=1))
        tri = np.concatenate(child_p)
        normals = np.concatenate(child_n).astype(np.float32)
        component = np.tile(component[near], 4)
        source = np.tile(source[near], 4)
    tri = np.concatenate(done_tri + [tri])
    faces = np.arange(len(tri) * 3).reshape(-1, 3)
    return PartMesh(
        vertices=tri.reshape(-1, 3),
        faces=faces,
        corner_normals=np.concatenate(done_n + [normals]).astype(np.float32),
        component=np.concatenate(done_c + [component]),
        source=np.concatenate(done_s + [source]),
    )
