"""3D foundation models (VGGT and the like) as initialisers of poses, depth and points from unposed views.

A backend implements :class:`FoundationModel`: ``predict(images) -> FoundationPrediction`` with cameras in
the project's conventions (OpenGL camera-to-world, pinhole intrinsics with pixel centres at i + 0.5) in the
model's own frame and scale; move it into the cell frame with :meth:`FoundationPrediction.transformed` and a
similarity from :func:`agent.recon.align.align_to_reference`. :func:`gaussians_from_prediction` turns a
prediction into a :class:`~agent.splat.model.GaussianModel` initialisation.

Weights are never downloaded: :func:`load_foundation_model` takes a local file and says how to get it.
Registered backends: ``vggt`` (facebook/VGGT-1B). Others (MV-DUSt3R, Depth-Anything-3) can be added to
:data:`FOUNDATION_MODELS` with a builder of the same signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np
import torch

from agent.geometry import GL_TO_CV, Intrinsics, w2c_cv_to_c2w_gl
from agent.recon.align import Similarity
from agent.recon.vggt import VGGT, VGGTConfig, pose_encoding_to_cameras


@dataclass
class FoundationPrediction:
    """Per-view cameras and dense geometry predicted for V images, at the prediction's resolution H x W."""

    c2w: np.ndarray  # [V,4,4] float64, OpenGL camera-to-world, the model's frame and scale
    intrinsics: list[Intrinsics]  # per view, for H x W
    depth: np.ndarray  # [V,H,W] float32, z along the optical axis (model scale)
    points: np.ndarray  # [V,H,W,3] float32, world points (the model's frame)
    confidence: np.ndarray  # [V,H,W] float32, larger = more reliable (model-specific scale)
    images: np.ndarray  # [V,H,W,3] uint8, the inputs as the model saw them (colours for the points)

    def __post_init__(self) -> None:
        v, h, w = self.depth.shape
        checks = {
            "c2w": (self.c2w.shape, (v, 4, 4)),
            "points": (self.points.shape, (v, h, w, 3)),
            "confidence": (self.confidence.shape, (v, h, w)),
            "images": (self.images.shape, (v, h, w, 3)),
        }
        for name, (got, want) in checks.items():
            if tuple(got) != want:
                raise ValueError(f"FoundationPrediction.{name} must be {list(want)}, got {tuple(got)}")
        if len(self.intrinsics) != v or any((K.width, K.height) != (w, h) for K in self.intrinsics):
            raise ValueError(f"FoundationPrediction.intrinsics must be {v} cameras of {w}x{h}")

    def transformed(self, sim: Similarity) -> "FoundationPrediction":
        """The prediction moved by a similarity (e.g. into the cell frame): poses, points and depth scale."""
        points = sim.apply_points(self.points.reshape(-1, 3)).reshape(self.points.shape).astype(np.float32)
        return replace(self, c2w=sim.apply_c2w(self.c2w), points=points, depth=(self.depth * sim.scale).astype(np.float32))


class FoundationModel(Protocol):
    """A 3D foundation model that predicts cameras and dense geometry from unposed RGB images."""

    name: str

    def predict(self, images: list[np.ndarray]) -> FoundationPrediction:
        """``images``: H x W x 3 uint8 RGB (sizes may differ)."""
        ...


def depth_to_world_points(depth: np.ndarray, c2w: np.ndarray, intrinsics: list[Intrinsics]) -> np.ndarray:
    """[V,H,W] depth + cameras -> [V,H,W,3] world points (pixel centres at i + 0.5)."""
    v, h, w = depth.shape
    jj, ii = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    out = np.empty((v, h, w, 3), dtype=np.float32)
    for k, (d, pose, K) in enumerate(zip(depth, c2w, intrinsics)):
        p_cv = np.stack([(ii - K.cx) / K.fx * d, (jj - K.cy) / K.fy * d, d], axis=-1)
        c2w_cv = pose @ GL_TO_CV
        out[k] = p_cv @ c2w_cv[:3, :3].T + c2w_cv[:3, 3]
    return out


