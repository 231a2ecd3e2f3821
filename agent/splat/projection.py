"""EWA projection of 3D Gaussians into pinhole cameras (plain torch, differentiable by autograd).

Same maths as gsplat 1.5.3's ``fully_fused_projection`` (pinhole, classic mode): world -> OpenCV
camera by ``viewmats``, the perspective Jacobian with gsplat's 1.3x-field-of-view clamp, a
``eps2d`` (0.3 px^2) dilation of the 2D covariance, culling by near/far planes and the image
rectangle, and a radius of ``ceil(extend * sqrt(cov_ii))`` with
``extend = min(3.33, sqrt(2 ln(255 * opacity)))`` (the box beyond which alpha < 1/255).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from agent.splat.pose import quat_to_rotmat

ALPHA_MIN = 1.0 / 255.0  # gsplat's ALPHA_THRESHOLD: weaker contributions are skipped


@dataclass
class Projection:
    """Per camera and Gaussian: pixel-space means, conics (inverse 2D covariance), depths, radii."""

    means2d: Tensor  # [C, N, 2] pixels
    conics: Tensor  # [C, N, 3] (a, b, c) of [[a, b], [b, c]] = inverse 2D covariance
    depths: Tensor  # [C, N] z in the camera frame, metres
    radii: Tensor  # [C, N, 2] int32 pixels; 0 = culled


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    opacities: Tensor | None = None,
    eps2d: float = 0.3,
    near: float = 0.01,
    far: float = 1e10,
) -> Projection:
    """Project N Gaussians (world means [N,3], quats [N,4] wxyz, activated scales [N,3]) into C cameras.

    ``viewmats`` [C,4,4] world-to-camera (OpenCV), ``Ks`` [C,3,3]. With ``opacities`` [N] the radius
    is the tight alpha >= 1/255 box (gsplat's CUDA kernel); without, 3.33 sigma (gsplat's torch reference).
    """
    N, C = means.shape[0], viewmats.shape[0]
    RS = quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3]: covariance = RS RS^T
    R = viewmats[:, :3, :3]  # [C, 3, 3]
    t = viewmats[:, :3, 3]  # [C, 3]
    means_c = torch.matmul(means, R.transpose(1, 2)) + t[:, None, :]  # [C, N, 3]
    # Camera-frame RS, M[c, n] = R[c] @ RS[n], as one matrix product per camera.
    M = torch.matmul(R, RS.transpose(0, 1).reshape(3, N * 3)).reshape(C, 3, N, 3)  # [C, i, N, j]

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tx, ty, tz = means_c.unbind(-1)  # [C, N]
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    rz = 1.0 / torch.where(tz.abs() < 1e-9, torch.full_like(tz, 1e-9), tz)  # finite for culled points at z = 0
    xc = torch.minimum(torch.maximum(tx * rz, -lim_x_neg), lim_x_pos)
    yc = torch.minimum(torch.maximum(ty * rz, -lim_y_neg), lim_y_pos)
    # J M with the perspective Jacobian rows (fx/z, 0, -fx x/z^2), (0, fy/z, -fy y/z^2), clamped x/z, y/z.
    JM0 = (fx * rz)[..., None] * (M[:, 0] - xc[..., None] * M[:, 2])  # [C, N, 3]
    JM1 = (fy * rz)[..., None] * (M[:, 1] - yc[..., None] * M[:, 2])
    c00 = (JM0 * JM0).sum(-1) + eps2d
    c01 = (JM0 * JM1).sum(-1)
    c11 = (JM1 * JM1).sum(-1) + eps2d
    det = (c00 * c11 - c01 * c01).clamp_min(1e-10)
    conics = torch.stack([c11 / det, -c01 / det, c00 / det], dim=-1)
    means2d = torch.stack([fx * tx * rz + cx, fy * ty * rz + cy], dim=-1)

    with torch.no_grad():
        if opacities is None:
            extend = torch.full_like(tz, 3.33)
            visible = torch.ones_like(tz, dtype=torch.bool)
        else:
            op = opacities.detach()[None, :].expand_as(tz)
            visible = op >= ALPHA_MIN
            extend = torch.sqrt(2.0 * torch.log(op.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp_max(3.33)
        rx = torch.ceil(extend * torch.sqrt(c00.detach()))
        ry = torch.ceil(extend * torch.sqrt(c11.detach()))
        m2 = means2d.detach()
        valid = (
            visible
            & (c00.detach() * c11.detach() - c01.detach() ** 2 > 0)
            & (tz.detach() > near)
            & (tz.detach() < far)
            & (m2[..., 0] + rx > 0)
            & (m2[..., 0] - rx < width)
            & (m2[..., 1] + ry > 0)
            & (m2[..., 1] - ry < height)
            & torch.isfinite(m2).all(-1)
        )
        radii = torch.stack([rx, ry], dim=-1).nan_to_num(0.0).clamp(0, 2**30)
        radii = torch.where(valid[..., None], radii, torch.zeros_like(radii)).to(torch.int32)
    return Projection(means2d=means2d, conics=conics, depths=tz, radii=radii)


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """(tiles across, tiles down) covering the image."""
    return math.ceil(width / tile_size), math.ceil(height / tile_size)
