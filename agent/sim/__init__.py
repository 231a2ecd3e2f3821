"""The simulated inspection cell: procedural products, a CPU ray-casting renderer, robot
trajectories, defects with exact ground truth, nuisance, and dataset writing.

Scene: the part stands on the fixture at the world origin (its base at z = 0, part frame = world
frame up to the placement jitter T_world_part) in front of a neutral light-tent backdrop that lies
beyond the depth sensor's range, so background pixels get a smooth, slightly varying light grey
(scaled by the part's lighting, with sensor noise) and depth 0. No floor is rendered. The camera,
held by the robot, moves on rings of a hemisphere around the fixture; lights are fixed in the cell.

Public API: PRODUCTS, SimConfig, enrollment_poses, inspection_poses, simulate_part.
Command line: ``agent simulate dataset|cell|products`` (agent/sim/cli.py).

Modules: products (solids and solid textures), mesh (tagged meshes, Embree ray casting, ambient
occlusion), render (shading, light tent, masks), defects (five defect types and their extent),
trajectory (camera rings), simulate (one part with ground truth), dataset (layouts, contact sheet),
noise (Perlin noise), config (SimConfig). The live MQTT cell (cell.py) belongs to the contract module.
"""

from agent.sim.config import SimConfig
from agent.sim.products import PRODUCTS
from agent.sim.simulate import simulate_part
from agent.sim.trajectory import camera_intrinsics, enrollment_poses, inspection_poses

__all__ = ["PRODUCTS", "SimConfig", "camera_intrinsics", "enrollment_poses", "inspection_poses", "simulate_part"]