# ---------------------------------------------------------------------------------------------
# VGGT backend


def vggt_preprocess(images: list[np.ndarray], size: int = 518, patch: int = 14) -> np.ndarray:
    """VGGT's "crop" preprocessing: width -> ``size``, height scaled to a multiple of ``patch``, centre-cropped
    to at most ``size``. Returns [V,H,W,3] uint8 (all views must give the same H)."""
    out = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected H x W x 3 uint8 RGB, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        new_h = max(patch, round(h * size / w / patch) * patch)
        resized = cv2.resize(image, (size, new_h), interpolation=cv2.INTER_CUBIC if size > w else cv2.INTER_AREA)
        if new_h > size:
            top = (new_h - size) // 2
            resized = resized[top : top + size]
        out.append(resized)
    if len({o.shape for o in out}) != 1:
        raise ValueError(f"VGGT needs views of one aspect ratio; preprocessed sizes differ: {sorted({o.shape for o in out})}")
    return np.stack(out)


class VGGTModel:
    """:class:`FoundationModel` backend running :class:`agent.recon.vggt.VGGT`."""

    name = "vggt"

    def __init__(self, network: VGGT, device: str | torch.device = "cpu", use_point_head: bool = False):
        self.network = network.eval().to(device)
        self.device = torch.device(device)
        self.use_point_head = use_point_head

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> FoundationPrediction:
        """Cameras and depth for all views at once. Points come from depth + cameras (more accurate than the
        point head, as the paper reports) unless ``use_point_head``. The first view's camera is the origin."""
        if not images:
            raise ValueError("VGGT.predict needs at least one image")
        c = self.network.config
        batch = vggt_preprocess(images, c.img_size, c.patch_size)
        v, h, w = batch.shape[:3]
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        out = self.network(x, points=self.use_point_head)
        w2c, K = pose_encoding_to_cameras(out["pose_enc"][0].double().cpu(), h, w)
        c2w = np.stack([w2c_cv_to_c2w_gl(m) for m in w2c.numpy()])
        intrinsics = [Intrinsics(float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2]), w, h) for k in K.numpy()]
        for i, intr in enumerate(intrinsics):
            if not (math.isfinite(intr.fx) and math.isfinite(intr.fy) and intr.fx > 0 and intr.fy > 0):
                fov = np.degrees(out["pose_enc"][0, i, 7:].float().cpu().numpy())
                raise ValueError(f"VGGT predicted a degenerate field of view for view {i} (FoV h/w {fov} degrees); wrong weights?")
        depth = out["depth"][0, ..., 0].float().cpu().numpy()
        if self.use_point_head:
            points = out["world_points"][0].float().cpu().numpy()
            confidence = out["world_points_conf"][0].float().cpu().numpy()
        else:
            points = depth_to_world_points(depth, c2w, intrinsics)
            confidence = out["depth_conf"][0].float().cpu().numpy()
        return FoundationPrediction(c2w, intrinsics, depth, points, confidence, batch)


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class FoundationModelInfo:
    builder: Callable[..., FoundationModel]  # (state_dict, weights_path, device, **options) -> model
    how_to_obtain: str


def _build_vggt(state: dict, path: Path, device: str, config: VGGTConfig | None = None, use_point_head: bool = False) -> VGGTModel:
    network = VGGT(config or VGGTConfig())
    own = network.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own and not k.startswith(VGGT.IGNORED_PREFIXES))
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing keys, e.g. {missing[:3]}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}"] if unexpected else []
        parts += [f"{len(wrong)} keys of the wrong shape, e.g. {wrong[0]!r}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}"] if wrong else []
        raise ValueError(f"{path}: not a VGGT checkpoint for this configuration: " + "; ".join(parts))
    network.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return VGGTModel(network, device, use_point_head)


