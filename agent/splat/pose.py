"""Differentiable rigid transforms for placing a Gaussian model (torch)."""

from __future__ import annotations

import torch
from torch import Tensor


def skew(v: Tensor) -> Tensor:
    """[..., 3] -> [..., 3, 3] cross-product matrices."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(v.shape[:-1] + (3, 3))


def rotvec_to_matrix(rotvec: Tensor) -> Tensor:
    """Axis-angle [..., 3] (angle = norm, radians) -> rotation [..., 3, 3] (Rodrigues), smooth at zero."""
    theta2 = (rotvec * rotvec).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    small = theta2 < 1e-8
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = torch.sqrt(safe2)
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / safe2)
    K = skew(rotvec)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def pose_from_vector(xi: Tensor) -> Tensor:
    """6-vector [..., 6] = (axis-angle rotation, translation in metres) -> rigid 4x4 [..., 4, 4].

    The transform is x -> R(xi[:3]) x + xi[3:]: a rotation about the world origin, then a translation.
    (Not the SE(3) exponential; for the small corrections of placement refinement they agree to first order.)
    """
    if xi.shape[-1] != 6:
        raise ValueError(f"pose vector must have 6 entries (rotvec, translation), got shape {tuple(xi.shape)}")
    R = rotvec_to_matrix(xi[..., :3])
    top = torch.cat([R, xi[..., 3:, None]], dim=-1)
    bottom = torch.zeros(xi.shape[:-1] + (1, 4), dtype=xi.dtype, device=xi.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def as_pose_matrix(pose: Tensor) -> Tensor:
    """Accept a rigid 4x4 or a 6-vector (see :func:`pose_from_vector`); return the 4x4 matrix."""
    if pose.shape == (6,):
        return pose_from_vector(pose)
    if pose.shape == (4, 4):
        return pose
    raise ValueError(f"object_pose must be a 4x4 rigid transform or a 6-vector, got shape {tuple(pose.shape)}")


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Quaternions [..., 4] (w, x, y, z; any norm) -> rotation matrices [..., 3, 3]."""
    q = torch.nn.functional.normalize(quats, p=2, dim=-1)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return R.reshape(q.shape[:-1] + (3, 3))


def rotmat_to_quat(R: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] (w, x, y, z), w >= 0."""
    m = R
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack(
        [
            torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
        ],
        dim=-2,
    )  # [..., 4, 4]: row i is 4 q_i q (up to scale); pick the best-conditioned row
    best = cands.norm(dim=-1).argmax(dim=-1, keepdim=True)
    q = torch.gather(cands, -2, best[..., None].expand(best.shape + (4,))).squeeze(-2)
    q = torch.nn.functional.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def transform_gaussians(means: Tensor, quats: Tensor, pose: Tensor) -> tuple[Tensor, Tensor]:
    """Apply a rigid pose (4x4 or 6-vector) to Gaussian means [N,3] and rotations [N,4] in the world frame."""
    T = as_pose_matrix(pose).to(means.dtype)
    R, t = T[:3, :3], T[:3, 3]
    new_means = means @ R.T + t
    new_quats = rotmat_to_quat(R @ quat_to_rotmat(quats))
    return new_means, new_quats
