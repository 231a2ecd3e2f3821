"""VGGT (Wang et al., CVPR 2025, facebookresearch/vggt) in plain torch, in the official state-dict layout.

Architecture: a DINOv2 ViT (with register tokens) embeds each view into patch tokens; an aggregator of
alternating frame-wise and global self-attention blocks (QK-norm, 2D RoPE on patch positions) adds a camera
token and register tokens per view (one set for the first view, another for the rest); a camera head refines
a 9-number pose encoding (``absT_quaR_FoV``: translation, quaternion xyzw, vertical/horizontal FoV) of
OpenCV world-to-camera poses in 4 adaLN-modulated iterations; DPT heads turn four aggregator layers into dense
depth (+ confidence) and world points (+ confidence). The world frame is the first camera's (OpenCV).

Module and parameter names follow the official checkpoint (``model.pt`` of facebook/VGGT-1B), so it loads
strictly; only the tracking head (``track_head.*``, not needed for initialisation) is not built and its keys
are ignored. Sizes are configurable (:class:`VGGTConfig`) so a tiny random-weight model runs in tests.
Written from the paper and the public code's structure; no code copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VGGTConfig:
    """Sizes of the network. The defaults are VGGT-1B's."""

    img_size: int = 518  # the patch embed's position grid is (img_size // patch_size)^2
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24  # frame/global block pairs in the aggregator
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    patch_embed_depth: int = 24  # DINOv2 ViT-L/14 (with registers)
    patch_embed_heads: int = 16
    rope_freq: float = 100.0
    init_values: float = 0.01
    camera_trunk_depth: int = 4
    camera_heads: int = 16
    camera_iterations: int = 4
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, int, int, int] = (4, 11, 17, 23)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"VGGTConfig: embed_dim / num_heads must be a multiple of 4 (2D RoPE), got {self.embed_dim}/{self.num_heads}")
        if self.embed_dim % self.patch_embed_heads or (2 * self.embed_dim) % self.camera_heads:
            raise ValueError("VGGTConfig: embed_dim must divide by patch_embed_heads and 2*embed_dim by camera_heads")
        if max(self.dpt_layers) >= self.depth:
            raise ValueError(f"VGGTConfig: dpt_layers {self.dpt_layers} must be < depth {self.depth}")


