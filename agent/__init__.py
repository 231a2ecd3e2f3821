"""edge-inspection-agent: multi-view 3D visual inspection beside a factory cell."""

__version__ = "0.1.0"
