"""Versioned npz artefacts of a recipe (nominal surface, reference views): read without pickles, the format name and
version checked, with a ValueError that says what is wrong."""

from __future__ import annotations

import os

import numpy as np


def read_versioned_npz(path: str | os.PathLike, fmt: str, version: int, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """Every array of the npz at ``path`` (loaded, the file closed), after checking it holds ``format`` = ``fmt``,
    ``version`` = ``version`` and each of ``keys``; ``what`` names the kind of file in the errors."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("format", "version", *keys) if k not in z]
        if missing:
            raise ValueError(f"not a {what} file: missing {', '.join(missing)}")
        if str(z["format"]) != fmt or int(z["version"]) != version:
            raise ValueError(f"unsupported {what} format {str(z['format'])!r} version {int(z['version'])}")
        return {k: z[k] for k in z.files}
