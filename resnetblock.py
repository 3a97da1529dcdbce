"""Pre-activation residual block with the timestep embedding added between its convolutions
(report §6, ResnetBlock)."""
import math

import torch
from torch import nn


def nonlinearity(x):
    """Swish / SiLU: x * sigmoid(x)."""
    return torch.nn.functional.silu(x)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, computed in plain ops when compiled with x channels_last (NHWC).

    PyTorch's CPU kernel walks an NHWC group with a stride of C, touching C/G channels per
    step, where NCHW reads each group contiguously. Here the statistics come from per-channel
    ones instead, reductions over H*W that are contiguous in NHWC, combined per group on the
    small (B, C) tensor by the law of total variance,
        mean_g = mean_c(m_c),  var_g = mean_c(v_c) + mean_c((m_c - mean_g)^2),
    then y = x * scale + shift with scale = gamma / sqrt(var_g + eps), shift = beta - mean_g scale,
    one broadcast over (B, C). Statistics in fp32, whatever the dtype of x. torch.compile fuses
    this into two loops over x; in eager the unfused ops are slower than PyTorch's kernel,
    which is kept there (docs/speed.md). Same parameters, same result as nn.GroupNorm.
    plain: force (True) or avoid (False) the plain ops; None: only while compiling."""

    def forward(self, x, plain=None):
        plain = torch.compiler.is_compiling() if plain is None else plain
        if not plain or not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
            return super().forward(x)
        B, C, G = x.shape[0], x.shape[1], self.num_groups
        var_c, mean_c = torch.var_mean(x.float(), dim=(2, 3), correction=0)  # per channel, (B, C) each
        var_c, mean_c = var_c.view(B, G, C // G), mean_c.view(B, G, C // G)
        mean_g = mean_c.mean(-1, keepdim=True)  # (B, G, 1)
        var_g = var_c.mean(-1, keepdim=True) + (mean_c - mean_g).pow(2).mean(-1, keepdim=True)
        scale = self.weight.view(G, C // G) * (var_g + self.eps).rsqrt()  # (B, G, C/G)
        shift = self.bias.view(G, C // G) - mean_g * scale
        return (x * scale.view(B, C, 1, 1) + shift.view(B, C, 1, 1)).to(x.dtype)


def Normalize(channels):
    """GroupNorm with 32 groups of at least 4 channels each (fewer groups for narrow layers).
    A group of one channel would subtract away the per-channel time embedding added before it."""
    return GroupNorm(num_groups=math.gcd(32, channels // 4), num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x -> GN, swish, conv3x3, + proj(temb) -> GN, swish, dropout, conv3x3 -> + shortcut(x).
    x: (B, C_in, H, W), temb: (B, temb_ch) -> (B, C_out, H, W)."""

    def __init__(self, in_channels, out_channels, temb_channels, dropout, conv_shortcut=False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            # 3x3 or 1x1 ("network-in-network") projection so that x + h is defined
            kernel = 3 if conv_shortcut else 1
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        return self.shortcut(x) + h
