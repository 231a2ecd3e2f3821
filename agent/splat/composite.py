"""Alpha compositing in plain torch (autograd): tile binning, a tile-vectorised path, a naive reference.

Compositing rules (gsplat 1.5.3's CUDA kernel): Gaussians front to back by depth (ties by index);
at pixel centre p, ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`` with ``(dx, dy) = mean2d - p``;
``alpha = min(ALPHA_MAX, opacity exp(-sigma))``; skipped when ``sigma < 0`` or ``alpha < ALPHA_MIN``;
a pixel stops before the Gaussian that would bring its transmittance to ``<= T_MIN`` (that one is
not composited). Outputs are not normalised and carry no background.

All functions take per-image arrays: means2d [I,N,2], conics [I,N,3], colors [I,N,CH], opacities [I,N].
"""

from __future__ import annotations

import torch
from torch import Tensor

from agent.splat.projection import ALPHA_MIN, tile_grid

ALPHA_MAX = 0.999  # gsplat 1.5.3 clamp (the INRIA reference uses 0.99)
T_MIN = 1e-4  # a pixel is done once its transmittance would fall to this


def _sigma_alpha(dx: Tensor, dy: Tensor, conic: Tensor, opacity: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, b, c = conic.unbind(-1)
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = torch.clamp_max(opacity * torch.exp(-sigma), ALPHA_MAX)
    valid = (sigma >= 0) & (alpha >= ALPHA_MIN)
    return sigma, alpha, valid


@torch.no_grad()
def bin_gaussians_torch(
    means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int
) -> tuple[Tensor, Tensor]:
    """Tile intersection lists, front to back. Returns (offsets [I*tiles+1] int64, flat ids [n] int64 into I*N).

    Tile rectangle of a Gaussian: ``[floor((m - r)/ts), ceil((m + r)/ts))`` clipped to the grid (gsplat's isect_tiles).
    """
    I, N = means2d.shape[:2]
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    n_tiles = tiles_x * tiles_y
    m = means2d.detach().reshape(-1, 2).double() / tile_size
    r = radii.reshape(-1, 2).double() / tile_size
    x0 = torch.floor(m[:, 0] - r[:, 0]).clamp(0, tiles_x).long()
    x1 = torch.ceil(m[:, 0] + r[:, 0]).clamp(0, tiles_x).long()
    y0 = torch.floor(m[:, 1] - r[:, 1]).clamp(0, tiles_y).long()
    y1 = torch.ceil(m[:, 1] + r[:, 1]).clamp(0, tiles_y).long()
    counts = (x1 - x0) * (y1 - y0) * (radii.reshape(-1, 2) > 0).all(-1)
    g = torch.repeat_interleave(torch.arange(I * N), counts)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(g.numel()) - start[g]
    w = (x1 - x0)[g]
    tile = (g // N) * n_tiles + (y0[g] + local // w) * tiles_x + x0[g] + local % w
    order = torch.sort(depths.detach().reshape(-1)[g], stable=True).indices
    order = order[torch.sort(tile[order], stable=True).indices]
    flat = g[order]
    per_tile = torch.bincount(tile, minlength=I * n_tiles)
    offsets = torch.zeros(I * n_tiles + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(per_tile, 0)
    return offsets, flat


def composite_tiles_torch(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    offsets: Tensor,
    flat: Tensor,
    width: int,
    height: int,
    tile_size: int,
    chunk_elements: int = 1 << 21,
) -> tuple[Tensor, Tensor]:
    """Tile-vectorised compositing with torch ops (autograd backward). Returns (colors [I,H,W,CH], alpha [I,H,W,1]).

    Per chunk of tiles, every pixel x list-entry pair is evaluated at once; the sequential early stop
    is expressed with cumulative products (transmittance is monotone, so "stopped" is a prefix test).
    """
    I, N, CH = colors.shape
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    n_tiles = tiles_x * tiles_y
    P = tile_size * tile_size
    m_f, c_f = means2d.reshape(I * N, 2), conics.reshape(I * N, 3)
    col_f, op_f = colors.reshape(I * N, CH), opacities.reshape(I * N)
    counts = offsets[1:] - offsets[:-1]
    ty, tx = torch.meshgrid(torch.arange(tile_size), torch.arange(tile_size), indexing="ij")
    local = torch.stack([tx.reshape(-1), ty.reshape(-1)], -1).to(means2d.dtype) + 0.5  # [P, 2]

    out = means2d.new_zeros(I * n_tiles, P, CH)
    alpha_out = means2d.new_zeros(I * n_tiles, P)
    busy = torch.nonzero(counts > 0).squeeze(1)
    busy = busy[torch.argsort(counts[busy])]  # similar lengths share a chunk: less padding
    pieces, alpha_pieces, done_ids = [], [], []
    lengths = counts[busy].tolist()
    i = 0
    while i < len(lengths):
        j = i + 1  # lengths ascend: the chunk's padded size is set by its last tile
        while j < len(lengths) and (j + 1 - i) * P * lengths[j] <= chunk_elements:
            j += 1
        tiles, L = busy[i:j], lengths[j - 1]
        i = j
        ar = torch.arange(L)
        present = ar[None, :] < counts[tiles][:, None]  # [nt, L]
        idx = flat[(offsets[tiles][:, None] + ar[None, :]).clamp_max(flat.numel() - 1)]  # [nt, L]
        tile_in_image = tiles % n_tiles
        origin = torch.stack([(tile_in_image % tiles_x) * tile_size, (tile_in_image // tiles_x) * tile_size], -1)
        pix = origin[:, None, :].to(means2d.dtype) + local[None]  # [nt, P, 2]
        mg = m_f[idx]  # [nt, L, 2]
        dx = mg[:, None, :, 0] - pix[:, :, None, 0]  # [nt, P, L]
        dy = mg[:, None, :, 1] - pix[:, :, None, 1]
        _, alpha, valid = _sigma_alpha(dx, dy, c_f[idx][:, None], op_f[idx][:, None])
        a = torch.where(valid & present[:, None, :], alpha, torch.zeros_like(alpha))
        with torch.no_grad():
            keep = torch.cumprod(1.0 - a, dim=-1) > T_MIN
        a = a * keep
        trans = torch.cumprod(1.0 - a, dim=-1)  # inclusive
        t_before = torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]], dim=-1)
        weights = a * t_before
        pieces.append(torch.einsum("tpl,tlc->tpc", weights, col_f[idx]))
        alpha_pieces.append(1.0 - trans[..., -1])
        done_ids.append(tiles)
    if done_ids:
        ids = torch.cat(done_ids)
        out = out.index_copy(0, ids, torch.cat(pieces))
        alpha_out = alpha_out.index_copy(0, ids, torch.cat(alpha_pieces))
    # [I*tiles, ts, ts, CH] -> [I, H, W, CH]
    out = out.reshape(I, tiles_y, tiles_x, tile_size, tile_size, CH).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(I, tiles_y * tile_size, tiles_x * tile_size, CH)[:, :height, :width]
    alpha_out = alpha_out.reshape(I, tiles_y, tiles_x, tile_size, tile_size).permute(0, 1, 3, 2, 4)
    alpha_out = alpha_out.reshape(I, tiles_y * tile_size, tiles_x * tile_size)[:, :height, :width]
    return out, alpha_out[..., None]


def composite_naive(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Reference: one Gaussian at a time over the whole image, front to back (slow; for tests and benches)."""
    I, N, CH = colors.shape
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=means2d.dtype) + 0.5, torch.arange(width, dtype=means2d.dtype) + 0.5, indexing="ij"
    )
    outs, alphas = [], []
    for i in range(I):
        visible = torch.nonzero((radii[i] > 0).all(-1)).squeeze(1)
        order = visible[torch.sort(depths[i, visible].detach(), stable=True).indices]
        T = torch.ones(height, width, dtype=means2d.dtype)
        done = torch.zeros(height, width, dtype=torch.bool)
        out = means2d.new_zeros(height, width, CH)
        for g in order.tolist():
            dx = means2d[i, g, 0] - xs
            dy = means2d[i, g, 1] - ys
            _, alpha, valid = _sigma_alpha(dx, dy, conics[i, g], opacities[i, g])
            valid = valid & ~done
            next_T = T * (1.0 - alpha)
            stop = valid & (next_T <= T_MIN)
            done = done | stop
            valid = valid & ~stop
            out = out + torch.where(valid, alpha * T, torch.zeros_like(T))[..., None] * colors[i, g]
            T = torch.where(valid, next_T, T)
        outs.append(out)
        alphas.append(1.0 - T)
    return torch.stack(outs), torch.stack(alphas)[..., None]
