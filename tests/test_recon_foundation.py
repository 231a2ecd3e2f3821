"""3D foundation-model interface: registry errors, the VGGT port (tiny random weights), pose encoding,
the official state-dict layout, and prediction -> Gaussians."""

import math

import numpy as np
import pytest
import torch

from agent.geometry import Intrinsics, backproject_depth, c2w_gl_to_w2c_cv, look_at
from agent.recon.align import align_to_reference, pose_errors
from agent.recon.foundation import (
    FoundationPrediction,
    depth_to_world_points,
    gaussians_from_prediction,
    VGGTModel,
    load_foundation_model,
    vggt_preprocess,
)
from agent.recon.vggt import VGGT, VGGTConfig, cameras_to_pose_encoding, pose_encoding_to_cameras

TINY = VGGTConfig(
    img_size=56, embed_dim=32, depth=4, num_heads=2, patch_embed_depth=2, patch_embed_heads=2, camera_heads=2,
    camera_trunk_depth=1, dpt_features=16, dpt_out_channels=(8, 16, 32, 32), dpt_layers=(0, 1, 2, 3),
)  # fmt: skip


def _randomised(network: VGGT, seed: int = 0) -> VGGT:
    """Random weights everywhere (LayerScale and tokens included, which the constructor leaves at 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        network.camera_head.pose_branch.fc2.weight[7:] *= 0.01  # FoV outputs near a plausible 1 rad
        network.camera_head.pose_branch.fc2.bias[7:] = 0.25
    return network


def _images(n=3, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


# --- registry -----------------------------------------------------------------------------------


def test_missing_weights_name_the_path_and_how_to_get_them(tmp_path):
    path = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_foundation_model("vggt", path)
    assert str(path) in str(err.value) and "facebook/VGGT-1B" in str(err.value) and "--weights" in str(err.value)


def test_corrupt_or_foreign_weights_name_the_path(tmp_path):
    corrupt = tmp_path / "model.pt"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match=str(corrupt)):
        load_foundation_model("vggt", corrupt)
    foreign = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match=rf"{foreign}.*missing keys"):
        load_foundation_model("vggt", foreign, config=TINY)
    with pytest.raises(ValueError, match="unknown foundation model 'dust3r'.*vggt"):
        load_foundation_model("dust3r", foreign)


def test_checkpoint_round_trip_with_ignored_track_head(tmp_path):
    network = _randomised(VGGT(TINY)).eval()
    state = dict(network.state_dict())
    state["track_head.fnet.weight"] = torch.zeros(2)  # in the official file, not built here
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    model = load_foundation_model("vggt", path, config=TINY)
    images = _images()
    x = torch.from_numpy(vggt_preprocess(images, TINY.img_size)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = network(x)["depth"][0, ..., 0].numpy()
    np.testing.assert_array_equal(model.predict(images).depth, expected)
    # a checkpoint of another size is rejected with the offending key and shapes
    with pytest.raises(ValueError, match=rf"{path}.*wrong shape"):
        load_foundation_model("vggt", path, config=VGGTConfig(**{**TINY.__dict__, "dpt_features": 8}))


# --- the network ---------------------------------------------------------------------------------


def test_official_state_dict_layout():
    """Key names and shapes of VGGT-1B's model.pt (without track_head.*), built on the meta device."""
    with torch.device("meta"):
        state = VGGT().state_dict()
    expected = {
        "aggregator.camera_token": (1, 2, 1, 1024),
        "aggregator.register_token": (1, 2, 4, 1024),
        "aggregator.patch_embed.cls_token": (1, 1, 1024),
        "aggregator.patch_embed.pos_embed": (1, 1370, 1024),
        "aggregator.patch_embed.register_tokens": (1, 4, 1024),
        "aggregator.patch_embed.mask_token": (1, 1024),
        "aggregator.patch_embed.patch_embed.proj.weight": (1024, 3, 14, 14),
        "aggregator.patch_embed.blocks.23.ls2.gamma": (1024,),
        "aggregator.patch_embed.norm.weight": (1024,),
        "aggregator.frame_blocks.23.attn.qkv.weight": (3072, 1024),
        "aggregator.frame_blocks.0.attn.q_norm.weight": (64,),
        "aggregator.global_blocks.23.attn.k_norm.bias": (64,),
        "aggregator.global_blocks.0.mlp.fc1.weight": (4096, 1024),
        "camera_head.trunk.3.attn.qkv.weight": (6144, 2048),
        "camera_head.empty_pose_tokens": (1, 1, 9),
        "camera_head.embed_pose.weight": (2048, 9),
        "camera_head.poseLN_modulation.1.weight": (6144, 2048),
        "camera_head.pose_branch.fc1.weight": (1024, 2048),
        "camera_head.pose_branch.fc2.weight": (9, 1024),
        "camera_head.token_norm.weight": (2048,),
        "camera_head.trunk_norm.weight": (2048,),
        "depth_head.norm.weight": (2048,),
        "depth_head.projects.0.weight": (256, 2048, 1, 1),
        "depth_head.resize_layers.0.weight": (256, 256, 4, 4),
        "depth_head.resize_layers.1.weight": (512, 512, 2, 2),
        "depth_head.resize_layers.3.weight": (1024, 1024, 3, 3),
        "depth_head.scratch.layer4_rn.weight": (256, 1024, 3, 3),
        "depth_head.scratch.refinenet1.resConfUnit1.conv1.weight": (256, 256, 3, 3),
        "depth_head.scratch.refinenet4.resConfUnit2.conv2.bias": (256,),
        "depth_head.scratch.refinenet4.out_conv.weight": (256, 256, 1, 1),
        "depth_head.scratch.output_conv1.weight": (128, 256, 3, 3),
        "depth_head.scratch.output_conv2.0.weight": (32, 128, 3, 3),
        "depth_head.scratch.output_conv2.2.weight": (2, 32, 1, 1),
        "point_head.scratch.output_conv2.2.weight": (4, 32, 1, 1),
    }
    for key, shape in expected.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"aggregator", "camera_head", "depth_head", "point_head"}
    assert "depth_head.scratch.refinenet4.resConfUnit1.conv1.weight" not in state  # the coarsest fusion has no skip
    assert "depth_head.scratch.layer1_rn.bias" not in state
    assert sum(1 for k in state if k.startswith("aggregator.frame_blocks.") and k.endswith(".attn.qkv.weight")) == 24


