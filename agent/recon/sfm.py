"""Structure from motion with pycolmap: poses and a sparse coloured point cloud from unposed views.

SIFT features, exhaustive matching and COLMAP's incremental mapper run on the capture's images (written
to a temporary folder). The frames' intrinsics seed a PINHOLE camera per distinct intrinsics (kept fixed
unless ``refine_focal_length``). The result is in COLMAP's arbitrary frame and scale; bring it into the
cell frame with :func:`align_to_posed_frames` (or :func:`agent.recon.align.align_to_reference`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from agent.capture import Capture, Frame, write_rgb
from agent.geometry import Intrinsics, w2c_cv_to_c2w_gl
from agent.recon.align import Similarity, align_to_reference


class SfMError(RuntimeError):
    """Structure from motion could not produce a usable reconstruction."""


@dataclass
class SfMOptions:
    """Settings of :func:`run_sfm`."""

    min_registered: int = 3  # fewer registered views than this raise SfMError
    refine_focal_length: bool = False  # False: the frames' intrinsics are trusted
    max_features: int = 8192  # SIFT features per image
    peak_threshold: float = 0.0067  # SIFT contrast threshold (COLMAP's default, 0.02 / 3)
    max_error_px: float = 1.0  # RANSAC / triangulation / filtering reprojection threshold. COLMAP's 4 px lets
    # too many wrong matches through on small (<= 512 px) images; raise it for large or poorly calibrated ones
    min_num_matches: int = 15  # verified matches for an image pair to count
    num_threads: int = -1  # -1 = all cores
    seed: int = 0  # COLMAP's random seed (RANSAC, mapper), for repeatable results
    verbose: bool = False  # COLMAP's own log on stderr

    def __post_init__(self) -> None:
        if self.min_registered < 2:
            raise ValueError(f"SfMOptions.min_registered must be >= 2, got {self.min_registered}")
        if self.max_features < 64 or self.min_num_matches < 5:
            raise ValueError("SfMOptions: max_features must be >= 64 and min_num_matches >= 5")
        if not (0.1 <= self.max_error_px <= 16.0 and 0.0 < self.peak_threshold < 0.1):
            raise ValueError("SfMOptions: max_error_px must be in [0.1, 16] and peak_threshold in (0, 0.1)")


@dataclass
class SfMResult:
    """A sparse reconstruction of a capture, in one frame (COLMAP's arbitrary one unless aligned).

    ``frame_names`` lists every input frame in order; ``registered[i]`` tells whether frame i got a pose.
    ``c2w[i]`` (OpenGL camera-to-world) and ``intrinsics[i]`` are None for unregistered frames.
    """

    frame_names: list[str]
    registered: np.ndarray  # [V] bool
    c2w: list[np.ndarray | None]
    intrinsics: list[Intrinsics | None]
    points: np.ndarray  # [N,3] float64
    colors: np.ndarray  # [N,3] uint8 RGB
    point_errors: np.ndarray  # [N] mean reprojection error, pixels
    track_lengths: np.ndarray  # [N] number of views observing each point
    notes: list[str] = field(default_factory=list)  # why frames are unregistered, dropped sub-models

    @property
    def unregistered(self) -> list[str]:
        """Names of the frames that did not get a pose."""
        return [n for n, ok in zip(self.frame_names, self.registered) if not ok]

    def registered_c2w(self) -> np.ndarray:
        """[R,4,4] poses of the registered frames, in input order."""
        return np.stack([p for p in self.c2w if p is not None])

    def transformed(self, sim: Similarity) -> "SfMResult":
        """The same reconstruction moved by a similarity (poses stay rigid; intrinsics are unchanged)."""
        return replace(
            self,
            c2w=[None if p is None else sim.apply_c2w(p) for p in self.c2w],
            points=sim.apply_points(self.points) if len(self.points) else self.points.copy(),
        )


def _camera_params(K: Intrinsics) -> str:
    return ",".join(repr(float(v)) for v in (K.fx, K.fy, K.cx, K.cy))


def _intrinsics_groups(frames: list[Frame]) -> dict[Intrinsics, list[int]]:
    groups: dict[Intrinsics, list[int]] = {}
    for i, frame in enumerate(frames):
        frame.intrinsics.validate()
        if frame.image.shape[:2] != (frame.intrinsics.height, frame.intrinsics.width):
            raise ValueError(
                f"frame {frame.name!r}: image is {frame.image.shape[1]}x{frame.image.shape[0]} but its intrinsics say "
                f"{frame.intrinsics.width}x{frame.intrinsics.height}"
            )
        groups.setdefault(frame.intrinsics, []).append(i)
    return groups


def run_sfm(capture: Capture, options: SfMOptions = SfMOptions(), workdir: str | Path | None = None) -> SfMResult:
    """Estimate poses of all frames of ``capture`` (their ``c2w`` is ignored) and a sparse point cloud.

    Raises SfMError when fewer than ``options.min_registered`` frames register. Frames that fail are listed
    in ``SfMResult.unregistered`` with reasons in ``notes``. ``workdir`` keeps COLMAP's database and model
    there (default: a temporary folder that is removed).
    """
    import pycolmap  # heavy native module: imported only when SfM actually runs

    frames = capture.frames
    if len(frames) < options.min_registered:
        raise SfMError(f"SfM needs at least {options.min_registered} views, the capture has {len(frames)}")
    groups = _intrinsics_groups(frames)
    pycolmap.set_random_seed(options.seed)
    if not options.verbose:
        pycolmap.logging.minloglevel = pycolmap.logging.ERROR

    with tempfile.TemporaryDirectory(prefix="sfm_") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        image_dir, model_dir = root / "images", root / "sparse"
        image_dir.mkdir(parents=True, exist_ok=True)
        model_dir.mkdir(parents=True, exist_ok=True)
        database = root / "database.db"
        if database.exists():
            database.unlink()
        file_names = [f"{i:05d}.png" for i in range(len(frames))]
        for name, frame in zip(file_names, frames):
            write_rgb(image_dir / name, frame.image)

        extraction = pycolmap.FeatureExtractionOptions()
        extraction.num_threads = options.num_threads
        extraction.sift.max_num_features = options.max_features
        extraction.sift.peak_threshold = options.peak_threshold
        for K, indices in groups.items():
            reader = pycolmap.ImageReaderOptions()
            reader.camera_model = "PINHOLE"
            reader.camera_params = _camera_params(K)
            pycolmap.extract_features(
                database, image_dir, image_names=[file_names[i] for i in indices], camera_mode=pycolmap.CameraMode.SINGLE,
                reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu,
            )  # fmt: skip

        matching = pycolmap.FeatureMatchingOptions()
        matching.num_threads = options.num_threads
        verification = pycolmap.TwoViewGeometryOptions()
        verification.min_num_inliers = options.min_num_matches
        verification.ransac.random_seed = options.seed
        verification.ransac.max_error = options.max_error_px
        pycolmap.match_exhaustive(database, matching_options=matching, verification_options=verification, device=pycolmap.Device.cpu)

        mapping = pycolmap.IncrementalPipelineOptions()
        mapping.min_num_matches = options.min_num_matches
        mapping.min_model_size = min(options.min_registered, mapping.min_model_size)
        mapping.num_threads = options.num_threads
        mapping.random_seed = options.seed
        mapping.ba_refine_focal_length = options.refine_focal_length
        mapping.ba_refine_principal_point = False
        mapping.ba_refine_extra_params = False
        mapping.mapper.abs_pose_refine_focal_length = options.refine_focal_length
        mapping.mapper.abs_pose_refine_extra_params = False
        mapping.mapper.init_max_error = options.max_error_px
        mapping.mapper.abs_pose_max_error = 3.0 * options.max_error_px  # COLMAP's ratio (12 px at 4 px)
        mapping.mapper.filter_max_reproj_error = options.max_error_px
        mapping.triangulation.merge_max_reproj_error = options.max_error_px
        mapping.triangulation.complete_max_reproj_error = options.max_error_px
        models = pycolmap.incremental_mapping(database, image_dir, model_dir, mapping)

    return _result_from_models(frames, file_names, models, options)


def _result_from_models(frames: list[Frame], file_names: list[str], models: dict, options: SfMOptions) -> SfMResult:
    names = [f.name for f in frames]
    n_views = len(frames)
    if not models:
        raise SfMError(
            f"SfM registered 0 of {n_views} views: no initial image pair with enough verified matches "
            f"(need {options.min_num_matches}); the views may overlap too little or show too little texture"
        )
    ranked = sorted(models.values(), key=lambda r: r.num_reg_images(), reverse=True)
    best = ranked[0]
    notes = [
        f"dropped a separate sub-model of {r.num_reg_images()} views (it could not be merged with the largest)" for r in ranked[1:]
    ]
    by_file = {image.name: image for image in best.images.values() if image.has_pose}
    c2w: list[np.ndarray | None] = [None] * n_views
    intrinsics: list[Intrinsics | None] = [None] * n_views
    for i, file_name in enumerate(file_names):
        image = by_file.get(file_name)
        if image is None:
            notes.append(f"frame {names[i]!r} did not register")
            continue
        w2c = np.eye(4)
        w2c[:3, :4] = image.cam_from_world().matrix()
        c2w[i] = w2c_cv_to_c2w_gl(w2c)
        cam = image.camera
        fx, fy, cx, cy = (float(v) for v in cam.params[:4])
        intrinsics[i] = Intrinsics(fx, fy, cx, cy, int(cam.width), int(cam.height))
    registered = np.array([p is not None for p in c2w])
    if registered.sum() < options.min_registered:
        failed = ", ".join(n for n, ok in zip(names, registered) if not ok)
        raise SfMError(
            f"SfM registered only {int(registered.sum())} of {n_views} views (need {options.min_registered}); "
            f"unregistered: {failed}. The views may overlap too little or show too little texture"
        )
    points3d = list(best.points3D.values())
    points = np.array([p.xyz for p in points3d], dtype=np.float64).reshape(-1, 3)
    colors = np.array([p.color for p in points3d], dtype=np.uint8).reshape(-1, 3)
    errors = np.array([p.error for p in points3d], dtype=np.float64)
    tracks = np.array([p.track.length() for p in points3d], dtype=np.int64)
    return SfMResult(names, registered, c2w, intrinsics, points, colors, errors, tracks, notes)


def align_to_posed_frames(result: SfMResult, capture: Capture) -> tuple[SfMResult, Similarity]:
    """Bring ``result`` into the frame of the capture's known poses (frames with ``c2w``, e.g. robot poses).

    Uses every frame that is both registered and posed (at least 3, centres not collinear). Returns the
    aligned result and the similarity (estimated -> capture frame).
    """
    if [f.name for f in capture.frames] != result.frame_names:
        raise ValueError("align_to_posed_frames: the capture's frames are not the ones the SfM result was computed from")
    pairs = [(est, f.c2w) for est, f in zip(result.c2w, capture.frames) if est is not None and f.c2w is not None]
    if len(pairs) < 3:
        raise ValueError(f"align_to_posed_frames needs >= 3 frames that are both registered and posed, got {len(pairs)}")
    sim = align_to_reference(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    return result.transformed(sim), sim


def posed_capture(capture: Capture, result: SfMResult) -> Capture:
    """The capture's registered frames with the estimated poses and intrinsics (ground truth kept as is)."""
    if [f.name for f in capture.frames] != result.frame_names:
        raise ValueError("posed_capture: the capture's frames are not the ones the SfM result was computed from")
    frames = [
        replace(f, c2w=pose.copy(), intrinsics=K)
        for f, pose, K in zip(capture.frames, result.c2w, result.intrinsics)
        if pose is not None and K is not None
    ]
    return Capture(frames=frames, gt=capture.gt, root=capture.root)
