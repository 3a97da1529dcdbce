"""Single-head self-attention over the spatial positions of a feature map, with a residual
(report §6, AttnBlock)."""
import torch
from torch import nn

from resnetblock import Normalize


class AttnBlock(nn.Module):
    """x + proj_out(softmax(q k^T / sqrt(C)) v), q, k, v from 1x1 convs of GroupNorm(x).
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels, group_channels=4):
        super().__init__()
        self.norm = Normalize(channels, group_channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(B, 1, C, H * W).transpose(-1, -2)  # (B, C, H, W) -> (B, 1, HW, C)
                   for proj in (self.q, self.k, self.v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        out = out.transpose(-1, -2).reshape(B, C, H, W)  # (B, 1, HW, C) -> (B, C, H, W)
        return x + self.proj_out(out)
