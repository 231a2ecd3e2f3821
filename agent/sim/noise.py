"""Solid (3D) procedural noise for textures: Perlin gradient noise and fractal sums of it.

Vectorised numpy, deterministic for a given integer seed, no lookup tables to build.
"""

from __future__ import annotations

import numpy as np

# The 12 edge directions of a cube (Perlin's improved-noise gradients), padded to 16.
_GRADIENTS = np.array(
    [
        [1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0],
        [1, 0, 1], [-1, 0, 1], [1, 0, -1], [-1, 0, -1],
        [0, 1, 1], [0, -1, 1], [0, 1, -1], [0, -1, -1],
        [1, 1, 0], [-1, 1, 0], [0, -1, 1], [0, -1, -1],
    ],
    dtype=np.float32,
)


_PRIMES = (np.uint32(73856093), np.uint32(19349663), np.uint32(83492791))
_MIX = np.uint32(0x5BD1E995)
# gradient components looked up separately (faster than gathering rows)
_GX, _GY, _GZ = (np.ascontiguousarray(_GRADIENTS[:, k]) for k in range(3))


def perlin(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """Gradient noise at N x 3 points (lattice spacing 1), values roughly in [-1, 1], zero on the lattice."""
    p = np.asarray(points, dtype=np.float32)
    base = np.floor(p)
    f = p - base
    i = base.astype(np.int32).view(np.uint32)  # wraps negative lattice coordinates consistently
    u = f * f * f * (f * (f * 6.0 - 15.0) + 10.0)
    # per-axis hash terms for the lattice coordinate and its successor
    hx = (i[:, 0] * _PRIMES[0], (i[:, 0] + np.uint32(1)) * _PRIMES[0])
    hy = (i[:, 1] * _PRIMES[1], (i[:, 1] + np.uint32(1)) * _PRIMES[1])
    hz = (i[:, 2] * _PRIMES[2] ^ np.uint32(seed & 0xFFFFFFFF), (i[:, 2] + np.uint32(1)) * _PRIMES[2] ^ np.uint32(seed & 0xFFFFFFFF))
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    wx = (1.0 - u[:, 0], u[:, 0])
    wy = (1.0 - u[:, 1], u[:, 1])
    wz = (1.0 - u[:, 2], u[:, 2])
    out = np.zeros(len(p), dtype=np.float32)
    for dx in (0, 1):
        for dy in (0, 1):
            hxy = hx[dx] ^ hy[dy]
            wxy = wx[dx] * wy[dy]
            for dz in (0, 1):
                h = hxy ^ hz[dz]
                h ^= h >> np.uint32(13)
                h *= _MIX
                h ^= h >> np.uint32(15)
                g = h & np.uint32(15)
                dot = _GX[g] * (fx - dx) + _GY[g] * (fy - dy) + _GZ[g] * (fz - dz)
                out += wxy * wz[dz] * dot
    return out


def fbm(points: np.ndarray, octaves: int = 4, seed: int = 0, lacunarity: float = 2.0, gain: float = 0.5) -> np.ndarray:
    """Fractal Brownian motion: a sum of ``octaves`` Perlin layers, normalised to roughly [-1, 1]."""
    p = np.asarray(points, dtype=np.float32)
    total = np.zeros(len(p), dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        total += amplitude * perlin(p, seed + 1013 * octave)
        norm += amplitude
        amplitude *= gain
        p = p * np.float32(lacunarity)
    return total / np.float32(norm * 0.7)


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1``."""
    t = np.clip((np.asarray(x, dtype=np.float32) - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