def test_tiny_vggt_forward_shapes_and_prediction():
    network = _randomised(VGGT(TINY))
    model = VGGTModel(network)
    images = _images(n=3, h=48, w=64)
    pred = model.predict(images)
    # "crop" preprocessing: width -> 56, height 48 * 56 / 64 = 42 (a multiple of 14)
    assert pred.depth.shape == (3, 42, 56) and pred.points.shape == (3, 42, 56, 3) and pred.images.shape == (3, 42, 56, 3)
    assert pred.c2w.shape == (3, 4, 4) and len(pred.intrinsics) == 3
    assert np.isfinite(pred.depth).all() and (pred.depth >= 0).all() and (pred.confidence >= 1).all()  # exp activations
    np.testing.assert_allclose(np.linalg.det(pred.c2w[:, :3, :3]), 1.0, atol=1e-6)
    for K in pred.intrinsics:
        K.validate()
        assert (K.cx, K.cy) == (28.0, 21.0)
    with torch.no_grad():
        out = model.network(torch.rand(1, 2, 3, 28, 42), points=True)
    assert out["world_points"].shape == (1, 2, 28, 42, 3) and out["world_points_conf"].shape == (1, 2, 28, 42)
    assert out["pose_enc"].shape == (1, 2, 9) and (out["pose_enc"][..., 7:] >= 0).all()
    with torch.no_grad():
        network.camera_head.pose_branch.fc2.bias[7:] = -100.0  # FoV 0 after the ReLU
    with pytest.raises(ValueError, match="degenerate field of view"):
        model.predict(images)


def test_first_view_token_differs_from_the_others():
    """Swapping which view comes first changes the result (VGGT's reference-frame tokens), but not the shapes."""
    network = _randomised(VGGT(TINY)).eval()
    x = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        a = network(x)["pose_enc"][0]
        b = network(x.flip(1))["pose_enc"][0].flip(0)
    assert not torch.allclose(a, b)


