"""edge-inspection-agent: multi-view 3D visual inspection beside a factory cell."""

import os as _os

# torch's OpenMP threads spin-wait by default; on a small edge machine shared with the MQTT loop,
# the database and other processes that makes every op 20-70x slower whenever a core is busy.
# libgomp reads this once, when torch is first imported, so it is set before anything imports torch.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