# ---------------------------------------------------------------------------------------------
# Transformer pieces


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class RoPE2D(nn.Module):
    """2D rotary embedding: the first half of each head's channels rotates with the row, the second with the column."""

    def __init__(self, base: float = 100.0):
        super().__init__()
        self.base = base

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        dim = x.shape[-1]
        inv_freq = 1.0 / self.base ** (torch.arange(0, dim, 2, device=x.device).float() / dim)
        angles = pos.to(inv_freq.dtype)[..., None] * inv_freq  # [B, N, dim/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None].to(x.dtype)  # [B, 1, N, dim]
        half = dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * angles.cos() + rotated * angles.sin()

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x [B, heads, N, D]; pos [B, N, 2] integer (row, column)."""
        rows, cols = x.chunk(2, dim=-1)
        return torch.cat([self._rotate(rows, pos[..., 0]), self._rotate(cols, pos[..., 1])], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, norm_eps: float, rope: RoPE2D | None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(dim // heads, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads, eps=norm_eps) if qk_norm else nn.Identity()
        self.rope = rope

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale."""

    def __init__(self, dim, heads, mlp_ratio, init_values, qk_norm=False, rope=None, norm_eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, qk_norm, 1e-5, rope)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoPatchEmbed(nn.Module):
    """DINOv2 ViT with register tokens; returns the final-normed patch tokens [B, h*w, dim]."""

    def __init__(self, c: VGGTConfig):
        super().__init__()
        dim, grid = c.embed_dim, c.img_size // c.patch_size
        self.patch_size = c.patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, c.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)  # unused at inference
        self.blocks = nn.ModuleList(
            [Block(dim, c.patch_embed_heads, c.mlp_ratio, 1.0, norm_eps=1e-6) for _ in range(c.patch_embed_depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, h: int, w: int) -> Tensor:
        """Patch position embeddings for an h x w grid (bicubic, antialiased, as VGGT configures DINOv2)."""
        pos = self.pos_embed[:, 1:].float()
        grid = math.isqrt(pos.shape[1])
        if (h, w) == (grid, grid):
            return self.pos_embed[:, 1:]
        pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", antialias=True)
        return pos.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(self.pos_embed.dtype)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.position_embedding(h, w)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        tokens = torch.cat([cls, self.register_tokens.expand(len(x), -1, -1), tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 1 + self.register_tokens.shape[1] :]


def _first_and_rest(token: Tensor, b: int, s: int) -> Tensor:
    """[1, 2, n, C] -> [b*s, n, C]: index 0 for each sequence's first view, index 1 for the others."""
    first = token[:, :1].expand(b, 1, *token.shape[2:])
    rest = token[:, 1:].expand(b, s - 1, *token.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(b * s, *token.shape[2:])


class Aggregator(nn.Module):
    """Alternating frame / global attention over all views' tokens; returns every layer's [frame, global] concat."""

    def __init__(self, c: VGGTConfig):
        super().__init__()
        self.c = c
        self.patch_embed = DinoPatchEmbed(c)
        self.rope = RoPE2D(c.rope_freq) if c.rope_freq > 0 else None

        def blocks():
            return nn.ModuleList(
                [Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.init_values, qk_norm=True, rope=self.rope) for _ in range(c.depth)]
            )

        self.frame_blocks, self.global_blocks = blocks(), blocks()
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, c.num_register_tokens, c.embed_dim))
        self.patch_start_idx = 1 + c.num_register_tokens
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images [B, S, 3, H, W] in [0, 1] -> per layer [B, S, P, 2C] (P = special tokens + patches)."""
        b, s, _, height, width = images.shape
        p = self.c.patch_size
        x = ((images - self._mean) / self._std).reshape(b * s, 3, height, width)
        patches = self.patch_embed(x)
        tokens = torch.cat([_first_and_rest(self.camera_token, b, s), _first_and_rest(self.register_token, b, s), patches], 1)
        rows, cols = torch.meshgrid(torch.arange(height // p, device=x.device), torch.arange(width // p, device=x.device), indexing="ij")
        pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1) + 1  # special tokens sit at (0, 0)
        pos = torch.cat([torch.zeros(self.patch_start_idx, 2, dtype=pos.dtype, device=pos.device), pos])
        n, dim = tokens.shape[1], tokens.shape[2]
        pos_frame = pos[None].expand(b * s, -1, -1)
        pos_global = pos_frame.reshape(b, s * n, 2)
        outputs = []
        for frame_block, global_block in zip(self.frame_blocks, self.global_blocks):
            tokens = frame_block(tokens.reshape(b * s, n, dim), pos_frame)
            frame_out = tokens.reshape(b, s, n, dim)
            tokens = global_block(tokens.reshape(b, s * n, dim), pos_global)
            outputs.append(torch.cat([frame_out, tokens.reshape(b, s, n, dim)], dim=-1))
        return outputs


# ---------------------------------------------------------------------------------------------
# Heads


class CameraHead(nn.Module):
    """Iterative refinement of the 9-number pose encoding from each view's camera token."""

    def __init__(self, c: VGGTConfig):
        super().__init__()
        dim = 2 * c.embed_dim
        self.iterations = c.camera_iterations
        self.trunk = nn.Sequential(*[Block(dim, c.camera_heads, c.mlp_ratio, c.init_values) for _ in range(c.camera_trunk_depth)])
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, 9))
        self.embed_pose = nn.Linear(9, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, 9)

    def forward(self, layers: list[Tensor]) -> list[Tensor]:
        tokens = self.token_norm(layers[-1][:, :, 0])  # [B, S, 2C]
        encoding, history = None, []
        for _ in range(self.iterations):
            source = self.empty_pose_tokens.expand(*tokens.shape[:2], -1) if encoding is None else encoding.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(source)).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            encoding = delta if encoding is None else encoding + delta
            history.append(torch.cat([encoding[..., :7], F.relu(encoding[..., 7:])], dim=-1))  # FoV >= 0
        return history


