"""2x spatial downsampling (report §6, Downsample)."""
import torch
from torch import nn


class Downsample(nn.Module):
    """Strided 3x3 conv after zero-padding right and bottom by one pixel, or 2x2 average
    pooling. (B, C, H, W) -> (B, C, H/2, W/2) for even H, W."""

    def __init__(self, channels, with_conv):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x):
        if self.conv is None:
            return torch.nn.functional.avg_pool2d(x, kernel_size=2, stride=2)
        # asymmetric padding: (H + 1 - 3) // 2 + 1 = H / 2 exactly
        return self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1)))
