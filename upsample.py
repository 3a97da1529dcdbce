"""2x spatial upsampling (report §6, Upsample)."""
import torch
from torch import nn


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (avoids the checkerboard artefacts of
    transposed convs). (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels, with_conv):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
