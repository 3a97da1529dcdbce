"""The time-conditional U-Net eps_theta(x_t, t) (report §6), laid out as ermongroup/ddim's Model."""
import torch
from torch import nn

from attnblock import AttnBlock
from downsample import Downsample
from helper import get_timestep_embedding
from resnetblock import Normalize, ResnetBlock, nonlinearity
from upsample import Upsample

W_SCALE = 250.0  # guidance weight -> embedding argument: w = 4 turns it as t = 1000 does


class Model(nn.Module):
    """conv_in -> down levels (ResnetBlocks [+ AttnBlock], Downsample) -> middle (Resnet, Attn,
    Resnet) -> up levels (ResnetBlocks on skip concatenations [+ AttnBlock], Upsample) -> GN,
    swish, conv_out.  x: (B, C, H, W), t: (B,) timestep indices -> (B, C, H, W).

    With num_classes > 0 the network is also conditioned on a label y (B,) in 0..num_classes,
    where y = num_classes is the "null" label of classifier-free guidance (Ho & Salimans 2022):
    a learned embedding of y is added to the time embedding.

    With guidance_embedding the network also takes the guidance weight w (B,) as an input
    (a guidance-distilled student, Meng et al. 2023 §4.1): a sinusoidal embedding of w through
    its own MLP is added to the time embedding as well. Its last layer starts at zero, so a
    student copied from its teacher starts as the teacher's conditional network."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv,
                 in_channels, resolution, num_classes=0, norm_group_channels=4, guidance_embedding=False):
        super().__init__()
        self.ch, self.num_res_blocks, self.num_resolutions = ch, num_res_blocks, len(ch_mult)
        self.num_classes = num_classes
        gc = norm_group_channels  # channels per GroupNorm group
        self.temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, self.temb_ch), nn.SiLU(), nn.Linear(self.temb_ch, self.temb_ch))
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes + 1, self.temb_ch)  # the last row: null label
        self.guidance_embedding = guidance_embedding
        if guidance_embedding:
            self.guidance_emb = nn.Sequential(nn.Linear(ch, self.temb_ch), nn.SiLU(),
                                              nn.Linear(self.temb_ch, self.temb_ch))
            nn.init.zeros_(self.guidance_emb[-1].weight), nn.init.zeros_(self.guidance_emb[-1].bias)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        widths = [ch * m for m in ch_mult]
        block_in, curr_res, skip_channels = ch, resolution, [ch]
        self.down = nn.ModuleList()
        for i_level, block_out in enumerate(widths):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, self.temb_ch, dropout, group_channels=gc))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, gc))
                skip_channels.append(block_in)
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
                skip_channels.append(block_in)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, dropout, group_channels=gc)
        self.mid.attn_1 = AttnBlock(block_in, gc)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, dropout, group_channels=gc)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in + skip_channels.pop(), widths[i_level], self.temb_ch, dropout,
                                               group_channels=gc))
                block_in = widths[i_level]
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, gc))
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, level)  # keep self.up[i_level] indexed like self.down

        self.norm_out = Normalize(block_in, gc)
        self.conv_out = nn.Conv2d(block_in, in_channels, 3, padding=1)

    @classmethod
    def from_config(cls, cfg):
        return cls(**cfg["model"], in_channels=cfg["data"]["channels"], resolution=cfg["data"]["image_size"])

    def forward(self, x, t, y=None, w=None):
        assert x.ndim == 4 and t.shape == (x.shape[0],), f"x {tuple(x.shape)}, t {tuple(t.shape)}"
        assert (y is not None) == (self.num_classes > 0), "a label y for conditional models only"
        assert (w is not None) == self.guidance_embedding, "a guidance weight w for guidance-distilled models only"
        temb = self.temb(get_timestep_embedding(t, self.ch))  # (B,) -> (B, 4 ch)
        if y is not None:
            temb = temb + self.label_emb(y)  # (B,) -> (B, 4 ch)
        if w is not None:  # w scaled so its useful range, 0 to a few, turns the embedding as t's 0..T do
            temb = temb + self.guidance_emb(get_timestep_embedding(W_SCALE * w, self.ch))  # (B,) -> (B, 4 ch)

        hs = [self.conv_in(x)]
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(level.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)

        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)  # skip: (B, C + C_skip, H, W)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)

        return self.conv_out(nonlinearity(self.norm_out(h)))
