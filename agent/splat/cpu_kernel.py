"""The C++ CPU compositing kernel: JIT build on first use, and its autograd wrapper.

The extension (csrc/rasterize_cpu.cpp) is compiled with g++/ninja through
``torch.utils.cpp_extension.load`` the first time :func:`load_kernel` is called (never at import),
and cached under ``$AGENT_TORCH_EXTENSIONS_DIR`` or ``~/.cache/edge-inspection-agent/torch_extensions``.
The cache key includes the source hash, the torch version and the CPU's instruction-set flags
(the build uses ``-march=native``). If the build fails (no compiler, no ninja), a warning is logged
once and :func:`load_kernel` returns None; callers then use the pure-torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "rasterize_cpu.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_dir() -> Path:
    root = os.environ.get("AGENT_TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "edge-inspection-agent" / "torch_extensions"
    return base


def _extension_name() -> str:
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(torch.__version__.encode())
    key.update(_cpu_flags().encode())
    return f"agent_splat_cpu_{key.hexdigest()[:12]}"


def load_kernel() -> ModuleType | None:
    """The compiled extension, building it on first call; None (with one logged warning) if it cannot be built."""
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        module = None
        try:
            if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
                raise RuntimeError("no C++ compiler on PATH")
            from torch.utils.cpp_extension import load

            name = _extension_name()
            build = _build_dir() / name
            build.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            module = load(
                name=name,
                sources=[str(_SOURCE)],
                build_directory=str(build),
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            _state["load_seconds"] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("C++ splatting kernel unavailable (%s); falling back to the pure-torch rasterizer", first_line)
            log.debug("C++ splatting kernel build failure", exc_info=True)
            module = None
        _state["module"] = module
        return module


def kernel_load_seconds() -> float | None:
    """Seconds the last successful :func:`load_kernel` took (compile or cache hit), None if not loaded."""
    return _state.get("load_seconds")  # type: ignore[return-value]


def bin_gaussians(means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int):
    """(tile offsets [I*tiles+1] int64, flat Gaussian ids [n_isects] int64) via the C++ kernel."""
    kernel = load_kernel()
    assert kernel is not None, "bin_gaussians needs the C++ kernel"
    offsets, flat = kernel.bin_gaussians(
        means2d.detach().contiguous(), radii.contiguous(), depths.detach().contiguous(), width, height, tile_size
    )
    return offsets, flat


class CompositeTiles(torch.autograd.Function):
    """Front-to-back alpha compositing per tile with a hand-written backward (gsplat's rules).

    Inputs are per image: means2d [I,N,2], conics [I,N,3], colors [I,N,CH], opacities [I,N],
    radii [I,N,2] int32, and the binning (offsets, flat ids). Returns (colors [I,H,W,CH],
    alpha [I,H,W,1]), not normalised and without background.
    """

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, radii, offsets, flat, width, height, tile_size):
        kernel = load_kernel()
        means2d, conics = means2d.contiguous(), conics.contiguous()
        colors, opacities = colors.contiguous(), opacities.contiguous()
        out, t_final, last = kernel.rasterize_forward(
            means2d, conics, colors, opacities, radii, offsets, flat, width, height, tile_size
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, radii, offsets, flat, t_final, last)
        ctx.size = (width, height, tile_size)
        ctx.mark_non_differentiable(t_final)
        return out, (1.0 - t_final).unsqueeze(-1)

    @staticmethod
    def backward(ctx, v_out, v_alpha):
        means2d, conics, colors, opacities, radii, offsets, flat, t_final, last = ctx.saved_tensors
        width, height, tile_size = ctx.size
        if v_out is None:
            v_out = torch.zeros(t_final.shape + (colors.shape[-1],), dtype=colors.dtype)
        if v_alpha is None:
            v_alpha = torch.zeros_like(t_final)
        else:
            v_alpha = v_alpha[..., 0]
        v_means2d, v_conics, v_colors, v_opacities = load_kernel().rasterize_backward(
            means2d, conics, colors, opacities, radii, offsets, flat, t_final, last,
            v_out.contiguous(), v_alpha.contiguous(), width, height, tile_size,
        )
        return v_means2d, v_conics, v_colors, v_opacities, None, None, None, None, None, None
