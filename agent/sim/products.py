"""Procedural products: solid geometry (manifold3d) plus a solid 3D texture per material.

Every product is built in its PART frame: metres, standing on z = 0, centred on the z axis.
Textures are evaluated at the hit point in the part frame, so they move with the part and every
instance of a product looks the same (the noise seeds are fixed per product).

Products:
- ``stool``:   wooden stool, rounded square seat, four splayed tapered legs, four rungs (~32 x 32 x 38 cm).
- ``vase``:    glazed ceramic vase (surface of revolution, open, with a wall), painted cobalt bands,
               a wave and dots on an ivory glaze with iron speckle (~17 cm wide, 26 cm tall).
- ``bracket``: brushed-steel L bracket with a bend radius, four holes and a gusset (~10 x 8 x 7.5 cm).
- ``mug``:     stoneware mug with a handle and a two-tone glaze (~12 x 9 x 10 cm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import manifold3d as m3
import numpy as np
from scipy.interpolate import PchipInterpolator

from agent.geometry import rotation_about_axis
from agent.sim.mesh import PartMesh, part_mesh_from_manifold, tag_original
from agent.sim.noise import fbm, perlin, smoothstep

# ----------------------------------------------------------------------------------------------
# Materials


@dataclass(frozen=True)
class Surface:
    """Per-point surface properties returned by a material (sRGB albedo in [0, 1])."""

    albedo: np.ndarray  # N x 3 float32
    specular: np.ndarray  # N float32, Blinn-Phong specular weight
    shininess: np.ndarray  # N float32, Blinn-Phong exponent
    gloss: np.ndarray  # N float32 in [0, 1], weight of the mirror reflection of the light tent


@dataclass(frozen=True)
class GrainFrame:
    """A texture frame of one component: ``axes`` rows are the grain (or brushing) axis first."""

    origin: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...]
    pith: tuple[float, float] = (0.0, 0.0)  # ring centre in the frame's (axis 2, axis 3) plane

    def local(self, points: np.ndarray) -> np.ndarray:
        return (points - np.asarray(self.origin)) @ np.asarray(self.axes).T


class Material:
    """Base class: a solid texture plus what the material looks like when damaged."""

    seed: int = 0
    metallic: bool = False
    fresnel_f0: float = 0.04  # reflectance at normal incidence (metals: tinted by the albedo)
    burr_shows_exposed: bool = False  # a burr shows raw material (splinter, sheared metal), not the finish
    stain_color: tuple[float, float, float] = (0.3, 0.22, 0.15)
    stain_opacity: float = 0.6
    scratch_color: tuple[float, float, float] = (0.85, 0.85, 0.85)

    def surface(self, points: np.ndarray, component: np.ndarray) -> Surface:
        raise NotImplementedError

    def exposed(self, points: np.ndarray) -> Surface:
        """The material under the finish, seen in the wall of a chip."""
        raise NotImplementedError


def _per_point(value: float, n: int) -> np.ndarray:
    return np.full(n, value, dtype=np.float32)


def _mix(a: np.ndarray, b, t: np.ndarray) -> np.ndarray:
    return a + (np.asarray(b, dtype=np.float32) - a) * t[:, None]


class Wood(Material):
    """Varnished wood: annual rings around a pith axis per component, fibre streaks, board tone."""

    metallic = False
    fresnel_f0 = 0.03
    burr_shows_exposed = True
    stain_color = (0.24, 0.16, 0.10)
    stain_opacity = 0.7
    scratch_color = (0.93, 0.80, 0.62)

    def __init__(self, frames: list[GrainFrame], seed: int, ring_spacing: float = 0.0065,
                 knots: tuple[tuple[int, float, float, float], ...] = ()):
        self.frames = frames
        self.seed = seed
        self.ring_spacing = ring_spacing
        self.knots = knots  # (component, along-grain, across-grain position in the frame, radius), axis = frame axis 3
        self.early = np.array([0.80, 0.60, 0.38], dtype=np.float32)
        self.late = np.array([0.52, 0.32, 0.17], dtype=np.float32)

    def surface(self, points: np.ndarray, component: np.ndarray) -> Surface:
        n = len(points)
        q = np.empty_like(points)
        tone = np.ones(n, dtype=np.float32)
        for c, frame in enumerate(self.frames):
            sel = component == c
            if sel.any():
                q[sel] = frame.local(points[sel])
                q[sel, 1] -= frame.pith[0]
                q[sel, 2] -= frame.pith[1]
                tone[sel] = 1.0 + 0.07 * math.sin(2.3 * c + self.seed)
        r = np.hypot(q[:, 1], q[:, 2])
        r = r + 0.0035 * fbm(q * np.array([5.0, 35.0, 35.0]), 3, self.seed)
        knot_core = np.zeros(n, dtype=np.float32)
        for comp, along, across, radius in self.knots:
            sel = np.nonzero(component == comp)[0]
            if len(sel) == 0:
                continue
            local = self.frames[comp].local(points[sel])
            d = np.hypot((local[:, 0] - along) / 1.8, local[:, 1] - across)
            r[sel] += 0.006 * np.exp(-((d / (2.2 * radius)) ** 2))  # rings swirl around the knot
            core = (1.0 - smoothstep(0.75 * radius, radius, d)) * (0.75 + 0.25 * np.cos(d / radius * 14.0))
            knot_core[sel] = np.maximum(knot_core[sel], core)
        ring = (r / self.ring_spacing) % 1.0
        late = smoothstep(0.55, 0.8, ring) * (1.0 - smoothstep(0.9, 1.0, ring))
        fibre = perlin(q * np.array([12.0, 700.0, 700.0]), self.seed + 7)
        blotch = fbm(q * np.array([4.0, 25.0, 25.0]), 2, self.seed + 11)
        albedo = _mix(np.broadcast_to(self.early, (n, 3)).copy(), self.late, 0.85 * late)
        albedo *= (tone * (1.0 + 0.10 * fibre + 0.06 * blotch))[:, None]
        albedo = _mix(albedo, (0.36, 0.20, 0.09), 0.9 * knot_core)
        return Surface(np.clip(albedo, 0, 1), _per_point(0.12, n), _per_point(30.0, n), _per_point(0.5, n))

    def exposed(self, points: np.ndarray) -> Surface:
        n = len(points)
        fibre = perlin(points * 900.0, self.seed + 3)
        albedo = np.array([0.88, 0.72, 0.52], dtype=np.float32) * (1.0 + 0.12 * fibre)[:, None]
        return Surface(np.clip(albedo, 0, 1), _per_point(0.02, n), _per_point(8.0, n), _per_point(0.0, n))


class Glaze(Material):
    """Glossy ceramic glaze with painted decoration in cylindrical coordinates (theta, z)."""

    metallic = False
    fresnel_f0 = 0.05
    stain_color = (0.42, 0.26, 0.13)
    stain_opacity = 0.65
    scratch_color = (0.55, 0.55, 0.55)

    def __init__(self, seed: int, decorate: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                 body=(0.91, 0.88, 0.80), paint=(0.10, 0.20, 0.55), biscuit=(0.80, 0.62, 0.48)):
        self.seed = seed
        self.decorate = decorate
        self.body = np.asarray(body, dtype=np.float32)
        self.paint = np.asarray(paint, dtype=np.float32)
        self.biscuit = np.asarray(biscuit, dtype=np.float32)

    def surface(self, points: np.ndarray, component: np.ndarray) -> Surface:
        n = len(points)
        theta = np.arctan2(points[:, 1], points[:, 0])
        wobble = 0.0008 * perlin(points * 300.0, self.seed + 5)
        z = points[:, 2] + wobble
        radius = np.hypot(points[:, 0], points[:, 1])
        paint = np.clip(self.decorate(theta, z, radius), 0.0, 1.0)
        mottle = fbm(points * 40.0, 2, self.seed)
        albedo = np.broadcast_to(self.body, (n, 3)) * (1.0 + 0.05 * mottle)[:, None]
        albedo = _mix(albedo, self.paint, paint * 0.95)
        painted = paint > 0.5
        if painted.any():
            albedo[painted] *= (1.0 + 0.15 * perlin(points[painted] * 250.0, self.seed + 9))[:, None]
        speck = smoothstep(0.45, 0.6, perlin(points * 700.0, self.seed + 21))
        albedo *= (1.0 - 0.55 * speck)[:, None]
        inside = component == 1
        albedo[inside] *= 0.9
        return Surface(np.clip(albedo, 0, 1), _per_point(0.55, n), _per_point(90.0, n), _per_point(1.0, n))

    def exposed(self, points: np.ndarray) -> Surface:
        n = len(points)
        grit = fbm(points * 1500.0, 2, self.seed + 13)
        albedo = np.broadcast_to(self.biscuit, (n, 3)) * (1.0 + 0.08 * grit)[:, None]
        return Surface(np.clip(albedo, 0, 1), _per_point(0.02, n), _per_point(6.0, n), _per_point(0.0, n))


class BrushedMetal(Material):
    """Brushed steel: fine streaks along a brushing axis per component, broad sheen variation."""

    metallic = True
    fresnel_f0 = 0.6
    burr_shows_exposed = True
    stain_color = (0.50, 0.27, 0.12)  # rust
    stain_opacity = 0.8
    scratch_color = (0.95, 0.95, 0.97)

    def __init__(self, frames: list[GrainFrame], seed: int, base=(0.56, 0.58, 0.62)):
        self.frames = frames
        self.seed = seed
        self.base = np.asarray(base, dtype=np.float32)

    def surface(self, points: np.ndarray, component: np.ndarray) -> Surface:
        n = len(points)
        q = np.empty_like(points)
        for c, frame in enumerate(self.frames):
            sel = component == c
            if sel.any():
                q[sel] = frame.local(points[sel])
        streak = perlin(q * np.array([6.0, 2500.0, 2500.0]), self.seed) + 0.5 * perlin(q * np.array([3.0, 700.0, 700.0]), self.seed + 1)
        sheen = fbm(q * np.array([8.0, 30.0, 30.0]), 2, self.seed + 2)
        albedo = np.broadcast_to(self.base, (n, 3)) * (1.0 + 0.10 * streak + 0.05 * sheen)[:, None]
        return Surface(np.clip(albedo, 0, 1), _per_point(0.45, n) * (1.0 + 0.2 * streak), _per_point(28.0, n), _per_point(0.75, n) * (1.0 + 0.15 * streak))

    def exposed(self, points: np.ndarray) -> Surface:
        n = len(points)
        grain = perlin(points * 3000.0, self.seed + 4)
        albedo = np.broadcast_to(np.array([0.78, 0.78, 0.80], dtype=np.float32), (n, 3)) * (1.0 + 0.06 * grain)[:, None]
        return Surface(np.clip(albedo, 0, 1), _per_point(0.6, n), _per_point(60.0, n), _per_point(0.9, n))


# ----------------------------------------------------------------------------------------------
# Geometry


def _prism_along_y(section: m3.CrossSection, width: float) -> m3.Manifold:
    """Extrude an (x, z) cross-section along y, centred on y = 0."""
    return m3.Manifold.extrude(section, width).rotate((90.0, 0.0, 0.0)).translate((0.0, width / 2.0, 0.0))


def _stool_solid() -> tuple[m3.Manifold, dict[int, int], list[GrainFrame]]:
    tags: dict[int, int] = {}
    frames: list[GrainFrame] = []
    seat_top, seat_thick, half = 0.38, 0.028, 0.16
    # rounded-square seat (30 mm corner radius in plan) with a 7 mm round-over on its top and bottom edges:
    # the hull of four corner discs whose rims are rounded
    corner_r, round_over = 0.03, 0.007
    rim = m3.CrossSection.square((corner_r, seat_thick - 2 * round_over)).translate((-round_over, round_over))
    disc = m3.Manifold.revolve(rim.offset(round_over, m3.JoinType.Round, circular_segments=12), 48)
    corners = [disc.translate((sx * (half - corner_r), sy * (half - corner_r), seat_top - seat_thick)) for sx in (-1, 1) for sy in (-1, 1)]
    seat = m3.Manifold.batch_hull(corners)
    solids = [tag_original(seat, 0, tags)]
    frames.append(GrainFrame((0, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), pith=(0.045, 0.27)))

    splay = math.radians(4.0)
    leg_top_z, leg_at = seat_top - seat_thick + 0.004, 0.112
    length = leg_top_z / math.cos(splay) + 0.03
    for k, (sx, sy) in enumerate([(1, 1), (-1, 1), (-1, -1), (1, -1)]):
        # leg along +z (narrow foot at z = 0), then tilted so that the foot points outward
        leg = m3.Manifold.extrude(m3.CrossSection.square((0.026, 0.026), center=True), length, scale_top=(1.3, 1.3))
        axis = np.array([-sx * math.sin(splay) * 0.7071, -sy * math.sin(splay) * 0.7071, math.cos(splay)])
        rot = rotation_about_axis(np.cross([0.0, 0.0, 1.0], axis), splay)
        top = np.array([sx * leg_at, sy * leg_at, leg_top_z])
        shift = top - rot @ np.array([0.0, 0.0, length])
        leg = leg.transform(np.hstack([rot, shift[:, None]])).trim_by_plane((0, 0, 1), 0.0)
        solids.append(tag_original(leg, 1 + k, tags))
        ref = np.cross(axis, [1.0, 0.0, 0.0]); ref /= np.linalg.norm(ref)
        frames.append(GrainFrame(tuple(top), (tuple(axis), tuple(ref), tuple(np.cross(axis, ref))), pith=(0.021 * sx, -0.017 * sy)))

    def leg_offset(z: float) -> float:
        return leg_at + (leg_top_z - z) * math.tan(splay) * 0.7071

    rung_r = 0.0105
    for k, (axis, z, sign) in enumerate([("x", 0.13, 1), ("x", 0.13, -1), ("y", 0.175, 1), ("y", 0.175, -1)]):
        off = leg_offset(z)
        span = 2 * off
        rung = m3.Manifold.cylinder(span, rung_r, circular_segments=32, center=True)
        if axis == "x":
            rung = rung.rotate((0, 90, 0)).translate((0, sign * off, z))
            frame = GrainFrame((0, sign * off, z), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), pith=(0.014, 0.009))
        else:
            rung = rung.rotate((90, 0, 0)).translate((sign * off, 0, z))
            frame = GrainFrame((sign * off, 0, z), ((0, 1, 0), (1, 0, 0), (0, 0, 1)), pith=(-0.012, 0.011))
        solids.append(tag_original(rung, 5 + k, tags))
        frames.append(frame)
    return m3.Manifold.batch_boolean(solids, m3.OpType.Add), tags, frames


_VASE_HEIGHT = 0.26
_VASE_PROFILE = PchipInterpolator(
    [0.0, 0.012, 0.05, 0.10, 0.15, 0.195, 0.225, 0.248, 0.26],
    [0.050, 0.055, 0.078, 0.086, 0.072, 0.043, 0.036, 0.042, 0.047],
)


def _revolved_vessel(profile, height: float, wall: float, bottom: float, segments: int = 128) -> m3.Manifold:
    """Open vessel: outer profile r(z) up to ``height``, inner wall ``wall`` thick, floor ``bottom`` thick."""
    z_out = np.linspace(0.0, height, 90)
    r_out = profile(z_out)
    z_in = np.linspace(height, bottom, 90)
    r_in = profile(z_in) - wall
    outline = [(0.0, 0.0)] + list(zip(r_out, z_out))
    outline += [(r_out[-1] - wall * 0.5, height + wall * 0.35)]  # rounded-ish lip
    outline += list(zip(r_in, z_in)) + [(0.0, bottom)]
    section = m3.CrossSection([np.asarray(outline, dtype=np.float64)], m3.FillRule.NonZero)
    return m3.Manifold.revolve(section, segments)


def _vase_solid() -> tuple[m3.Manifold, dict[int, int], list[GrainFrame]]:
    tags: dict[int, int] = {}
    vessel = _revolved_vessel(_VASE_PROFILE, _VASE_HEIGHT, 0.006, 0.012)
    return tag_original(vessel, 0, tags), tags, []


def _vase_decoration(theta: np.ndarray, z: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Paint coverage in [0, 1]: cobalt bands, a wave, dots between its crests."""
    def band(z0, z1, soft=0.0006):
        return smoothstep(z0 - soft, z0 + soft, z) * (1.0 - smoothstep(z1 - soft, z1 + soft, z))

    paint = band(0.022, 0.030) + band(0.036, 0.039) + band(0.172, 0.180) + band(0.238, 0.244)
    wave_z = 0.104 + 0.018 * np.sin(6.0 * theta)
    paint += 1.0 - smoothstep(0.0028, 0.0040, np.abs(z - wave_z))
    # dots: above the wave's troughs and below its crests
    k = np.round((theta * 6.0 / (2 * np.pi)) - 0.25)
    crest = (k + 0.25) * 2 * np.pi / 6.0
    trough = crest + np.pi / 6.0
    for centre_theta, centre_z in ((crest, 0.072), (trough, 0.136)):
        d_theta = np.angle(np.exp(1j * (theta - centre_theta)))
        dist = np.hypot(d_theta * radius, z - centre_z)
        paint += 1.0 - smoothstep(0.0065, 0.0078, dist)
        ring = np.abs(dist - 0.0105)
        paint += 1.0 - smoothstep(0.0009, 0.0016, ring)
    # leaf strokes on the shoulder
    stroke = np.abs(np.sin(12.0 * theta + 40.0 * (z - 0.155)))
    paint += (1.0 - smoothstep(0.10, 0.22, stroke)) * band(0.150, 0.165)
    return paint


