"""Gradients of the rasterizer: gradcheck of the hand-written C++ backward, and agreement between backends."""

from __future__ import annotations

import pytest
import torch

from agent.splat import rasterize
from agent.splat.scenes import random_scene


def _small_scene():
    # few Gaussians, moderate opacities: no pixel sits on the alpha clamp, threshold or early stop
    s = random_scene(5, 16, 16, seed=11, opacity_max=0.8)
    s.scales = s.scales * 3.0
    return s


def test_gradcheck_cpu_backend_all_inputs_and_pose():
    s = _small_scene()
    xi = torch.tensor([0.02, -0.01, 0.03, 0.004, -0.003, 0.002], dtype=torch.float64)
    bg = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)

    def render(means, quats, scales, opacities, colors, pose):
        out = rasterize(
            means, quats, scales, opacities, colors, s.viewmats, s.Ks, 16, 16,
            object_pose=pose, backgrounds=bg, backend="cpu",
        )  # fmt: skip
        return out.rgb, out.depth, out.alpha

    rgb, _, alpha = render(s.means, s.quats, s.scales, s.opacities, s.colors, xi)
    assert (alpha > 0.05).float().mean() > 0.3  # the Gaussians cover a good part of the image
    inputs = [t.clone().requires_grad_() for t in (s.means, s.quats, s.scales, s.opacities, s.colors, xi)]
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradients_match_naive_autograd(backend):
    s = random_scene(150, 40, 32, n_cameras=2, seed=12, opacity_max=1.0)
    xi = torch.tensor([0.01, 0.02, -0.01, 0.003, 0.0, 0.001], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(2, 32, 40, c, generator=g, dtype=torch.float64) for c in (3, 1, 1)]

    def grads(which):
        params = [t.clone().requires_grad_() for t in (s.means, s.quats, s.scales, s.opacities, s.colors, xi)]
        out = rasterize(*params[:5], s.viewmats, s.Ks, 40, 32, object_pose=params[5], backend=which)
        loss = (out.rgb * w[0]).sum() + (out.depth * w[1]).sum() + (out.alpha * w[2]).sum()
        return torch.autograd.grad(loss, params)

    for ours, ref in zip(grads(backend), grads("naive")):
        assert ref.abs().max() > 0
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


def test_pose_gradient_points_back_to_the_true_placement():
    """A few steps of gradient descent on the object pose reduce the photometric error (placement refinement)."""
    s = random_scene(120, 32, 32, seed=13, dtype=torch.float32)
    target = rasterize(*s.args()).rgb.detach()
    xi = torch.tensor([0.03, -0.02, 0.02, 0.005, -0.004, 0.003], requires_grad=True)
    opt = torch.optim.Adam([xi], lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = (rasterize(*s.args(), object_pose=xi).rgb - target).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
