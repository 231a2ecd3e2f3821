"""Initialisers from unposed or sparse views: COLMAP structure from motion (sfm.py) and 3D foundation
models such as VGGT (foundation.py, vggt.py), with similarity alignment to known poses (align.py).

pycolmap and the foundation-model weights are loaded only when used.
"""

from agent.recon.align import Similarity, align_to_reference, pose_errors, umeyama

__all__ = ["Similarity", "align_to_reference", "pose_errors", "umeyama"]
