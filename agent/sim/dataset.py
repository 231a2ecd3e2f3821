"""Simulated datasets in the "cell" and "mad" layouts (../shared/spec/capture-format.md), plus a contact sheet.

Per recipe: one golden part (no placement jitter) seen from the enrollment trajectory (``train/000``), then
``good`` good parts and ``defective`` defective parts (defect types taken in turn) seen from the inspection
trajectory, and ``teach_in`` more nominal parts run through the cell like any part (``train/001``, ...: the
teach-in runs that :func:`agent.pipeline.calibrate_on_teach_in` sets the threshold from). Each part draws from its
own child of ``SeedSequence([seed, crc32(recipe)])`` (the teach-in parts after the test parts, so adding them
leaves the other parts unchanged), so the data do not depend on the number of worker processes.

In the "mad" layout each inspection view of a test part becomes one test image; views of a defective part
in which its defect covers fewer than ``SimConfig.min_pixels_scaled`` pixels are left out (they would be
defective images that show no defect).
"""

from __future__ import annotations

import multiprocessing
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.capture import DEFECT_TYPES, Capture, save_capture
from agent.datasets import MadTestImage, cell_capture_dir, save_mad_object
from agent.sim.config import SimConfig
from agent.sim.products import product_name
from agent.sim.simulate import simulate_part
from agent.sim.trajectory import enrollment_poses, inspection_poses

PROTOCOLS = ("cell", "mad")


@dataclass(frozen=True)
class PartJob:
    """One part to simulate."""

    recipe: str
    split: str  # "train" or "test"
    category: str  # "good" or a defect type
    capture_id: str
    seed: np.random.SeedSequence
    teach_in: bool = False  # a nominal part run through the cell for the threshold (train/, inspection trajectory)

    @property
    def defect(self) -> str | None:
        return None if self.category == "good" else self.category


def plan_parts(recipe: str, good: int, defective: int, seed: int, teach_in: int = 0) -> list[PartJob]:
    """The golden part, the teach-in parts, then the good and the defective test parts (defect types in turn)."""
    if good < 0 or defective < 0 or teach_in < 0:
        raise ValueError(f"--good, --defective and --teach-in must be >= 0, got {good}, {defective} and {teach_in}")
    recipe = product_name(recipe)
    children = np.random.SeedSequence([seed, zlib.crc32(recipe.encode())]).spawn(1 + good + defective + teach_in)
    jobs = [PartJob(recipe, "train", "good", "000", children[0])]
    jobs += [PartJob(recipe, "train", "good", f"{1 + i:03d}", children[1 + good + defective + i], teach_in=True) for i in range(teach_in)]
    jobs += [PartJob(recipe, "test", "good", f"{i:03d}", children[1 + i]) for i in range(good)]
    per_type: dict[str, int] = {}
    for i in range(defective):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        n = per_type.get(kind, 0)
        per_type[kind] = n + 1
        jobs.append(PartJob(recipe, "test", kind, f"{n:03d}", children[1 + good + i]))
    return jobs


def simulate_job(job: PartJob, config: SimConfig) -> Capture:
    """Simulate one planned part (the golden part without placement jitter, on the enrollment trajectory)."""
    rng = np.random.default_rng(job.seed)
    if job.split == "train" and not job.teach_in:
        return simulate_part(job.recipe, None, enrollment_poses(job.recipe, config), config, rng, jitter=False)
    return simulate_part(job.recipe, job.defect, inspection_poses(job.recipe, config), config, rng)


def _run_job(args: tuple[PartJob, SimConfig]) -> tuple[PartJob, Capture]:
    job, config = args
    return job, simulate_job(job, config)


