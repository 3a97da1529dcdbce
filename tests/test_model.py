"""Timestep embedding and U-Net: formulas, shapes, and a reference attention."""
import math

import pytest
import torch

import config
import helper
import runs
from attnblock import AttnBlock
from conftest import no_eager_fallback
from downsample import Downsample
from model import Model
from upsample import Upsample


def small_config(image_size, channels):
    cfg = config.get_config("smoke")
    return config.merge_config(cfg, {"data": {"image_size": image_size, "channels": channels},
                                     "model": {"ch_mult": [1, 2, 2], "attn_resolutions": [7, 8]}})


def test_timestep_embedding_matches_sinusoid_formula():
    emb = helper.get_timestep_embedding(torch.tensor([0, 3, 999]), 8)
    assert emb.shape == (3, 8)
    for row, t in enumerate([0, 3, 999]):
        frequencies = [math.exp(-math.log(10000) * i / 3) for i in range(4)]
        expected = [math.sin(t * f) for f in frequencies] + [math.cos(t * f) for f in frequencies]
        torch.testing.assert_close(emb[row], torch.tensor(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("image_size, channels", [(28, 1), (32, 1), (28, 3), (32, 3)])
def test_unet_maps_images_to_same_shape(image_size, channels):
    model = Model.from_config(small_config(image_size, channels))
    x = torch.randn(2, channels, image_size, image_size)
    assert model(x, torch.tensor([0, 7])).shape == x.shape


def test_unet_output_depends_on_timestep():
    torch.manual_seed(0)
    model = Model.from_config(small_config(28, 1))
    x = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1)
    out = model(x, torch.tensor([1, 15]))
    assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().mean()


def test_paper_unet_has_the_reports_size():
    model = Model.from_config(config.get_config("paper"))
    megabytes = sum(p.numel() for p in model.parameters()) * 4 / 1e6
    assert 90 < megabytes < 105  # report §6: the checkpoint "weighs in at ~98 MB"


@pytest.mark.parametrize("group_channels, expected", [(4, {32: 4, 64: 4, 96: 12, 128: 4}),
                                                      (8, {32: 8, 64: 8, 96: 24, 128: 8})])
def test_groupnorm_groups_hold_norm_group_channels(group_channels, expected):
    """The cpu preset's widths 32 and 64, and the up path's concatenations of 96 and 128 channels:
    at most 32 groups, so 96 channels form 8 or 4 wider groups."""
    cfg = config.merge_config(config.get_config("cpu"), {"model": {"norm_group_channels": group_channels}})
    norms = [m for m in Model.from_config(cfg).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {m.num_channels: m.num_channels // m.num_groups for m in norms} == expected


def test_attention_matches_explicit_bmm_reference():
    torch.manual_seed(0)
    block = AttnBlock(16)
    x = torch.randn(2, 16, 7, 7)
    B, C, H, W = x.shape
    h = block.norm(x)
    q = block.q(h).reshape(B, C, H * W).permute(0, 2, 1)  # (B, HW, C)
    k = block.k(h).reshape(B, C, H * W)  # (B, C, HW)
    attn = torch.softmax(torch.bmm(q, k) * C ** -0.5, dim=2)  # (B, HW, HW)
    out = torch.bmm(block.v(h).reshape(B, C, H * W), attn.permute(0, 2, 1)).reshape(B, C, H, W)
    torch.testing.assert_close(block(x), x + block.proj_out(out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_conv", [True, False])
def test_resampling_halves_and_doubles(with_conv):
    x = torch.randn(1, 8, 14, 14)
    assert Downsample(8, with_conv)(x).shape == (1, 8, 7, 7)
    assert Upsample(8, with_conv)(x).shape == (1, 8, 28, 28)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def cpu_preset_model():
    torch.manual_seed(0)
    cfg = config.get_config("cpu")
    x = torch.randn(8, 1, 28, 28)
    t = torch.linspace(0, cfg["diffusion"]["T"] - 1, 8).long()
    y = torch.arange(8) % (cfg["model"]["num_classes"] + 1)  # the digits and the null label
    return Model.from_config(cfg).eval(), x, t, y


@torch.no_grad()
def test_bf16_autocast_matches_fp32(cpu_preset_model):
    """bf16 changes rounding, not the function: it keeps ~3 significant digits."""
    model, x, t, y = cpu_preset_model
    reference = model(x, t, y)
    with runs.autocast("cpu", True):
        bf16 = model(x, t, y)
    assert bf16.dtype == torch.bfloat16 and 0 < relative_error(bf16, reference) < 2e-2


@pytest.mark.parametrize("frozen", [False, True])
@torch.no_grad()
def test_compiled_model_matches_eager(frozen):
    """Training's compiled network under bf16 autocast (the cpu preset's), and sampling's with
    the weights frozen into the graph and inductor's layouts (as runs.sampling_network compiles
    it), in fp32 and bf16. The smoke preset's U-Net has every block type of the cpu preset's
    (res blocks that change width, attention, down- and upsampling) at the width and depth that
    compile fastest; the tests that compile share its batch shape, so most of their kernels are
    compiled once. Each precision is a graph of its own, compiled in about half a minute."""
    torch.manual_seed(0)
    model = Model.from_config(config.get_config("smoke")).eval()
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 5, 10, 19])
    compiled = runs.compile_network(model, frozen=frozen, layouts=frozen)
    reference = model(x, t)
    if frozen:
        with no_eager_fallback():
            assert relative_error(compiled(x, t), reference) < 1e-4
    with runs.autocast("cpu", True), no_eager_fallback():
        bf16 = compiled(x, t)
    assert bf16.dtype == torch.bfloat16 and relative_error(bf16, reference) < 2e-2


@torch.no_grad()
def test_frozen_compiled_networks_keep_their_own_weights():
    """Two networks of one architecture compiled with frozen weights in one process (as when
    evaluating several checkpoints) must not share each other's constants."""
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 5, 10, 19])
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Model.from_config(config.get_config("smoke")).eval()
        compiled = runs.compile_network(model, frozen=True, layouts=True)
        with no_eager_fallback():
            assert relative_error(compiled(x, t), model(x, t)) < 1e-4
