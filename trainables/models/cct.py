"""Compact Convolutional Transformer (Hassani et al., arXiv:2104.05704) with LS-MHA and conv blocks.

image -> conv tokenizer -> [k conv blocks on the token map] -> tokens + positions
      -> (blocks - k) pre-norm transformer blocks -> LayerNorm -> sequence pooling -> linear head.

Attention width is heads * head_dim, independent of the embedding width (large-scale MHA), and is
projected back to the width. Blocks are numbered by absolute depth in both module paths and taps:
with k conv blocks, `conv_blocks` holds "0".."k-1" and `blocks` holds "k".."blocks-1".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import (
    Family,
    SpecError,
    TapInfo,
    check_bool,
    check_choice,
    check_common,
    check_float,
    check_int,
    register_family,
)
from .taps import TappedModel

# Every key a CCT spec may set, at CCT-7/3x1 for CIFAR-100. `tokenizer_stride: None` means CCT's rule
# max(1, kernel // 2 - 1).
DEFAULTS: dict[str, Any] = {
    "num_classes": 100,
    "image_size": 32,
    "in_channels": 3,
    "width": 256,
    "blocks": 7,
    "heads": 4,
    "head_dim": 64,
    "mlp_ratio": 2.0,
    "tokenizer_layers": 1,
    "tokenizer_kernel": 3,
    "tokenizer_stride": None,
    "tokenizer_channels": 64,
    "pool": True,
    "pos_embedding": "learnable",
    "dropout": 0.0,
    "attn_dropout": 0.1,
    "stochastic_depth": 0.1,
    "n_conv_blocks": 0,
    "seq_pool": True,
}


def _lsmha(heads: int, head_dim: int) -> dict[str, Any]:
    return {"heads": heads, "head_dim": head_dim}


# Named variants: overrides of DEFAULTS (a new preset is one entry here).
PRESETS: dict[str, dict[str, Any]] = {
    "cct_7_3x1": {},
    # Flowers-102: CCT-7/7x2 with sine positions like Compact-Transformers' model; 64 px here.
    "cct_7_7x2": {
        "num_classes": 102,
        "image_size": 64,
        "tokenizer_layers": 2,
        "tokenizer_kernel": 7,
        "pos_embedding": "sine",
    },
    "cct_lsmha_16x16": _lsmha(16, 16),
    "cct_lsmha_25x4": _lsmha(25, 4),
    "cct_lsmha_32x8": _lsmha(32, 8),
    "cct_lsmha_64x4": _lsmha(64, 4),
    "cct_narrow": {"width": 128, "blocks": 2, "heads": 4, "head_dim": 32},
    "cct_narrow_lsmha": {"width": 128, "blocks": 2, "heads": 16, "head_dim": 8},
    # The demo's members: cct_narrow with a two-layer tokenizer (8x8 tokens) and block 0 conv-replaced.
    "cct_narrow_conv": {
        "width": 128,
        "blocks": 2,
        "heads": 4,
        "head_dim": 32,
        "tokenizer_layers": 2,
        "n_conv_blocks": 1,
    },
    "cct_tiny": {"width": 32, "blocks": 1, "heads": 2, "head_dim": 16, "tokenizer_layers": 2, "tokenizer_channels": 8},
}


def cct_tokenizer_stages(spec: dict) -> list[tuple[str, int, int, int]]:
    """The tokenizer's windows in order as ("conv" | "pool", kernel, stride, padding)."""
    k = spec["tokenizer_kernel"]
    conv = ("conv", k, spec["tokenizer_stride"], max(1, k // 2))
    pool = ("pool", 3, 2, 1)
    return ([conv, pool] if spec["pool"] else [conv]) * spec["tokenizer_layers"]


def cct_grid(spec: dict) -> int:
    """Side of the token map that the tokenizer makes from a `image_size` square image."""
    size = spec["image_size"]
    for i, (kind, kernel, stride, padding) in enumerate(cct_tokenizer_stages(spec)):
        if size < kernel:
            raise SpecError(
                f"model.image_size: {spec['image_size']} is not usable by the "
                f"tokenizer (its layer {i}, a {kernel}x{kernel} {kind}, "
                f"gets {size} px)"
            )
        size = (size + 2 * padding - kernel) // stride + 1
    return size


def cct_hidden(spec: dict) -> int:
    """Hidden width of the transformer MLP."""
    return int(spec["width"] * spec["mlp_ratio"])


def validate(spec: dict) -> None:
    check_common(spec)
    for key in ("width", "blocks", "heads", "head_dim", "tokenizer_layers", "tokenizer_kernel", "tokenizer_channels"):
        check_int(spec, key, 1)
    if spec["tokenizer_stride"] is None:
        spec["tokenizer_stride"] = max(1, spec["tokenizer_kernel"] // 2 - 1)
    check_int(spec, "tokenizer_stride", 1)
    check_float(spec, "mlp_ratio", 0.0, float("inf"))
    if cct_hidden(spec) < 1:
        raise SpecError(f"model.mlp_ratio: width * mlp_ratio must be >= 1, got {spec['mlp_ratio']}")
    check_bool(spec, "pool")
    check_bool(spec, "seq_pool")
    check_choice(spec, "pos_embedding", ("learnable", "sine", "none"))
    for key in ("dropout", "attn_dropout", "stochastic_depth"):
        check_float(spec, key, 0.0, 1.0, high_open=True)
    check_int(spec, "n_conv_blocks", 0)
    if spec["n_conv_blocks"] > spec["blocks"]:
        raise SpecError(f"model.n_conv_blocks: {spec['n_conv_blocks']} exceeds model.blocks ({spec['blocks']})")
    cct_grid(spec)


class Tokenizer(nn.Module):
    """Bias-free conv + ReLU (+ 3x3 max-pool, stride 2) layers; returns the (B, C, H, W) map."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, convs_left = spec["in_channels"], spec["tokenizer_layers"]
        for kind, kernel, stride, padding in cct_tokenizer_stages(spec):
            if kind == "pool":
                layers.append(nn.MaxPool2d(kernel, stride, padding))
                continue
            convs_left -= 1
            c_out = spec["tokenizer_channels"] if convs_left else spec["width"]
            layers += [nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.ReLU()]
            c_in = c_out
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ConvBlock(nn.Sequential):
    """A transformer block replaced by a 3x3 same-padding conv, BN and ReLU on the token map."""

    def __init__(self, width: int) -> None:
        super().__init__(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())


class Attention(nn.Module):
    """Multi-head self-attention with inner size heads * head_dim, projected back to `width`."""

    def __init__(self, width: int, heads: int, head_dim: int, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.attn_dropout = heads, head_dim, attn_dropout
        self.qkv = nn.Linear(width, 3 * heads * head_dim, bias=False)
        self.heads_tap = nn.Identity()  # per-head outputs, head-major, before the projection
        self.proj = nn.Linear(heads * head_dim, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        y = self.heads_tap(y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))
        return self.proj_drop(self.proj(y))

    def matmul_macs(self, x: Tensor) -> int:
        """MACs of q @ k^T and attn @ v for input x of shape (B, N, width)."""
        B, N, _ = x.shape
        return 2 * B * self.heads * N * N * self.head_dim


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, zero a whole residual branch for each image with
    probability ``p`` and scale the kept ones by 1 / (1 - p); the identity in evaluation."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0.0 else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer encoder block with stochastic depth on both residual branches."""

    def __init__(self, spec: dict[str, Any], drop_path: float) -> None:
        super().__init__()
        width = spec["width"]
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, spec["heads"], spec["head_dim"], spec["attn_dropout"], spec["dropout"])
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, cct_hidden(spec), spec["dropout"])
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sine_positions(n_tokens: int, width: int) -> Tensor:
    """Fixed sinusoidal position table of shape (1, n_tokens, width), as in CCT."""
    position = torch.arange(n_tokens, dtype=torch.float32)[:, None]
    dim = torch.arange(width, dtype=torch.float32)[None, :]
    angle = position / 10000 ** (2 * torch.div(dim, 2, rounding_mode="floor") / width)
    table = torch.where(dim.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table[None]


class CCT(TappedModel):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        width, n_conv, depth = spec["width"], spec["n_conv_blocks"], spec["blocks"]
        n_tokens = cct_grid(spec) ** 2
        drop_paths = torch.linspace(0, spec["stochastic_depth"], depth).tolist()

        self.tokenizer = Tokenizer(spec)
        self.conv_blocks = nn.ModuleDict({str(i): ConvBlock(width) for i in range(n_conv)})
        if spec["pos_embedding"] == "learnable":
            self.pos_embedding = nn.Parameter(torch.zeros(1, n_tokens, width))
            nn.init.trunc_normal_(self.pos_embedding, std=0.2)
        elif spec["pos_embedding"] == "sine":
            self.register_buffer("pos_embedding", sine_positions(n_tokens, width), persistent=False)
        else:
            self.pos_embedding = None
        self.dropout = nn.Dropout(spec["dropout"])
        self.blocks = nn.ModuleDict({str(i): Block(spec, drop_paths[i]) for i in range(n_conv, depth)})
        self.norm = nn.LayerNorm(width)
        self.attention_pool = nn.Linear(width, 1) if spec["seq_pool"] else None
        self.head = nn.Linear(width, spec["num_classes"])
        self.apply(_init_weights)

        heads = TapInfo("token", spec["heads"], spec["head_dim"])
        self.add_tap("tokenizer", "tokenizer", TapInfo("conv"))
        for i in range(n_conv):
            self.add_tap(f"conv_block.{i}", f"conv_blocks.{i}", TapInfo("conv"))
        for i in range(n_conv, depth):
            self.add_tap(f"block.{i}.heads", f"blocks.{i}.attn.heads_tap", heads)
            self.add_tap(f"block.{i}.ff_in", f"blocks.{i}.norm2", TapInfo("token"))  # FF input
            self.add_tap(f"block.{i}.ff_hidden", f"blocks.{i}.mlp.act", TapInfo("token"))
            self.add_tap(f"block.{i}.out", f"blocks.{i}", TapInfo("token"))
            self.add_connection("andc", f"blocks.{i}.mlp.fc1.weight", f"block.{i}.ff_in", f"block.{i}.ff_hidden")
            self.add_connection("andc", f"blocks.{i}.mlp.fc2.weight", f"block.{i}.ff_hidden", f"block.{i}.out")
        self.add_tap("final_norm", "norm", TapInfo("token"))

    def pool(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, D): softmax-over-tokens attention pooling, or the mean if disabled."""
        if self.attention_pool is None:
            return x.mean(dim=1)
        weights = self.attention_pool(x).softmax(dim=1)  # (B, N, 1)
        return (weights * x).sum(dim=1)

    def forward_logits(self, x: Tensor) -> Tensor:
        x = self.tokenizer(x)
        for block in self.conv_blocks.values():
            x = block(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, width)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding
        x = self.dropout(x)
        for block in self.blocks.values():
            x = block(x)
        return self.head(self.pool(self.norm(x)))


def _init_weights(module: nn.Module) -> None:
    """CCT's init: truncated-normal linears, zero biases, unit LayerNorms, Kaiming convs."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight)


register_family(Family("cct", DEFAULTS, PRESETS, validate, CCT))
