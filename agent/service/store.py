"""What the service needs from the results database: the subset of :class:`storage.ResultStore` it calls.

Calls are blocking; the service makes them from one dedicated thread, in order. ``record_verdict``
commits before it returns: the service publishes a verdict only after that.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from agent.contract import ErrorMessage, Verdict
from agent.inspection import ViewResult


class ResultStore(Protocol):
    """The persistence interface of the MQTT service (storage.ResultStore implements it)."""

    def start_part(
        self, cell: str, part_id: str, recipe: str, *, ts: float, expected_views: int | None = None, meta: Mapping[str, Any] | None = None, recipe_version: str | None = None
    ) -> bool: ...

    def record_view(self, cell: str, part_id: str, view: ViewResult, *, camera_id: str, ts: float, c2w: Any, anomaly_map_path: str | Path | None = None) -> bool: ...

    def revise_view(self, cell: str, part_id: str, view: ViewResult) -> bool: ...  # the view's final score (scored again)

    def record_verdict(self, cell: str, verdict: Verdict, *, reason: str | None = None) -> bool: ...  # reason: why it is incomplete

    def record_error(self, cell: str, error: ErrorMessage, *, payload: bytes | str | None = None) -> None: ...

    def get_part(self, part_id: str, cell: str | None = None) -> Any: ...  # None, or a record with ``.verdict``
