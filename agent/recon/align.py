"""Similarity alignment of estimated cameras to reference cameras (e.g. robot poses), and pose errors.

Reconstructions from SfM or a 3D foundation model live in an arbitrary frame and scale; a similarity
``x_ref = scale * R @ x_est + t`` fitted to camera centres (Umeyama, 1991) brings them into the cell frame.
Plain numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.geometry import rotation_angle_deg


@dataclass(frozen=True)
class Similarity:
    """``x -> scale * rotation @ x + translation``."""

    scale: float
    rotation: np.ndarray  # 3x3
    translation: np.ndarray  # 3

    def matrix(self) -> np.ndarray:
        """4x4 homogeneous form."""
        T = np.eye(4)
        T[:3, :3] = self.scale * self.rotation
        T[:3, 3] = self.translation
        return T

    def apply_points(self, points: np.ndarray) -> np.ndarray:
        """Transform N x 3 points."""
        return self.scale * np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def apply_c2w(self, c2w: np.ndarray) -> np.ndarray:
        """Move camera-to-world poses ([4,4] or [N,4,4]) into the target frame; they stay rigid."""
        c2w = np.asarray(c2w, dtype=np.float64)
        out = c2w.copy()
        out[..., :3, :3] = self.rotation @ c2w[..., :3, :3]
        out[..., :3, 3] = self.apply_points(c2w[..., :3, 3].reshape(-1, 3)).reshape(c2w[..., :3, 3].shape)
        return out


def umeyama(source: np.ndarray, target: np.ndarray) -> Similarity:
    """Least-squares similarity mapping N x 3 ``source`` onto ``target`` (Umeyama 1991, with scale)."""
    src, dst = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise ValueError(f"umeyama needs two N x 3 arrays of the same shape, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("umeyama: points contain NaN or infinite values")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum() / len(src)
    singular = np.linalg.svd(xs, compute_uv=False)
    if len(src) < 3 or var_s <= 0 or singular[1] < 1e-9 * max(singular[0], 1e-300):
        raise ValueError(
            f"cannot fit a similarity to {len(src)} points: at least 3 non-collinear camera centres are needed"
        )
    cov = xd.T @ xs / len(src)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1.0
    R = U @ S @ Vt
    scale = float(np.trace(np.diag(D) @ S) / var_s)
    return Similarity(scale, R, mu_d - scale * R @ mu_s)


def align_to_reference(estimated_c2w: np.ndarray, reference_c2w: np.ndarray) -> Similarity:
    """Similarity taking the estimated cameras' frame to the reference frame, fitted to camera centres.

    Both are [N,4,4] camera-to-world poses of the same N views (N >= 3, centres not collinear).
    Apply it with :meth:`Similarity.apply_c2w` / :meth:`Similarity.apply_points`.
    """
    est, ref = np.asarray(estimated_c2w, dtype=np.float64), np.asarray(reference_c2w, dtype=np.float64)
    if est.ndim != 3 or est.shape[1:] != (4, 4) or est.shape != ref.shape:
        raise ValueError(f"align_to_reference needs two [N, 4, 4] pose arrays of equal N, got {est.shape} and {ref.shape}")
    return umeyama(est[:, :3, 3], ref[:, :3, 3])


def pose_errors(estimated_c2w: np.ndarray, reference_c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per view: camera centre distance and rotation angle (degrees) between two [N,4,4] pose sets."""
    est, ref = np.asarray(estimated_c2w, dtype=np.float64), np.asarray(reference_c2w, dtype=np.float64)
    if est.shape != ref.shape or est.ndim != 3 or est.shape[1:] != (4, 4):
        raise ValueError(f"pose_errors needs two [N, 4, 4] pose arrays of equal N, got {est.shape} and {ref.shape}")
    centre = np.linalg.norm(est[:, :3, 3] - ref[:, :3, 3], axis=1)
    rotation = np.array([rotation_angle_deg(r.T @ e) for e, r in zip(est[:, :3, :3], ref[:, :3, :3])])
    return centre, rotation
