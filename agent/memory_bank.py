"""PatchCore memory bank: greedy coreset subsampling, faiss nearest-neighbour scoring, safe storage.

- ``greedy_coreset_indices``: PatchCore's approximate greedy k-center selection on torch. Features are
  randomly projected to ``projection_dim`` for the selection (Johnson-Lindenstrauss); the starting
  "distance to the coreset" is the mean distance to a few random anchor points (which are not
  themselves selected); then each step adds the point farthest from the selected set.
- ``MemoryBank``: the selected patch features ``[N, D]`` float32 in a faiss ``IndexFlatL2``. A patch's
  score is its Euclidean distance to the nearest bank feature (the mean over the ``k`` nearest when
  ``k > 1``). ``image_scores`` optionally applies PatchCore's reweighting of the maximum patch score.
- Storage: safetensors (no pickle) with a format tag, ``k`` and a SHA-256 of the features in the header;
  ``MemoryBank.load`` validates shapes, dtype, finiteness and the checksum.
- ``anomaly_maps``: patch scores -> image-size maps (bilinear upsampling, Gaussian blur sigma 4 as PatchCore).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import scipy.ndimage
import torch

from agent.features import upsample_cells

FORMAT_TAG = "edge-inspection-agent/memory-bank"
FORMAT_VERSION = "1"
_RESERVED_METADATA = ("format", "version", "k", "sha256")

ArrayLike = np.ndarray | torch.Tensor


def patch_rows(features: ArrayLike) -> np.ndarray:
    """``[B, D, h, w]`` patch features (or ``[N, D]`` rows) -> C-contiguous float32 rows ``[B*h*w, D]``."""
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float32).numpy()
    features = np.asarray(features)
    if features.ndim == 4:
        features = features.transpose(0, 2, 3, 1).reshape(-1, features.shape[1])
    elif features.ndim != 2:
        raise ValueError(f"patch features must be [B, D, h, w] or [N, D], got shape {features.shape}")
    return np.ascontiguousarray(features, dtype=np.float32)


def greedy_coreset_indices(
    features: ArrayLike,
    n_select: int,
    projection_dim: int = 128,
    n_anchors: int = 10,
    anchor_indices: np.ndarray | list[int] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Indices of ``n_select`` rows of ``features`` ([B, D, h, w] or [N, D]) chosen by approximate greedy k-center.

    Rows wider than ``projection_dim`` are first multiplied by a fixed Gaussian random matrix (seeded).
    ``anchor_indices`` fixes the anchor points (otherwise ``n_anchors`` random rows, seeded). Returns int64
    indices in selection order; the first ``m`` of them are the selection for ``n_select = m``.
    """
    rows = torch.from_numpy(patch_rows(features)).to(device)
    n, dim = rows.shape
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in [1, {n}], got {n_select}")
    generator = torch.Generator().manual_seed(seed)
    if dim > projection_dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
        rows = rows @ projection.to(device)
    sq_norms = rows.square().sum(dim=1)
    rows_t = rows.T.contiguous()  # [dim, N]: vector @ rows_t is far faster than rows @ vector on CPU

    if anchor_indices is None:
        anchors = torch.randperm(n, generator=generator)[: max(1, min(n_anchors, n))]
    else:
        anchors = torch.as_tensor(np.asarray(anchor_indices, dtype=np.int64))
        if anchors.ndim != 1 or len(anchors) == 0 or int(anchors.min()) < 0 or int(anchors.max()) >= n:
            raise ValueError(f"anchor_indices must be a non-empty list of row indices in [0, {n})")
    anchors = anchors.to(device)
    anchor_d2 = (sq_norms[:, None] - 2.0 * (rows[anchors] @ rows_t).T + sq_norms[anchors][None, :]).clamp_min_(0.0)
    # Squared distances throughout: the farthest point is the same, no square roots in the loop.
    min_d2 = anchor_d2.sqrt_().mean(dim=1).square_()
    selected = torch.empty(n_select, dtype=torch.int64, device=device)
    with _single_cpu_thread(rows.device):
        for step in range(n_select):
            index = torch.argmax(min_d2)
            selected[step] = index
            d2 = (rows[index] @ rows_t).mul_(-2.0).add_(sq_norms).add_(sq_norms[index])
            torch.minimum(min_d2, d2, out=min_d2)
            min_d2[index] = -1.0  # never select the same row twice (rounding can leave it slightly > 0)
    return selected.cpu().numpy()


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device):
    """Run torch CPU ops on one thread: the greedy loop's small memory-bound steps are several times slower
    with OpenMP threads on a busy 2-core machine (measured: 0.7 vs 4 ms per step for 37k x 128)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def coverage_radius(features: ArrayLike, bank: ArrayLike) -> float:
    """Largest distance from any row of ``features`` to its nearest row of ``bank`` (exact, faiss)."""
    rows, bank_rows = patch_rows(features), patch_rows(bank)
    index = faiss.IndexFlatL2(bank_rows.shape[1])
    index.add(bank_rows)
    d2, _ = index.search(rows, 1)
    return float(np.sqrt(np.maximum(d2, 0.0)).max())


@dataclass(eq=False)
class MemoryBank:
    """Nominal patch features ``[N, D]`` (float32) with faiss kNN scoring.

    ``k``: number of nearest bank features whose distances are averaged into a patch score (1 = PatchCore).
    ``metadata``: free string pairs stored with the bank (e.g. the extractor's name and stride).
    """

    features: np.ndarray
    k: int = 1
    metadata: dict[str, str] = field(default_factory=dict)
    _index: faiss.IndexFlatL2 = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        features = np.asarray(self.features)
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
            raise ValueError(f"memory bank features must be a non-empty [N, D] array, got shape {features.shape}")
        if features.dtype != np.float32:
            raise ValueError(f"memory bank features must be float32, got {features.dtype}")
        if not np.all(np.isfinite(features)):
            raise ValueError("memory bank features contain NaN or infinite values")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or not 1 <= self.k <= len(features):
            raise ValueError(f"k must be an integer in [1, {len(features)}], got {self.k!r}")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"metadata must map str to str, got {key!r}: {value!r}")
        self.features = np.ascontiguousarray(features)
        self.k = int(self.k)
        self._index = faiss.IndexFlatL2(self.dim)
        self._index.add(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def build(
        cls,
        features: ArrayLike,
        fraction: float = 0.1,
        size: int | None = None,
        k: int = 1,
        projection_dim: int = 128,
        seed: int = 0,
        metadata: dict[str, str] | None = None,
        device: torch.device | str = "cpu",
    ) -> "MemoryBank":
        """A bank from nominal patch features ([B, D, h, w] or [N, D]) by greedy coreset subsampling.

        Keeps ``size`` rows if given, else ``ceil(fraction * N)``; keeps all rows when that is >= N.
        """
        rows = patch_rows(features)
        if size is None:
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"fraction must be in (0, 1], got {fraction}")
            size = math.ceil(fraction * len(rows))
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if size < len(rows):
            keep = greedy_coreset_indices(rows, size, projection_dim=projection_dim, seed=seed, device=device)
            rows = rows[keep]
        return cls(rows, k=k, metadata=dict(metadata or {}))

    def nearest(self, rows: ArrayLike, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances ``[M, k]`` and bank indices ``[M, k]`` of the ``k`` nearest bank features."""
        rows = patch_rows(rows)
        if rows.shape[1] != self.dim:
            raise ValueError(f"features have dimension {rows.shape[1]}, the memory bank has {self.dim}")
        k = self.k if k is None else k
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}], got {k}")
        d2, idx = self._index.search(rows, k)
        return np.sqrt(np.maximum(d2, 0.0)), idx

    def score_patches(self, features: ArrayLike) -> np.ndarray:
        """Patch anomaly scores ``[B, h, w]`` float32 for patch features ``[B, D, h, w]``."""
        shape = tuple(features.shape)
        if len(shape) != 4:
            raise ValueError(f"patch features must be [B, D, h, w], got shape {shape}")
        distances, _ = self.nearest(features)
        b, _, h, w = shape
        return distances.mean(axis=1).astype(np.float32).reshape(b, h, w)

    def image_scores(self, features: ArrayLike, reweight: bool = False, n_support: int = 9) -> np.ndarray:
        """Per-image scores ``[B]``: the maximum patch score, optionally with PatchCore's reweighting.

        Reweighting (PatchCore eq. 7): for the maximum patch ``m_test`` with nearest bank feature ``m*``, the
        score is multiplied by ``1 - softmax(d)[0]`` where ``d`` are the distances from ``m_test`` to
        ``m*`` and to its other ``n_support - 1`` nearest bank neighbours.
        """
        scores = self.score_patches(features)
        flat = scores.reshape(len(scores), -1)
        best = flat.argmax(axis=1)
        result = flat[np.arange(len(flat)), best].astype(np.float64)
        if not reweight:
            return result.astype(np.float32)
        if not 1 <= n_support <= len(self):
            raise ValueError(f"n_support must be in [1, {len(self)}], got {n_support}")
        rows = patch_rows(features).reshape(len(flat), -1, self.dim)
        worst_rows = rows[np.arange(len(flat)), best]
        _, nearest_index = self.nearest(worst_rows, 1)
        _, support = self._index.search(self.features[nearest_index[:, 0]], n_support)
        # faiss may order exact ties arbitrarily: make sure m* itself comes first.
        support[:, 0] = nearest_index[:, 0]
        d = np.linalg.norm(self.features[support] - worst_rows[:, None, :], axis=2).astype(np.float64)
        softmax = np.exp(d - d.max(axis=1, keepdims=True))
        softmax /= softmax.sum(axis=1, keepdims=True)
        return (result * (1.0 - softmax[:, 0])).astype(np.float32)

    # -- storage -----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the bank as a safetensors file (tensor ``features``; format, k, checksum and metadata in the header)."""
        from safetensors.numpy import save_file

        clash = [key for key in self.metadata if key in _RESERVED_METADATA]
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved by the memory bank format")
        header = dict(self.metadata)
        header.update(format=FORMAT_TAG, version=FORMAT_VERSION, k=str(self.k), sha256=_checksum(self.features))
        save_file({"features": self.features}, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> "MemoryBank":
        """Read and validate a bank written by ``save``; ValueError naming the file and the problem."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"memory bank file not found: {path}")
        try:
            with safe_open(str(path), framework="np") as f:
                header = dict(f.metadata() or {})
                keys = set(f.keys())
                features = f.get_tensor("features") if keys == {"features"} else None
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise ValueError(f"{path}: not a readable safetensors memory bank ({type(exc).__name__}: {exc})") from exc
        if header.get("format") != FORMAT_TAG:
            raise ValueError(f"{path}: header 'format' is {header.get('format')!r}, expected {FORMAT_TAG!r}")
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: header 'version' is {header.get('version')!r}, expected {FORMAT_VERSION!r}")
        if features is None:
            raise ValueError(f"{path}: expected exactly one tensor 'features', found {sorted(keys)}")
        if features.dtype != np.float32 or features.ndim != 2 or 0 in features.shape:
            raise ValueError(f"{path}: 'features' must be non-empty float32 [N, D], got {features.dtype} {features.shape}")
        if not np.all(np.isfinite(features)):
            raise ValueError(f"{path}: 'features' contain NaN or infinite values")
        if header.get("sha256") != _checksum(features):
            raise ValueError(f"{path}: 'features' do not match the checksum in the header (file modified or corrupt)")
        try:
            k = int(header["k"])
        except (KeyError, ValueError):
            raise ValueError(f"{path}: header 'k' is {header.get('k')!r}, expected an integer") from None
        if not 1 <= k <= len(features):
            raise ValueError(f"{path}: header 'k' = {k} is outside [1, {len(features)}]")
        metadata = {key: value for key, value in header.items() if key not in _RESERVED_METADATA}
        return cls(features, k=k, metadata=metadata)


def _checksum(features: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(features, dtype="<f4").tobytes()).hexdigest()


def anomaly_maps(
    patch_scores: np.ndarray, image_size: tuple[int, int], stride: int, sigma: float = 4.0
) -> np.ndarray:
    """Patch scores ``[B, h, w]`` (or ``[h, w]``) -> image-size maps ``[B, H, W]`` (or ``[H, W]``) float32.

    Bilinear upsampling (cell ``i`` covers pixels ``[stride*i, stride*(i+1))``) then a Gaussian blur of
    ``sigma`` pixels per map (scipy, reflect border, as PatchCore); ``sigma = 0`` skips the blur.
    """
    scores = np.asarray(patch_scores, dtype=np.float32)
    single = scores.ndim == 2
    if single:
        scores = scores[None]
    if scores.ndim != 3:
        raise ValueError(f"patch scores must be [B, h, w] or [h, w], got shape {np.shape(patch_scores)}")
    maps = upsample_cells(torch.from_numpy(scores)[:, None], image_size, stride)[:, 0].numpy()
    if sigma > 0:
        maps = scipy.ndimage.gaussian_filter(maps, sigma=sigma, axes=(1, 2)).astype(np.float32)
    return maps[0] if single else maps
