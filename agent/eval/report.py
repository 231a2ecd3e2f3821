"""The evaluation report: typed results, the JSON writer/reader and the rich table printer.

The JSON holds everything, per-part scores and per-view maxima included, so a run can be re-analysed
without re-running it. Metrics that are undefined for the data (e.g. I-AUROC without defective parts)
are ``null`` in JSON and ``None`` here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OURS = "ours"
REPORT_FORMAT = "edge-inspection-agent/eval-report"
REPORT_VERSION = 1

# Metric keys, in table order. Those a protocol does not define are absent from its metric dicts.
CELL_METRICS = ("i_auroc", "p_auroc", "au_pro_0.3", "v_aupro_0.01", "accuracy", "false_reject_rate", "escape_rate", "i_auroc_located", "located_rate")
MAD_METRICS = ("i_auroc", "p_auroc", "au_pro_0.3")
TYPE_METRICS = ("i_auroc", "p_auroc", "au_pro_0.3", "v_aupro_0.01", "i_auroc_located")
_VOLUME_METRICS = ("v_aupro_0.01", "i_auroc_located")  # not defined for the mad protocol (single images, no volume)
# Orientation only: SplatPose's mean MAD-Sim figures (its paper, table of MAD-Sim results), in percent.
SPLATPOSE_MAD_SIM = {"i_auroc": 93.9, "p_auroc": 99.5}


@dataclass
class PartRecord:
    """One inspected instance: a multi-view part (cell) or one image (mad)."""

    capture_id: str
    category: str  # "good" or the defect type / MAD folder name
    label: int  # 1 = defective
    score: float | None  # None when the inspection was incomplete
    verdict: str  # "pass" | "fail" | "incomplete" | "-" (no threshold: mad)
    n_views: int
    view_scores: list[float] = field(default_factory=list)  # maximum of each view's map
    seconds: float = 0.0  # wall time of the whole instance
    # defective parts with ground-truth points and a volume: the highest voxel within metrics.LOCATE_RADIUS_M of the
    # defect and the highest elsewhere (None: no such voxel or not known)
    defect_peak: float | None = None
    elsewhere_peak: float | None = None


@dataclass
class Latency:
    """Per-view and last-view-to-verdict times (milliseconds) over all instances of one method."""

    n_views: int = 0
    per_view_ms_mean: float | None = None
    per_view_ms_p50: float | None = None
    per_view_ms_p95: float | None = None
    last_view_to_verdict_ms_mean: float | None = None  # processing of the last view + finalisation
    last_view_to_verdict_ms_p95: float | None = None
    stage_ms_mean: dict[str, float] = field(default_factory=dict)  # pipeline timings, mean over the views where the stage ran


@dataclass
class MethodResult:
    """One method on one object: metrics, metrics per defect type, every part, latency."""

    metrics: dict[str, float | None]
    per_type: dict[str, dict[str, float | None]]
    parts: list[PartRecord]
    latency: Latency
    threshold: float | None  # the verdict threshold on this method's score scale (None: not thresholded)
    notes: list[str] = field(default_factory=list)


@dataclass
class ObjectResult:
    """One object (recipe) of the dataset."""

    name: str
    methods: dict[str, MethodResult]
    recipe: dict[str, Any] = field(default_factory=dict)  # version, voxel size, enrollment time, train capture


@dataclass
class EvalReport:
    """A whole evaluation run."""

    protocol: str  # "cell" | "mad"
    dataset: str
    created_utc: str
    machine: dict[str, Any]  # cpu model, cores, torch version, device, image size, load average
    options: dict[str, Any]
    objects: list[ObjectResult]
    mean: dict[str, dict[str, float | None]]  # method -> metric -> mean over objects (defined values)
    references: dict[str, dict[str, float]] = field(default_factory=dict)  # published figures, orientation only
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def methods(self) -> list[str]:
        names: list[str] = []
        for obj in self.objects:
            names += [m for m in obj.methods if m not in names]
        return names

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, **_finite_or_none(data)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvalReport":
        if data.get("format") != REPORT_FORMAT or data.get("version") != REPORT_VERSION:
            raise ValueError(f"not an eval report of version {REPORT_VERSION}: format={data.get('format')!r} version={data.get('version')!r}")
        objects = []
        for o in data["objects"]:
            methods = {
                name: MethodResult(
                    metrics=m["metrics"], per_type=m["per_type"], parts=[PartRecord(**p) for p in m["parts"]],
                    latency=Latency(**m["latency"]), threshold=m["threshold"], notes=list(m.get("notes", [])),
                )  # fmt: skip
                for name, m in o["methods"].items()
            }
            objects.append(ObjectResult(o["name"], methods, dict(o.get("recipe", {}))))
        return cls(
            protocol=data["protocol"], dataset=data["dataset"], created_utc=data["created_utc"], machine=data["machine"],
            options=data["options"], objects=objects, mean=data["mean"], references=data.get("references", {}),
            notes=list(data.get("notes", [])), seconds=float(data.get("seconds", 0.0)),
        )  # fmt: skip


def _finite_or_none(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); recurses into dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_report(report: EvalReport, path: str | os.PathLike) -> Path:
    """Write the report as JSON (parent folders created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    return path


def read_report(path: str | os.PathLike) -> EvalReport:
    """Read a report written by :func:`write_report`; ValueError names the file and the problem."""
    path = Path(path)
    try:
        return EvalReport.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable eval report: {e}") from None


# ---------------------------------------------------------------------------------------------
# Table


def _fmt(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.0f}"


def print_report(report: EvalReport, console=None) -> None:
    """Rich tables: objects x metrics (each method a row), metrics per defect type, latency."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 150))
    metrics = CELL_METRICS if report.protocol == "cell" else MAD_METRICS
    methods = report.methods
    m = report.machine
    title = f"{report.protocol} protocol: {report.dataset} (metrics in %)"
    table = Table(title=title, show_lines=False)
    table.add_column("object")
    table.add_column("method")
    table.add_column("parts" if report.protocol == "cell" else "images", justify="right")
    for key in metrics:
        table.add_column(key, justify="right")
    for obj in report.objects:
        for i, name in enumerate(methods):
            res = obj.methods.get(name)
            if res is None:
                continue
            n_bad = sum(p.label for p in res.parts)
            counts = f"{len(res.parts) - n_bad}+{n_bad}"
            table.add_row(obj.name if i == 0 else "", name, counts, *[_fmt(res.metrics.get(k)) for k in metrics])
    for i, name in enumerate(methods):
        mean = report.mean.get(name, {})
        table.add_row("[b]mean[/b]" if i == 0 else "", name, "", *[_fmt(mean.get(k)) for k in metrics], style="bold")
    for ref_name, figures in report.references.items():
        table.add_row("[dim]reference[/dim]", f"[dim]{ref_name}[/dim]", "", *[f"[dim]{figures[k]:.1f}[/dim]" if k in figures else "" for k in metrics])
    console.print(table)

    types = sorted({t for obj in report.objects for res in obj.methods.values() for t in res.per_type})
    if types:
        per_type = Table(title="per defect type (that type's instances vs all good ones, metrics in %)")
        per_type.add_column("object")
        per_type.add_column("type")
        for name in methods:
            for key in TYPE_METRICS:
                if report.protocol == "mad" and key in _VOLUME_METRICS:
                    continue
                per_type.add_column(f"{name}\n{key}", justify="right")
        for obj in report.objects:
            for t in types:
                if not any(t in res.per_type for res in obj.methods.values()):
                    continue
                row = [obj.name, t]
                for name in methods:
                    values = obj.methods[name].per_type.get(t, {}) if name in obj.methods else {}
                    row += [_fmt(values.get(k)) for k in TYPE_METRICS if not (report.protocol == "mad" and k in _VOLUME_METRICS)]
                per_type.add_row(*row)
        console.print(per_type)

    lat = Table(title="latency (ms)")
    for col in ("object", "method", "views", "per view mean", "p50", "p95", "last view -> verdict mean", "p95", "stages (mean)"):
        lat.add_column(col, justify="left" if col in ("object", "method", "stages (mean)") else "right")
    for obj in report.objects:
        for name, res in obj.methods.items():
            L = res.latency
            stages = ", ".join(f"{k} {v:.0f}" for k, v in L.stage_ms_mean.items())
            lat.add_row(obj.name, name, str(L.n_views), *[_fmt(v, False) for v in (L.per_view_ms_mean, L.per_view_ms_p50, L.per_view_ms_p95,
                        L.last_view_to_verdict_ms_mean, L.last_view_to_verdict_ms_p95)], stages)  # fmt: skip
    console.print(lat)
    console.print(
        f"machine: {m.get('cpu_model')} ({m.get('cores')} cores, load {m.get('load_average')}), device {m.get('device')}, "
        f"torch {m.get('torch')}, images {m.get('image_size')}; run took {report.seconds:.0f} s"
    )
    for note in report.notes:
        console.print(f"[dim]note: {note}[/dim]")
