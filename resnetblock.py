"""Pre-activation residual block with the timestep embedding added between its convolutions
(report §6, ResnetBlock)."""
import math

import torch
from torch import nn


def nonlinearity(x):
    """Swish / SiLU: x * sigmoid(x)."""
    return torch.nn.functional.silu(x)


def Normalize(channels, group_channels=4):
    """GroupNorm with at most 32 groups of at least group_channels channels each (fewer, wider
    groups for narrow layers). A group of one channel would subtract away the per-channel time
    embedding added before it."""
    return nn.GroupNorm(num_groups=math.gcd(32, channels // group_channels), num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x -> GN, swish, conv3x3, + proj(temb) -> GN, swish, dropout, conv3x3 -> + shortcut(x).
    x: (B, C_in, H, W), temb: (B, temb_ch) -> (B, C_out, H, W)."""

    def __init__(self, in_channels, out_channels, temb_channels, dropout, group_channels=4):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels, group_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 ("network-in-network") projection where the widths differ, so that x + h is defined
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        return self.shortcut(x) + h