FOUNDATION_MODELS: dict[str, FoundationModelInfo] = {
    "vggt": FoundationModelInfo(
        _build_vggt,
        "download facebook/VGGT-1B model.pt (https://huggingface.co/facebook/VGGT-1B/resolve/main/model.pt) "
        "on a machine with internet, copy it here and pass --weights PATH",
    ),
}


def load_foundation_model(name: str, weights_path: str | Path, device: str = "cpu", **options) -> FoundationModel:
    """Build a registered foundation model from a local weights file (``.pt``/``.pth`` state dict or
    ``.safetensors``). ``options`` go to the backend (VGGT: ``config``, ``use_point_head``).

    Raises ValueError for an unknown name, FileNotFoundError for a missing file and ValueError for a file that
    is not a readable checkpoint of that model; every message names the path and how to obtain the weights.
    """
    from agent.features import load_state_dict_file

    info = FOUNDATION_MODELS.get(name)
    if info is None:
        raise ValueError(f"unknown foundation model {name!r}; registered: {', '.join(sorted(FOUNDATION_MODELS))}")
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} weights not found at {path}. Weights are never downloaded here: {info.how_to_obtain}")
    try:
        state = load_state_dict_file(path)
    except ValueError as exc:
        raise ValueError(f"{exc}. Is it a complete {name} checkpoint? {info.how_to_obtain}") from exc
    return info.builder(state, path, device, **options)


# ---------------------------------------------------------------------------------------------
# Prediction -> Gaussians


def gaussians_from_prediction(
    prediction: FoundationPrediction,
    *,
    confidence_quantile: float = 0.5,
    min_confidence: float | None = None,
    max_points: int = 200_000,
    opacity: float = 0.1,
    size_factor: float = 1.0,
    seed: int = 0,
):
    """A degree-0 :class:`~agent.splat.model.GaussianModel` from the prediction's confident pixels.

    Keeps pixels with positive finite depth whose confidence is at least ``min_confidence`` (default: the
    ``confidence_quantile`` of all views' confidences), then at most ``max_points`` of them at random.
    Each Gaussian is isotropic, as wide as its pixel's footprint (depth / focal length) times the subsampling
    stride and ``size_factor``; colours from the images; opacity ``opacity`` (3DGS's initial 0.1).
    """
    from agent.splat.model import GaussianModel

    if not 0.0 <= confidence_quantile < 1.0 or not 0.0 < opacity < 1.0 or max_points < 1:
        raise ValueError("confidence_quantile must be in [0, 1), opacity in (0, 1) and max_points >= 1")
    depth, conf = prediction.depth, prediction.confidence
    valid = np.isfinite(depth) & (depth > 0) & np.isfinite(conf) & np.isfinite(prediction.points).all(axis=-1)
    if not valid.any():
        raise ValueError("the prediction has no pixel with a valid depth")
    threshold = float(np.quantile(conf[valid], confidence_quantile)) if min_confidence is None else float(min_confidence)
    keep = np.flatnonzero((valid & (conf >= threshold)).reshape(-1))
    if len(keep) == 0:
        raise ValueError(f"no pixel has confidence >= {threshold:.3g} (max {conf[valid].max():.3g})")
    stride = 1.0
    if len(keep) > max_points:
        stride = float(np.sqrt(len(keep) / max_points))
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_points, replace=False))
    focal = np.array([0.5 * (K.fx + K.fy) for K in prediction.intrinsics])
    view = keep // (depth.shape[1] * depth.shape[2])
    footprint = depth.reshape(-1)[keep] / focal[view] * stride * size_factor
    n = len(keep)
    means = torch.from_numpy(prediction.points.reshape(-1, 3)[keep].astype(np.float32))
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    scales = torch.from_numpy(np.repeat(np.maximum(footprint, 1e-7)[:, None], 3, axis=1).astype(np.float32))
    rgb = torch.from_numpy(prediction.images.reshape(-1, 3)[keep].astype(np.float32) / 255.0)
    return GaussianModel.from_activated(means, quats, scales, torch.full((n,), float(opacity)), rgb)
