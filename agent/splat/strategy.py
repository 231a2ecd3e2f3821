"""Densification strategies for training Gaussians, after ``gsplat.strategy`` (gsplat 1.5.3).

Parameters live in a dict of ``torch.nn.Parameter`` with gsplat's names and raw forms: ``means`` [N,3],
``quats`` [N,4], ``scales`` [N,3] (log), ``opacities`` [N] (logit), ``sh0`` [N,1,3], ``shN`` [N,K-1,3],
and one optimizer per parameter (``optimizers[name]``), so gsplat's in-place operations
(:func:`gsplat.strategy.ops.duplicate`, ``split``, ``remove``, ``reset_opa``) apply unchanged.

- :class:`DefaultStrategy`: 3DGS adaptive density control: clone small / split large Gaussians whose mean
  2D gradient is high, prune transparent and oversized ones, reset opacities periodically.
- :class:`MCMCStrategy`: 3DGS-MCMC: relocate dead Gaussians onto live ones sampled by opacity, add 5 %
  new ones per refinement up to ``cap_max``, and inject opacity-gated noise into the means.

gsplat's relocation kernel is CUDA-only; :func:`compute_relocation` runs it on CUDA tensors and the same
formula (3DGS-MCMC eq. 9) in torch on the CPU. The mean 2D gradient comes from the rasterizer's
``meta["means2d"]`` [C,N,2] (retained before backward) and ``meta["radii"]`` [C,N,2] (0 = not visible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from gsplat.strategy.ops import duplicate, remove, reset_opa, split
from torch import Tensor

from agent.splat.pose import quat_to_rotmat

Params = dict[str, torch.nn.Parameter]
Optimizers = dict[str, torch.optim.Optimizer]
REQUIRED_PARAMS = ("means", "quats", "scales", "opacities")
BINOM_N_MAX = 51  # gsplat's table size: up to 51 copies of one Gaussian per relocation


def check_params(params: Params, optimizers: Optimizers) -> None:
    """Raise ValueError unless the parameters and optimizers follow the layout described above."""
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise ValueError(f"strategy parameters lack {missing}")
    n = params["means"].shape[0]
    for name, p in params.items():
        if p.shape[0] != n:
            raise ValueError(f"parameter {name} has {p.shape[0]} rows, means has {n}")
        if name not in optimizers or len(optimizers[name].param_groups) != 1:
            raise ValueError(f"parameter {name} needs its own optimizer with exactly one param group")


# ---------------------------------------------------------------------------------------------
# MCMC relocation (3DGS-MCMC eq. 9)


def binomial_table(n_max: int = BINOM_N_MAX) -> Tensor:
    """``binoms[n, k] = C(n, k)`` for 0 <= k <= n < n_max (float64)."""
    table = torch.zeros(n_max, n_max, dtype=torch.float64)
    for n in range(n_max):
        for k in range(n + 1):
            table[n, k] = math.comb(n, k)
    return table


def relocation_formula_cpu(opacities: Tensor, scales: Tensor, ratios: Tensor, binoms: Tensor) -> tuple[Tensor, Tensor]:
    """Opacity and scale of each of ``N = ratio`` copies that replace one Gaussian (torch, any device).

    ``o' = 1 - (1 - o)^(1/N)``; ``s' = o / (sum_{i=1..N} sum_{k=0..i-1} C(i-1, k) (-1)^k / sqrt(k+1) o'^(k+1)) * s``,
    exactly gsplat's ``relocation_kernel``; ratios are clamped to [1, n_max] as gsplat does. The sums are
    evaluated in float64 (the alternating binomial sum cancels badly in float32 for large N).
    """
    n_max = binoms.shape[0]
    n = ratios.clamp(1, n_max).long()
    o = opacities.double()
    new_o = 1.0 - torch.pow(1.0 - o, 1.0 / n.double())
    # coef[m, k] = sum_{i=k+1..m} C(i-1, k) (-1)^k / sqrt(k+1): the double sum regrouped by k.
    b = binoms.double().to(o.device)
    k = torch.arange(n_max, dtype=torch.float64, device=o.device)
    sign = torch.where(k.long() % 2 == 0, 1.0, -1.0).to(o)
    per_i = b * (sign / torch.sqrt(k + 1.0))[None, :]  # row i-1 of the sum, for i = 1..n_max
    coef = torch.cat([torch.zeros(1, n_max, dtype=torch.float64, device=o.device), per_i.cumsum(0)])  # [n_max+1, n_max]
    powers = new_o[:, None] ** (k[None, :] + 1.0)  # [N, n_max]
    denom = (coef[n] * powers).sum(1)
    new_s = (o / denom)[:, None] * scales.double()
    return new_o.to(opacities.dtype), new_s.to(scales.dtype)


def compute_relocation(opacities: Tensor, scales: Tensor, ratios: Tensor, binoms: Tensor) -> tuple[Tensor, Tensor]:
    """gsplat's ``compute_relocation`` on CUDA tensors, :func:`relocation_formula_cpu` elsewhere."""
    if opacities.is_cuda:
        from gsplat.relocation import compute_relocation as gsplat_relocation

        return gsplat_relocation(opacities, scales, ratios.clone(), binoms.to(opacities))
    return relocation_formula_cpu(opacities, scales, ratios, binoms)


@torch.no_grad()
def _update_params(
    params: Params, optimizers: Optimizers, param_fn: Callable[[str, Tensor], Tensor], optimizer_fn: Callable[[str, Tensor], Tensor]
) -> None:
    """Replace every parameter by ``param_fn(name, p)`` and carry its Adam moments through ``optimizer_fn``."""
    for name in list(params):
        old = params[name]
        new = torch.nn.Parameter(param_fn(name, old.data), requires_grad=old.requires_grad)
        params[name] = new
        opt = optimizers[name]
        st = opt.state.pop(old, {})
        for key, value in list(st.items()):
            if key != "step":
                st[key] = optimizer_fn(key, value)
        opt.param_groups[0]["params"] = [new]
        opt.state[new] = st


def _sample_by_opacity(opacities: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    return torch.multinomial(opacities, n, replacement=True, generator=generator)


def _shared_opacity_scale(
    params: Params, opac: Tensor, sampled: Tensor, binoms: Tensor, min_opacity: float
) -> tuple[Tensor, Tensor]:
    """Opacity and scale of each sampled Gaussian once it is shared by its copies (3DGS-MCMC eq. 9), opacity clamped."""
    new_o, new_s = compute_relocation(
        opac[sampled], torch.exp(params["scales"].data)[sampled], torch.bincount(sampled)[sampled] + 1, binoms
    )
    return new_o.clamp(min=min_opacity, max=1.0 - torch.finfo(torch.float32).eps), new_s


@torch.no_grad()
def relocate(
    params: Params, optimizers: Optimizers, dead: Tensor, binoms: Tensor, min_opacity: float,
    generator: torch.Generator | None = None,
) -> int:  # fmt: skip
    """Move the ``dead`` Gaussians onto live ones sampled by opacity (gsplat's ``ops.relocate``)."""
    dead_idx = dead.nonzero(as_tuple=True)[0]
    alive_idx = (~dead).nonzero(as_tuple=True)[0]
    if len(dead_idx) == 0 or len(alive_idx) == 0:
        return 0
    opac = torch.sigmoid(params["opacities"].data)
    sampled = alive_idx[_sample_by_opacity(opac[alive_idx], len(dead_idx), generator)]
    new_o, new_s = _shared_opacity_scale(params, opac, sampled, binoms, min_opacity)

    def param_fn(name: str, p: Tensor) -> Tensor:
        p = p.clone()
        if name == "opacities":
            p[sampled] = torch.logit(new_o).to(p.dtype)
        elif name == "scales":
            p[sampled] = torch.log(new_s).to(p.dtype)
        p[dead_idx] = p[sampled]
        return p

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        v = v.clone()
        v[sampled] = 0
        return v

    _update_params(params, optimizers, param_fn, optimizer_fn)
    return len(dead_idx)


@torch.no_grad()
def sample_add(
    params: Params, optimizers: Optimizers, n: int, binoms: Tensor, min_opacity: float, generator: torch.Generator | None = None
) -> int:
    """Add ``n`` Gaussians as copies of ones sampled by opacity, sharing opacity/scale (gsplat's ``ops.sample_add``)."""
    if n <= 0:
        return 0
    opac = torch.sigmoid(params["opacities"].data)
    sampled = _sample_by_opacity(opac, n, generator)
    new_o, new_s = _shared_opacity_scale(params, opac, sampled, binoms, min_opacity)

    def param_fn(name: str, p: Tensor) -> Tensor:
        p = p.clone()
        if name == "opacities":
            p[sampled] = torch.logit(new_o).to(p.dtype)
        elif name == "scales":
            p[sampled] = torch.log(new_s).to(p.dtype)
        return torch.cat([p, p[sampled]])

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        return torch.cat([v, torch.zeros((n, *v.shape[1:]), dtype=v.dtype, device=v.device)])

    _update_params(params, optimizers, param_fn, optimizer_fn)
    return n


@torch.no_grad()
def inject_noise_to_position(params: Params, scaler: float, generator: torch.Generator | None = None) -> None:
    """3DGS-MCMC's exploration noise: ``means += Sigma @ eps * sigmoid(100 (1 - o - 0.995)) * scaler``.

    Sigma is each Gaussian's 3D covariance; the gate lets only near-transparent Gaussians move far.
    """
    means = params["means"]
    opac = torch.sigmoid(params["opacities"].data)
    R = quat_to_rotmat(params["quats"].data)
    s2 = torch.exp(2.0 * params["scales"].data)
    covars = (R * s2[:, None, :]) @ R.transpose(1, 2)
    gate = 1.0 / (1.0 + torch.exp(-100.0 * ((1.0 - opac) - 0.995)))
    eps = torch.randn(means.shape, dtype=means.dtype, device=means.device, generator=generator)
    noise = torch.einsum("nij,nj->ni", covars, eps * (gate * scaler)[:, None])
    means.data.add_(noise)


# ---------------------------------------------------------------------------------------------
# Strategies


@dataclass
class DefaultStrategy:
    """3DGS adaptive density control (gsplat's DefaultStrategy; 3D sizes relative to the scene scale).

    Every ``refine_every`` steps in (``refine_start_iter``, ``refine_stop_iter``): Gaussians whose mean
    image-space gradient (pixels scaled to NDC as gsplat does) exceeds ``grow_grad2d`` are cloned when
    their largest scale <= ``grow_scale3d`` * scene scale, else split in two (samples from the Gaussian,
    scales / 1.6); then Gaussians with opacity < ``prune_opa`` are removed, and after the first reset
    also those larger than ``prune_scale3d`` * scene scale. Every ``reset_every`` steps (until
    ``refine_stop_iter``) opacities are clamped to 2 * ``prune_opa``. (gsplat 1.5.3's reset condition,
    ``step % reset_every == 0 & step > 0``, never fires because of operator precedence; this one does.)
    """

    prune_opa: float = 0.005
    grow_grad2d: float = 0.0002
    grow_scale3d: float = 0.01
    prune_scale3d: float = 0.1
    refine_start_iter: int = 500
    refine_stop_iter: int = 15_000
    reset_every: int = 3000
    refine_every: int = 100
    pause_refine_after_reset: int = 0
    cap_max: int = 1_000_000

    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        return {"grad2d": None, "count": None, "scene_scale": float(scene_scale)}

    def step_pre_backward(self, params: Params, optimizers: Optimizers, state: dict, step: int, info: dict) -> None:
        """Keep the gradient of the image-space means (call after rendering, before ``backward``)."""
        info["means2d"].retain_grad()

    def _update_state(self, params: Params, state: dict, info: dict) -> None:
        grads = info["means2d"].grad
        if grads is None:
            raise ValueError("means2d has no gradient: call step_pre_backward before loss.backward()")
        grads = grads.detach().clone()
        n_cameras = grads.shape[0]
        grads[..., 0] *= info["width"] / 2.0 * n_cameras
        grads[..., 1] *= info["height"] / 2.0 * n_cameras
        n = params["means"].shape[0]
        if state["grad2d"] is None or state["grad2d"].shape[0] != n:
            state["grad2d"] = torch.zeros(n, dtype=grads.dtype, device=grads.device)
            state["count"] = torch.zeros(n, dtype=grads.dtype, device=grads.device)
        visible = (info["radii"] > 0).all(dim=-1)  # [C, N]
        ids = torch.where(visible)[1]
        state["grad2d"].index_add_(0, ids, grads[visible].norm(dim=-1))
        state["count"].index_add_(0, ids, torch.ones_like(ids, dtype=grads.dtype))

    def step_post_backward(self, params: Params, optimizers: Optimizers, state: dict, step: int, info: dict, lr: float = 0.0) -> dict[str, int]:
        """Accumulate gradients; clone/split/prune and reset on schedule. Returns counts of what changed."""
        done = {"cloned": 0, "split": 0, "pruned": 0, "reset": 0}
        if step >= self.refine_stop_iter:
            return done
        self._update_state(params, state, info)
        if step > self.refine_start_iter and step % self.refine_every == 0 and step % self.reset_every >= self.pause_refine_after_reset:
            done["cloned"], done["split"] = self.grow(params, optimizers, state)
            done["pruned"] = self.prune(params, optimizers, state, after_reset=step > self.reset_every)
            state["grad2d"].zero_()
            state["count"].zero_()
        if step > 0 and step % self.reset_every == 0:
            reset_opa(params, optimizers, state, value=self.prune_opa * 2.0)
            done["reset"] = 1
        return done

    @torch.no_grad()
    def grow(self, params: Params, optimizers: Optimizers, state: dict) -> tuple[int, int]:
        """Clone / split by accumulated gradient (see the class docstring). Returns (cloned, split)."""
        grads = state["grad2d"] / state["count"].clamp_min(1)
        high = grads > self.grow_grad2d
        small = torch.exp(params["scales"]).max(dim=-1).values <= self.grow_scale3d * state["scene_scale"]
        room = self.cap_max - params["means"].shape[0]
        is_clone, is_split = high & small, high & ~small
        if room < int(is_clone.sum()) + int(is_split.sum()):  # keep the highest gradients within the cap
            keep = torch.zeros_like(high)
            order = torch.argsort(torch.where(high, grads, torch.full_like(grads, -1.0)), descending=True)[: max(room, 0)]
            keep[order] = True
            is_clone, is_split = is_clone & keep, is_split & keep
        n_clone, n_split = int(is_clone.sum()), int(is_split.sum())
        if n_clone:
            duplicate(params, optimizers, state, is_clone)
        if n_split:
            is_split = torch.cat([is_split, torch.zeros(n_clone, dtype=torch.bool, device=is_split.device)])
            split(params, optimizers, state, is_split)
        return n_clone, n_split

    @torch.no_grad()
    def prune(self, params: Params, optimizers: Optimizers, state: dict, after_reset: bool) -> int:
        """Remove Gaussians with opacity < ``prune_opa`` (and, ``after_reset``, oversized ones). Returns how many."""
        is_prune = torch.sigmoid(params["opacities"]) < self.prune_opa
        if after_reset:
            is_prune |= torch.exp(params["scales"]).max(dim=-1).values > self.prune_scale3d * state["scene_scale"]
        n = int(is_prune.sum())
        if n:
            remove(params, optimizers, state, is_prune)
        return n


@dataclass
class MCMCStrategy:
    """3DGS-MCMC (gsplat's MCMCStrategy): relocation, growth to ``cap_max``, noise on the means.

    Every ``refine_every`` steps in (``refine_start_iter``, ``refine_stop_iter``): Gaussians with opacity
    <= ``min_opacity`` are relocated onto live ones sampled in proportion to opacity (sharing its opacity
    and scale by :func:`compute_relocation`), then ``growth`` x N (at most ``cap_max``) are added the same way.
    After every step, means get noise scaled by the means learning rate x ``noise_lr``. The trainer adds
    the regularisers ``opacity_reg`` x mean opacity and ``scale_reg`` x mean scale to the loss.
    """

    cap_max: int = 1_000_000
    noise_lr: float = 5e5
    refine_start_iter: int = 500
    refine_stop_iter: int = 25_000
    refine_every: int = 100
    min_opacity: float = 0.005
    growth: float = 0.05
    opacity_reg: float = 0.01
    scale_reg: float = 0.01
    seed: int = 0

    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        return {"binoms": binomial_table(), "scene_scale": float(scene_scale), "generator": torch.Generator().manual_seed(self.seed)}

    def step_pre_backward(self, params: Params, optimizers: Optimizers, state: dict, step: int, info: dict) -> None:
        """Nothing to keep: MCMC does not use image-space gradients."""

    def regularisation(self, params: Params) -> Tensor:
        """``opacity_reg * mean(opacity) + scale_reg * mean(scale)`` (added to the loss)."""
        return self.opacity_reg * torch.sigmoid(params["opacities"]).mean() + self.scale_reg * torch.exp(params["scales"]).mean()

    def step_post_backward(self, params: Params, optimizers: Optimizers, state: dict, step: int, info: dict, lr: float = 0.0) -> dict[str, int]:
        """Relocate and add on schedule, then inject noise. ``lr``: the current means learning rate."""
        done = {"relocated": 0, "added": 0}
        gen = state["generator"] if params["means"].device.type == "cpu" else None
        if self.refine_start_iter < step < self.refine_stop_iter and step % self.refine_every == 0:
            dead = torch.sigmoid(params["opacities"].data) <= self.min_opacity
            done["relocated"] = relocate(params, optimizers, dead, state["binoms"], self.min_opacity, gen)
            n = params["means"].shape[0]
            done["added"] = sample_add(params, optimizers, max(0, min(self.cap_max, int((1.0 + self.growth) * n)) - n),
                                       state["binoms"], self.min_opacity, gen)  # fmt: skip
        inject_noise_to_position(params, lr * self.noise_lr, gen)
        return done


Strategy = DefaultStrategy | MCMCStrategy
