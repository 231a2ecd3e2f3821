"""Live preview for operators (issue #6): each cell's current view with its anomaly heatmap, defect outlines,
part id, view count and verdict, streamed to browsers over WebRTC (aiortc) from a small aiohttp site.

- :mod:`agent.preview.compose`: the picture (plain functions on arrays).
- :mod:`agent.preview.observer`: :class:`PreviewObserver`, the service observer with one latest-picture
  mailbox per cell and a composer thread.
- :mod:`agent.preview.server`: :class:`PreviewServer`, the pages and one peer connection per viewer, on its
  own thread and event loop.

``agent run`` starts both when the configuration has a ``[preview]`` table (agent/service/config.py).
"""

from agent.preview.observer import CellStatus, LatestFrame, PreviewObserver, PreviewStats

__all__ = ["CellStatus", "LatestFrame", "PreviewObserver", "PreviewServer", "PreviewStats"]


def __getattr__(name: str):
    if name == "PreviewServer":  # aiortc and aiohttp only when the server is wanted
        from agent.preview.server import PreviewServer

        return PreviewServer
    raise AttributeError(name)