def simulate_parts(jobs: list[PartJob], config: SimConfig, workers: int = 1) -> Iterator[tuple[PartJob, Capture]]:
    """Simulate ``jobs`` in order, in ``workers`` processes (spawned, so no renderer state is forked)."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, simulate_job(job, config)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=min(workers, len(jobs))) as pool:
        yield from pool.imap(_run_job, [(job, config) for job in jobs], chunksize=1)


# ----------------------------------------------------------------------------------------------
# Contact sheet


def _tile(image: np.ndarray, mask: np.ndarray | None, size: int) -> np.ndarray:
    tile = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    if mask is not None and mask.any():
        small = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        small |= cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_AREA) > 0
        contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, (255, 0, 0), 1)
    return tile


def part_tiles(capture: Capture, views: int = 3, size: int = 160) -> list[np.ndarray]:
    """A few views of a part: those showing most of the defect, else views spread around the trajectory."""
    frames = capture.frames
    if capture.gt is not None and capture.gt.label != "good" and all(f.mask is not None for f in frames):
        order = np.argsort([-int(f.mask.sum()) for f in frames], kind="stable")[:views]
    else:
        order = np.linspace(0, len(frames), views, endpoint=False).astype(int)
    return [_tile(frames[i].image, frames[i].mask, size) for i in sorted(set(order.tolist()))]


def contact_sheet(parts: list[tuple[str, list[np.ndarray]]], columns: int = 4) -> np.ndarray:
    """Grid of parts (``columns`` per row), each a strip of tiles with its caption on the first tile (RGB)."""
    if not parts:
        raise ValueError("contact sheet needs at least one part")
    tile = parts[0][1][0].shape[0]
    per_part = max(len(t) for _, t in parts)
    gap = 6
    cell_w = per_part * tile + gap
    rows = (len(parts) + columns - 1) // columns
    sheet = np.full((rows * (tile + gap) + gap, columns * cell_w + gap, 3), 255, dtype=np.uint8)
    for k, (caption, tiles) in enumerate(parts):
        r, c = divmod(k, columns)
        y, x = gap + r * (tile + gap), gap + c * cell_w
        for j, t in enumerate(tiles):
            sheet[y:y + tile, x + j * tile:x + (j + 1) * tile] = t
        colour = (0, 120, 0) if caption.startswith("good") else (200, 0, 0)
        cv2.rectangle(sheet, (x, y), (x + 8 + 9 * len(caption), y + 18), (255, 255, 255), -1)
        cv2.putText(sheet, caption, (x + 4, y + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    return sheet


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


# ----------------------------------------------------------------------------------------------
# Whole datasets


def _mad_items(test_parts: Iterator[tuple[PartJob, Capture]], min_pixels: int) -> Iterator[MadTestImage]:
    for job, capture in test_parts:
        for frame in capture.frames:
            if job.defect is None:
                yield MadTestImage("good", frame.image)
            elif frame.mask is not None and int(frame.mask.sum()) >= min_pixels:
                yield MadTestImage(job.category, frame.image, frame.mask)


def write_dataset(
    out: str | Path,
    recipe: str,
    good: int,
    defective: int,
    seed: int,
    config: SimConfig,
    protocol: str = "cell",
    workers: int = 1,
    on_part: Callable[[PartJob], None] | None = None,
    teach_in: int = 0,
) -> Path:
    """Simulate and write one recipe's dataset under ``out/<recipe>``, plus its contact_sheet.png.

    Returns the object folder. ``on_part`` is called after each part is written (progress bars). ``teach_in``
    nominal parts go to ``train/001``, ... ("cell" layout only: the "mad" layout has no place for them).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if teach_in and protocol != "cell":
        raise ValueError(f'teach-in parts need the "cell" layout (the "{protocol}" layout has no place for them)')
    recipe = product_name(recipe)
    root = Path(out) / recipe
    jobs = plan_parts(recipe, good, defective, seed, teach_in)
    results = simulate_parts(jobs, config, workers)
    sheet_parts: list[tuple[str, list[np.ndarray]]] = []
    tile = min(160, config.width, config.height)

    def note(job: PartJob, capture: Capture) -> None:
        if job.split == "test":
            sheet_parts.append((f"{job.category} {job.capture_id}", part_tiles(capture, 3, tile)))
        if on_part is not None:
            on_part(job)

    if protocol == "cell":
        for job, capture in results:
            save_capture(capture, cell_capture_dir(out, recipe, job.split, job.category, job.capture_id))
            note(job, capture)
    else:
        first_job, golden = next(results)
        note(first_job, golden)

        def tested() -> Iterator[tuple[PartJob, Capture]]:
            for job, capture in results:
                note(job, capture)
                yield job, capture

        save_mad_object(root, golden, _mad_items(tested(), config.min_pixels_scaled))
    if sheet_parts:
        write_png(root / "contact_sheet.png", contact_sheet(sheet_parts))
    return root