def _uv_grid(width: int, height: int, aspect: float, device, dtype) -> Tensor:
    """[H, W, 2] normalised coordinates spanning the image diagonal to unit length."""
    diag = math.sqrt(aspect**2 + 1.0)
    sx, sy = aspect / diag, 1.0 / diag
    xs = torch.linspace(-sx * (width - 1) / width, sx * (width - 1) / width, width, device=device, dtype=dtype)
    ys = torch.linspace(-sy * (height - 1) / height, sy * (height - 1) / height, height, device=device, dtype=dtype)
    vv, uu = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([uu, vv], dim=-1)


def _sincos(values: Tensor, dim: int, omega0: float = 100.0) -> Tensor:
    omega = 1.0 / omega0 ** (torch.arange(dim // 2, dtype=torch.float64, device=values.device) / (dim / 2.0))
    angles = values.reshape(-1).double()[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def _position_embedding(x: Tensor, width: int, height: int, ratio: float = 0.1) -> Tensor:
    """Add DPT's sin/cos embedding of normalised pixel positions to a [N, C, h, w] map."""
    h, w, channels = x.shape[-2], x.shape[-1], x.shape[1]
    uv = _uv_grid(w, h, width / height, x.device, x.dtype).reshape(-1, 2)
    emb = torch.cat([_sincos(uv[:, 0], channels // 2), _sincos(uv[:, 1], channels // 2)], dim=-1)
    return x + ratio * emb.reshape(h, w, channels).permute(2, 0, 1)[None].to(x.dtype)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # The official unit applies an in-place ReLU to its input first, so the skip carries relu(x).
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FusionBlock(nn.Module):
    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None, size=None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Dense prediction from four aggregator layers: ``output_dim - 1`` values and a confidence per pixel."""

    def __init__(self, c: VGGTConfig, output_dim: int, activation: str):
        super().__init__()
        dim, oc, feat = 2 * c.embed_dim, c.dpt_out_channels, c.dpt_features
        self.layers, self.patch_size, self.activation = c.dpt_layers, c.patch_size, activation
        self.norm = nn.LayerNorm(dim)
        self.projects = nn.ModuleList([nn.Conv2d(dim, o, 1) for o in oc])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4), nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
            nn.Identity(), nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
        ])  # fmt: skip
        self.scratch = nn.Module()
        for i, o in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(o, feat, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FusionBlock(feat)
        self.scratch.refinenet2 = FusionBlock(feat)
        self.scratch.refinenet3 = FusionBlock(feat)
        self.scratch.refinenet4 = FusionBlock(feat, has_residual=False)
        self.scratch.output_conv1 = nn.Conv2d(feat, feat // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(nn.Conv2d(feat // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1))

    def forward(self, layers: list[Tensor], height: int, width: int, patch_start_idx: int) -> tuple[Tensor, Tensor]:
        b, s = layers[0].shape[:2]
        ph, pw = height // self.patch_size, width // self.patch_size
        maps = []
        for k, layer in enumerate(self.layers):
            x = self.norm(layers[layer][:, :, patch_start_idx:].reshape(b * s, ph * pw, -1))
            x = self.projects[k](x.transpose(1, 2).reshape(b * s, -1, ph, pw))
            maps.append(self.resize_layers[k](_position_embedding(x, width, height)))
        sc = self.scratch
        r1, r2, r3, r4 = (getattr(sc, f"layer{i}_rn")(m) for i, m in enumerate(maps, start=1))
        out = sc.refinenet4(r4, size=r3.shape[2:])
        out = sc.refinenet3(out, r3, size=r2.shape[2:])
        out = sc.refinenet2(out, r2, size=r1.shape[2:])
        out = sc.output_conv1(sc.refinenet1(out, r1))
        out = F.interpolate(out, size=(ph * self.patch_size, pw * self.patch_size), mode="bilinear", align_corners=True)
        out = sc.output_conv2(_position_embedding(out, width, height)).permute(0, 2, 3, 1)  # [N, H, W, out]
        values, conf = out[..., :-1], 1.0 + out[..., -1].exp()
        if self.activation == "exp":
            values = values.exp()
        else:  # "inv_log": sign(y) * (exp|y| - 1)
            values = torch.sign(values) * torch.expm1(values.abs())
        return values.reshape(b, s, *values.shape[1:]), conf.reshape(b, s, *conf.shape[1:])


class VGGT(nn.Module):
    """The network. ``forward(images [B,S,3,H,W] in [0,1], H and W multiples of the patch size)`` returns
    ``pose_enc`` [B,S,9], ``depth`` [B,S,H,W,1], ``depth_conf`` [B,S,H,W] and, with ``points=True``,
    ``world_points`` [B,S,H,W,3] and ``world_points_conf``."""

    IGNORED_PREFIXES = ("track_head.",)  # in the official checkpoint, not built here

    def __init__(self, config: VGGTConfig = VGGTConfig()):
        super().__init__()
        self.config = config
        self.aggregator = Aggregator(config)
        self.camera_head = CameraHead(config)
        self.point_head = DPTHead(config, output_dim=4, activation="inv_log")
        self.depth_head = DPTHead(config, output_dim=2, activation="exp")

    def forward(self, images: Tensor, points: bool = False) -> dict[str, Tensor]:
        if images.dim() == 4:
            images = images[None]
        height, width = images.shape[-2:]
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"VGGT input size must be a multiple of {p} pixels, got {width}x{height}")
        layers = self.aggregator(images)
        start = self.aggregator.patch_start_idx
        out = {"pose_enc": self.camera_head(layers)[-1]}
        out["depth"], out["depth_conf"] = self.depth_head(layers, height, width, start)
        if points:
            out["world_points"], out["world_points_conf"] = self.point_head(layers, height, width, start)
        return out


# ---------------------------------------------------------------------------------------------
# Pose encoding <-> cameras


def quat_xyzw_to_matrix(q: Tensor) -> Tensor:
    """Unit-normalised quaternions [..., 4] (x, y, z, w: scalar last, VGGT's order) -> rotations [..., 3, 3]."""
    x, y, z, w = torch.unbind(q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12), dim=-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*q.shape[:-1], 3, 3)  # fmt: skip


def matrix_to_quat_xyzw(R: Tensor) -> Tensor:
    """Rotations [..., 3, 3] -> quaternions [..., 4] (x, y, z, w) with w >= 0."""
    from scipy.spatial.transform import Rotation

    flat = R.detach().cpu().double().reshape(-1, 3, 3).numpy()
    q = Rotation.from_matrix(flat).as_quat()  # scipy: scalar last
    q = np.where(q[:, 3:4] < 0, -q, q)
    return torch.as_tensor(q, dtype=R.dtype, device=R.device).reshape(*R.shape[:-2], 4)


def pose_encoding_to_cameras(encoding: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """``absT_quaR_FoV`` [..., 9] -> (OpenCV world-to-camera [..., 4, 4], K [..., 3, 3]) for an H x W image.

    The principal point is the image centre."""
    w2c = torch.zeros(*encoding.shape[:-1], 4, 4, dtype=encoding.dtype, device=encoding.device)
    w2c[..., :3, :3] = quat_xyzw_to_matrix(encoding[..., 3:7])
    w2c[..., :3, 3] = encoding[..., :3]
    w2c[..., 3, 3] = 1.0
    K = torch.zeros(*encoding.shape[:-1], 3, 3, dtype=encoding.dtype, device=encoding.device)
    K[..., 0, 0] = (width / 2.0) / torch.tan(encoding[..., 8] / 2.0)
    K[..., 1, 1] = (height / 2.0) / torch.tan(encoding[..., 7] / 2.0)
    K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = width / 2.0, height / 2.0, 1.0
    return w2c, K


def cameras_to_pose_encoding(w2c: Tensor, K: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pose_encoding_to_cameras` (the principal point is not encoded)."""
    fov_h = 2.0 * torch.atan((height / 2.0) / K[..., 1, 1])
    fov_w = 2.0 * torch.atan((width / 2.0) / K[..., 0, 0])
    return torch.cat([w2c[..., :3, 3], matrix_to_quat_xyzw(w2c[..., :3, :3]), fov_h[..., None], fov_w[..., None]], dim=-1)