_MUG_PROFILE = PchipInterpolator([0.0, 0.006, 0.05, 0.095, 0.10], [0.036, 0.040, 0.042, 0.044, 0.0445])


def _mug_solid() -> tuple[m3.Manifold, dict[int, int], list[GrainFrame]]:
    tags: dict[int, int] = {}
    body = tag_original(_revolved_vessel(_MUG_PROFILE, 0.10, 0.005, 0.008, segments=96), 0, tags)
    handle_section = m3.CrossSection.square((0.008, 0.012), center=True).offset(0.003, m3.JoinType.Round, circular_segments=12)
    handle = m3.Manifold.revolve(handle_section.translate((0.026, 0.0)), 64, 200.0)
    handle = handle.rotate((0, 0, -100.0)).rotate((90, 0, 0))
    handle = handle.translate((0.040, 0.0, 0.052))
    handle = tag_original(handle - m3.Manifold.cylinder(0.2, 0.0405, circular_segments=96).translate((0, 0, -0.05)), 2, tags)
    return m3.Manifold.batch_boolean([body, handle], m3.OpType.Add), tags, []


def _mug_decoration(theta: np.ndarray, z: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Two-tone mug: a dipped glaze over the top with a dripping edge, plus a thin line."""
    edge = 0.058 + 0.004 * np.sin(5 * theta) + 0.002 * np.sin(13 * theta + 1.0)
    dipped = smoothstep(edge - 0.0008, edge + 0.0008, z)
    line = 1.0 - smoothstep(0.0006, 0.0011, np.abs(z - 0.018))
    return dipped + line


def _bracket_solid() -> tuple[m3.Manifold, dict[int, int], list[GrainFrame]]:
    tags: dict[int, int] = {}
    t, r_in, depth, height, width = 0.003, 0.004, 0.08, 0.075, 0.10
    x0 = -depth / 2
    r_out = r_in + t
    cx, cz = x0 + r_out, r_out
    outline = [(depth / 2, 0.0), (cx, 0.0)]
    outline += [(cx + r_out * math.cos(a), cz + r_out * math.sin(a)) for a in np.linspace(-math.pi / 2, -math.pi, 12)[1:-1]]
    outline += [(x0, cz), (x0, height), (x0 + t, height), (x0 + t, cz)]
    outline += [(cx + r_in * math.cos(a), cz + r_in * math.sin(a)) for a in np.linspace(math.pi, 3 * math.pi / 2, 12)[1:-1]]
    outline += [(cx, t), (depth / 2, t)]
    poly = np.asarray(outline)
    area = 0.5 * np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])
    if area < 0:
        poly = poly[::-1]
    angle = _prism_along_y(m3.CrossSection([poly]), width)
    # rounded corners of both plates
    plan = m3.CrossSection.square((depth + 0.02 - 0.012, width - 0.012), center=True).offset(0.006, m3.JoinType.Round, circular_segments=24)
    angle = angle ^ m3.Manifold.extrude(plan.translate((-0.01, 0.0)), 0.2).translate((0, 0, -0.05))
    front = m3.CrossSection.square((width - 0.012, height + 0.02 - 0.012), center=True).offset(0.006, m3.JoinType.Round, circular_segments=24)
    front = m3.Manifold.extrude(front.translate((0.0, height / 2 - 0.01)), 0.2).rotate((90, 0, 90)).translate((-0.1, 0, 0))
    angle = angle ^ front
    hole = m3.Manifold.cylinder(0.02, 0.0033, circular_segments=32, center=True)
    for y in (-0.03, 0.03):
        angle = angle - hole.translate((0.018, y, 0.0))
        angle = angle - hole.rotate((0, 90, 0)).translate((x0, y, 0.048))
    slot = m3.CrossSection.square((0.012, 0.0001), center=True).offset(0.0032, m3.JoinType.Round, circular_segments=24)
    angle = angle - m3.Manifold.extrude(slot, 0.02).translate((0.024, 0.0, -0.01))
    gx = x0 + t - 0.0005
    gusset = m3.CrossSection([np.array([(gx, t - 0.0005), (gx + 0.042, t - 0.0005), (gx, t + 0.042)])])
    gusset = _prism_along_y(gusset, t)
    solids = [tag_original(angle, 0, tags), tag_original(gusset, 1, tags)]
    frames = [
        GrainFrame((0, 0, 0), ((0, 1, 0), (1, 0, 0), (0, 0, 1))),
        GrainFrame((0, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1))),
    ]
    solid = m3.Manifold.batch_boolean(solids, m3.OpType.Add)
    bottom = solid.bounding_box()[2]
    return solid.translate((0, 0, -bottom)), tags, frames


# ----------------------------------------------------------------------------------------------
# Product registry


@dataclass(frozen=True)
class ProductSpec:
    """A product: its solid, material and defect scale."""

    name: str
    description: str
    build: Callable[[], tuple[m3.Manifold, dict[int, int], list[GrainFrame]]]
    material: Callable[[list[GrainFrame]], Material]
    defect_radius_mm: tuple[float, float]  # range of defect radii
    scratch_width_mm: float
    dent_depth_mm: float  # maximum dent depth (kept below the wall thickness)
    crease_deg: float = 40.0
    vessel: bool = False  # open vessel: the inside faces are component 1 and get no defects
    refine_m: float | None = None  # split long edges of the solid to this length (well-shaped triangles)


def _vase_material(frames):
    return Glaze(seed=101, decorate=_vase_decoration)


def _mug_material(frames):
    return Glaze(seed=303, decorate=_mug_decoration, body=(0.72, 0.60, 0.46), paint=(0.18, 0.36, 0.34), biscuit=(0.62, 0.50, 0.40))


PRODUCTS: dict[str, ProductSpec] = {
    "stool": ProductSpec("stool", "wooden stool, ~32 x 32 x 38 cm", _stool_solid,
                         lambda f: Wood(f, seed=11, knots=((0, 0.075, -0.055, 0.012), (0, -0.095, 0.07, 0.009), (2, -0.14, 0.0, 0.007))),
                         defect_radius_mm=(10.0, 15.0), scratch_width_mm=2.2, dent_depth_mm=3.0, refine_m=0.01),
    "vase": ProductSpec("vase", "glazed ceramic vase, ~17 cm wide, 26 cm tall", _vase_solid, _vase_material,
                        defect_radius_mm=(6.0, 11.0), scratch_width_mm=1.1, dent_depth_mm=2.0, crease_deg=50.0, vessel=True, refine_m=0.008),
    "bracket": ProductSpec("bracket", "brushed-steel L bracket, ~10 x 8 x 7.5 cm", _bracket_solid,
                           lambda f: BrushedMetal(f, seed=202), defect_radius_mm=(3.5, 6.0), scratch_width_mm=0.5,
                           dent_depth_mm=1.0, refine_m=0.005),
    "mug": ProductSpec("mug", "stoneware mug with handle, ~12 x 9 x 10 cm", _mug_solid, _mug_material,
                       defect_radius_mm=(4.0, 7.0), scratch_width_mm=0.6, dent_depth_mm=1.2, crease_deg=50.0, vessel=True, refine_m=0.008),
}


def label_vessel_inside(mesh: PartMesh) -> None:
    """Mark the inner wall and floor of an open vessel (component 0 faces facing the axis) as component 1."""
    centroid = mesh.triangles.mean(axis=1)
    inward = np.einsum("nd,nd->n", mesh.face_normals[:, :2], centroid[:, :2]) < 0
    floor = (mesh.face_normals[:, 2] > 0.9) & (centroid[:, 2] > 0.005)
    mesh.component[(mesh.component == 0) & (inward | floor) & (centroid[:, 2] > 0.005)] = 1


@dataclass
class ProductModel:
    """A built product: its solid, nominal mesh, material and the numbers cameras are placed by."""

    spec: ProductSpec
    solid: m3.Manifold
    component_of: dict[int, int]
    mesh: PartMesh
    material: Material
    center: np.ndarray  # centre of the bounding box, part frame
    radius: float  # bounding-sphere radius about ``center``


def product_name(product: "str | ProductSpec") -> str:
    """The registry name of a product given by name or by its spec."""
    name = product.name if isinstance(product, ProductSpec) else product
    if name not in PRODUCTS:
        raise ValueError(f"unknown product {name!r}; known: {', '.join(sorted(PRODUCTS))}")
    return name


@lru_cache(maxsize=None)
def load_product(name: str) -> ProductModel:
    """Build (once per process) the nominal model of product ``name``."""
    if name not in PRODUCTS:
        raise ValueError(f"unknown product {name!r}; known: {', '.join(sorted(PRODUCTS))}")
    spec = PRODUCTS[name]
    solid, component_of, frames = spec.build()
    if spec.refine_m is not None:
        solid = solid.refine_to_length(spec.refine_m)
    mesh = part_mesh_from_manifold(solid, component_of, crease_deg=spec.crease_deg)
    if spec.vessel:
        label_vessel_inside(mesh)
    lo, hi = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
    center = 0.5 * (lo + hi)
    radius = float(np.linalg.norm(mesh.vertices - center, axis=1).max())
    return ProductModel(spec, solid, component_of, mesh, spec.material(frames), center, radius)
