"""Simulator settings: one dataclass, every knob of image size, cameras, nuisance and ground truth."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimConfig:
    """Settings of the simulated cell. All randomness comes from the Generator passed alongside."""

    width: int = 256
    height: int = 256
    fov_deg: float = 40.0  # horizontal field of view
    frame_fill: float = 0.9  # the part spans at most this fraction of the image half-size from the centre
    supersample: int = 2  # s x s rays per pixel
    shadows: bool = True  # shadow rays for the key light
    # robot trajectories: rings on a hemisphere around the fixture
    enroll_elevations_deg: tuple[float, ...] = (15.0, 35.0, 60.0)
    enroll_views: int = 36  # spread evenly over the enrollment rings
    inspect_elevations_deg: tuple[float, ...] = (25.0, 50.0)
    n_views: int = 12  # inspection views per part, spread evenly over the inspection rings
    inspect_azimuth_offset_deg: float | None = None  # None = a quarter of an enrollment azimuth step
    # nuisance
    jitter_mm: float = 3.0  # placement: uniform +- in x and y
    jitter_deg: float = 3.0  # placement: uniform +- about z
    light_variation: float = 0.1  # intensity +- 10 %, directions turned by up to 80 * this degrees
    noise_std: float = 2.0 / 255.0  # Gaussian pixel noise, fraction of full scale
    depth_noise_std: float = 0.0005  # Gaussian depth noise, metres
    # defects and ground truth
    min_defect_pixels: int = 12  # at 256 x 256, scaled with the image area (at least 3)
    min_defect_views: int = 2  # inspection views in which each defect must be visible (capped at the number of views)
    max_defect_attempts: int = 60
    surface_points: int = 100_000

    def __post_init__(self) -> None:
        checks = [
            (self.width >= 16 and self.height >= 16, f"width/height must be >= 16, got {self.width}x{self.height}"),
            (0.0 < self.fov_deg < 120.0, f"fov_deg must be in (0, 120), got {self.fov_deg}"),
            (0.1 <= self.frame_fill <= 1.0, f"frame_fill must be in [0.1, 1], got {self.frame_fill}"),
            (1 <= self.supersample <= 8, f"supersample must be in 1..8, got {self.supersample}"),
            (len(self.enroll_elevations_deg) >= 1 and self.enroll_views >= 1,
             f"enroll_views must be >= 1 with at least one ring, got {self.enroll_views}"),
            (len(self.inspect_elevations_deg) >= 1 and self.n_views >= 1, f"n_views must be >= 1 with at least one ring, got {self.n_views}"),
            (all(-10.0 <= e < 90.0 for e in (*self.enroll_elevations_deg, *self.inspect_elevations_deg)),
             "ring elevations must lie in [-10, 90) degrees"),
            (self.jitter_mm >= 0 and self.jitter_deg >= 0, "jitter_mm and jitter_deg must be >= 0"),
            (0.0 <= self.light_variation <= 0.5, f"light_variation must be in [0, 0.5], got {self.light_variation}"),
            (self.noise_std >= 0 and self.depth_noise_std >= 0, "noise_std and depth_noise_std must be >= 0"),
            (self.min_defect_views >= 1 and self.min_defect_pixels >= 1, "min_defect_views and min_defect_pixels must be >= 1"),
            (self.surface_points >= 1000, f"surface_points must be >= 1000, got {self.surface_points}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SimConfig: {message}")

    @property
    def min_pixels_scaled(self) -> int:
        """``min_defect_pixels`` for this image size."""
        return max(3, round(self.min_defect_pixels * self.width * self.height / 256**2))
