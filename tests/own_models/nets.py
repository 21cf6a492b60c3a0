"""A user's own network: a conv stem, a hidden conv layer and one self-attention layer over the map's
positions, built by a plain function with its own keyword arguments."""

from __future__ import annotations

from torch import Tensor, nn


class ConvAttentionNet(nn.Module):
    """conv (stem) -> conv (hidden) -> tokens -> MultiheadAttention -> mean over tokens -> linear."""

    def __init__(self, width: int, heads: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.hidden = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU())
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.hidden(self.stem(x)).flatten(2).transpose(1, 2)  # (B, N, width)
        attended, _ = self.attention(x, x, x, need_weights=False)
        return self.head(self.norm(x + attended).mean(dim=1))


def conv_attention_net(width: int = 16, heads: int = 2, num_classes: int = 10) -> nn.Module:
    """The factory a sweep names as ``own_models.nets:conv_attention_net``."""
    return ConvAttentionNet(width, heads, num_classes)
