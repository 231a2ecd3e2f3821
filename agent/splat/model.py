"""A 3D Gaussian-splatting model (raw, optimisable parameters) and camera helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from agent import geometry
from agent.splat.rasterize import SH_C0, RasterConfig, RenderOutput, rasterize


@dataclass
class GaussianModel:
    """N Gaussians in raw (pre-activation) form, as 3DGS trains and stores them.

    means [N,3] metres; quats [N,4] wxyz, any norm; log_scales [N,3] (scale = exp);
    opacity_logits [N] (opacity = sigmoid); sh [N,K,3] SH coefficients, K = (degree+1)^2,
    sh[:, 0] the DC term (rgb = SH_C0 * dc + 0.5 at degree 0).
    """

    means: Tensor
    quats: Tensor
    log_scales: Tensor
    opacity_logits: Tensor
    sh: Tensor

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field whose shape or values are wrong."""
        if self.means.dim() != 2 or self.means.shape[1] != 3:
            raise ValueError(f"GaussianModel.means must be [N, 3], got {tuple(self.means.shape)}")
        n = self.means.shape[0]
        for name, shape in (("quats", (n, 4)), ("log_scales", (n, 3)), ("opacity_logits", (n,))):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"GaussianModel.{name} must be {list(shape)}, got {tuple(getattr(self, name).shape)}")
        k = self.sh.shape[1] if self.sh.dim() == 3 else -1
        if self.sh.dim() != 3 or self.sh.shape[0] != n or self.sh.shape[2] != 3 or int(round(k**0.5)) ** 2 != k or k > 16:
            raise ValueError(f"GaussianModel.sh must be [N, K, 3] with K in (1, 4, 9, 16), got {tuple(self.sh.shape)}")
        for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"GaussianModel.{name} contains NaN or infinite values")

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return int(round(self.sh.shape[1] ** 0.5)) - 1

    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    def rgb(self) -> Tensor:
        """View-independent colour from the DC term, [N,3] in [0, 1]."""
        return torch.clamp(SH_C0 * self.sh[:, 0] + 0.5, 0.0, 1.0)

    def parameters(self) -> list[Tensor]:
        return [self.means, self.quats, self.log_scales, self.opacity_logits, self.sh]

    def requires_grad_(self, flag: bool = True) -> "GaussianModel":
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "GaussianModel":
        return GaussianModel(*(p.detach().to(device=device, dtype=dtype) for p in self.parameters()))

    @classmethod
    def from_activated(
        cls, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, rgb: Tensor, sh_degree: int = 0
    ) -> "GaussianModel":
        """Build from activated values (scales in metres, opacities in (0, 1), rgb in [0, 1])."""
        if not (scales > 0).all():
            raise ValueError("scales must be positive")
        if not ((opacities > 0) & (opacities < 1)).all():
            raise ValueError("opacities must lie strictly between 0 and 1")
        sh = torch.zeros(means.shape[0], (sh_degree + 1) ** 2, 3, dtype=means.dtype, device=means.device)
        sh[:, 0] = (rgb - 0.5) / SH_C0
        return cls(means, quats, torch.log(scales), torch.logit(opacities), sh)

    def render(
        self,
        viewmats: Tensor,
        Ks: Tensor,
        width: int,
        height: int,
        *,
        object_pose: Tensor | None = None,
        backgrounds: Tensor | None = None,
        backend: str = "auto",
        config: RasterConfig = RasterConfig(),
    ) -> RenderOutput:
        """Render with :func:`agent.splat.rasterize.rasterize`; degree 0 uses plain RGB, higher degrees SH."""
        if self.sh_degree == 0:
            colors, sh_degree = SH_C0 * self.sh[:, 0] + 0.5, None
        else:
            colors, sh_degree = self.sh, self.sh_degree
        return rasterize(
            self.means, self.quats, self.scales(), self.opacities(), colors, viewmats, Ks, width, height,
            object_pose=object_pose, backgrounds=backgrounds, backend=backend, sh_degree=sh_degree, config=config,
        )  # fmt: skip


def viewmats_from_c2w(c2w_gl: Sequence[np.ndarray] | np.ndarray, dtype=torch.float32, device=None) -> Tensor:
    """OpenGL camera-to-world poses [C,4,4] (or one 4x4) -> gsplat viewmats [C,4,4] (OpenCV world-to-camera)."""
    arr = np.asarray(c2w_gl, dtype=np.float64)
    if arr.shape == (4, 4):
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (4, 4):
        raise ValueError(f"c2w poses must be [C, 4, 4], got {arr.shape}")
    mats = [geometry.c2w_gl_to_w2c_cv(geometry.check_rigid(T, what=f"c2w[{i}]")) for i, T in enumerate(arr)]
    return torch.tensor(np.stack(mats), dtype=dtype, device=device)


def Ks_from_intrinsics(
    intrinsics: geometry.Intrinsics | Sequence[geometry.Intrinsics], dtype=torch.float32, device=None
) -> Tensor:
    """Intrinsics (one or a list) -> Ks [C,3,3]."""
    items = [intrinsics] if isinstance(intrinsics, geometry.Intrinsics) else list(intrinsics)
    for K in items:
        K.validate()
    return torch.tensor(np.stack([K.matrix() for K in items]), dtype=dtype, device=device)
