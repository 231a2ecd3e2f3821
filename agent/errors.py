"""Errors shared across the package."""

from __future__ import annotations

import os
from pathlib import Path


class FileProblemError(ValueError):
    """A file that cannot be used. ``str()`` is ``"<path>: <problem>"``; picklable across processes."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem))