def test_pose_encoding_round_trip():
    c2w = np.stack([look_at(np.array([0.3, -0.4, 0.5]), np.zeros(3)), look_at(np.array([-0.5, 0.1, 0.2]), np.array([0, 0, 0.1]))])
    w2c = torch.from_numpy(np.stack([c2w_gl_to_w2c_cv(p) for p in c2w]))
    K = torch.tensor([[[300.0, 0, 32], [0, 280.0, 24], [0, 0, 1]]], dtype=torch.float64).expand(2, 3, 3)
    encoding = cameras_to_pose_encoding(w2c, K, 48, 64)
    assert encoding.shape == (2, 9)
    w2c_back, K_back = pose_encoding_to_cameras(encoding, 48, 64)
    torch.testing.assert_close(w2c_back, w2c, atol=1e-9, rtol=0)
    torch.testing.assert_close(K_back, K, atol=1e-9, rtol=0)
    # a known encoding: identity rotation (quaternion xyzw = 0 0 0 1), 90 degree horizontal FoV
    w2c_id, K_id = pose_encoding_to_cameras(torch.tensor([0.1, 0.2, 0.3, 0, 0, 0, 1, math.pi / 3, math.pi / 2]), 48, 64)
    torch.testing.assert_close(w2c_id[:3, :3], torch.eye(3))
    assert K_id[0, 0].item() == pytest.approx(32.0) and K_id[1, 1].item() == pytest.approx(24 / math.tan(math.pi / 6))


# --- prediction -> cell frame and Gaussians ------------------------------------------------------------


def _plane_prediction(n_views=3, h=12, w=16):
    """Cameras looking at the z = 0 plane, exact depth; colours encode the pixel."""
    K = Intrinsics.from_fov(math.radians(50), w, h)
    c2w = np.stack([look_at(np.array([0.1 * i, 0.07 * (i % 2), 1.0]), np.array([0.1 * i, 0.07 * (i % 2), 0.0])) for i in range(n_views)])
    depth = np.stack([np.full((h, w), 1.0, np.float32) for _ in range(n_views)])  # camera above the plane looking down
    points = depth_to_world_points(depth, c2w, [K] * n_views)
    confidence = np.tile(np.linspace(1, 2, w, dtype=np.float32), (n_views, h, 1))
    images = np.random.default_rng(0).integers(0, 256, (n_views, h, w, 3), dtype=np.uint8)
    return FoundationPrediction(c2w, [K] * n_views, depth, points, confidence, images)


def test_depth_to_world_points_matches_geometry_backprojection():
    pred = _plane_prediction()
    for k in range(3):
        expected, _ = backproject_depth(pred.depth[k], pred.c2w[k], pred.intrinsics[k])
        np.testing.assert_allclose(pred.points[k].reshape(-1, 3), expected, atol=1e-6)
    np.testing.assert_allclose(pred.points[..., 2], 0.0, atol=1e-6)  # on the plane


def test_gaussians_from_prediction_filters_by_confidence():
    pred = _plane_prediction()
    model = gaussians_from_prediction(pred, confidence_quantile=0.5)
    threshold = np.quantile(pred.confidence, 0.5)
    assert len(model) == int((pred.confidence >= threshold).sum())
    keep = (pred.confidence >= threshold).reshape(-1)
    np.testing.assert_allclose(model.means.numpy(), pred.points.reshape(-1, 3)[keep], atol=1e-6)
    np.testing.assert_allclose(model.rgb().numpy(), pred.images.reshape(-1, 3)[keep] / 255.0, atol=1e-5)
    np.testing.assert_allclose(model.opacities().numpy(), 0.1, atol=1e-6)
    np.testing.assert_allclose(model.scales().numpy(), 1.0 / pred.intrinsics[0].fx, rtol=1e-5)  # one pixel's footprint
    capped = gaussians_from_prediction(pred, confidence_quantile=0.0, max_points=100)
    assert len(capped) == 100 and capped.scales().min() > model.scales().max()  # wider when subsampled
    with pytest.raises(ValueError, match="confidence"):
        gaussians_from_prediction(pred, min_confidence=10.0)


def test_prediction_aligned_into_the_cell_frame():
    pred = _plane_prediction(n_views=4)
    truth = pred.c2w.copy()
    # the same prediction as a model would give it: scaled by 0.3, rotated, shifted
    from agent.recon.align import Similarity
    from agent.geometry import rotation_about_axis

    moved = pred.transformed(Similarity(0.3, rotation_about_axis(np.array([1.0, 2, 3]), 0.7), np.array([0.5, -1, 2])))
    aligned = moved.transformed(align_to_reference(moved.c2w, truth))
    centre, rotation = pose_errors(aligned.c2w, truth)
    assert centre.max() < 1e-9 and rotation.max() < 1e-5
    np.testing.assert_allclose(aligned.points, pred.points, atol=1e-5)
    np.testing.assert_allclose(aligned.depth, pred.depth, rtol=1e-5)
