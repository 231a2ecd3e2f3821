"""Gaussian splatting: the reference model of a part, its PLY files, and a differentiable rasterizer.

Entry point: :func:`rasterize` (gsplat on CUDA, our C++ tile kernel on CPU). See rasterize.py.
"""

from agent.splat.model import GaussianModel, Ks_from_intrinsics, viewmats_from_c2w
from agent.splat.ply import load_ply, save_ply
from agent.splat.pose import pose_from_vector, transform_gaussians
from agent.splat.rasterize import RasterConfig, RenderOutput, rasterize

__all__ = [
    "GaussianModel",
    "Ks_from_intrinsics",
    "RasterConfig",
    "RenderOutput",
    "load_ply",
    "pose_from_vector",
    "rasterize",
    "save_ply",
    "transform_gaussians",
    "viewmats_from_c2w",
]
