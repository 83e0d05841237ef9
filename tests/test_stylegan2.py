"""The segmented StyleGAN2: shapes, latent spaces, g_{i->j} chaining and the SAM composition."""

import pytest
import torch

from saminv.models.stylegan2 import Generator, GeneratorConfig, default_feature_blocks

SMALL = GeneratorConfig(resolution=32, z_dim=64, w_dim=64, n_mapping=2, channel_base=512, channel_max=32)


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    g = Generator(SMALL).eval()
    with torch.no_grad():  # non-zero noise strengths and biases so that every path matters
        for name, p in g.named_parameters():
            if name.endswith("noise_strength") or name.endswith(".bias"):
                p.normal_(0, 0.2)
    return g


def test_shapes_and_spaces(G):
    z = torch.randn(3, SMALL.z_dim)
    x = G(z)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert SMALL.n_latent == 8
    assert [s.name for s in G.spaces] == ["W+", "F2", "F4", "F6"]
    assert G.space("F4").shape == (32, 16, 16)
    with pytest.raises(KeyError):
        G.space("F10")


@pytest.mark.parametrize("res,expected", [(64, (1, 2, 3, 4)), (256, (2, 3, 4, 5)), (1024, (2, 3, 4, 5)), (16, (1, 2))])
def test_default_spaces_follow_the_paper(res, expected):
    # 64 px: F2..F8 (8..64 px); >= 256 px: F4..F10 (16..128 px), as in SAM.
    assert default_feature_blocks(res) == expected


@pytest.mark.parametrize("res", [16, 64, 128])
def test_any_power_of_two_resolution(res):
    cfg = GeneratorConfig(resolution=res, z_dim=16, w_dim=16, n_mapping=1, channel_base=256, channel_max=16)
    assert Generator(cfg)(torch.randn(1, 16)).shape == (1, 3, res, res)


def test_bad_configs():
    for bad in (dict(resolution=48), dict(resolution=8), dict(feature_blocks=(3, 1))):
        with pytest.raises(ValueError):
            GeneratorConfig(**bad)


def test_zero_masks_equal_plain_forward_exactly(G):
    ws = G.broadcast(G.mapping(torch.randn(2, SMALL.z_dim))) + 0.1 * torch.randn(2, SMALL.n_latent, SMALL.w_dim)
    plain = G.synthesis(ws)
    residuals = {}
    for s in G.spaces[1:]:
        k = int(s.name[1:])
        residuals[k] = (torch.zeros(2, 1, *s.shape[1:]), torch.randn(2, *s.shape))
    assert torch.equal(G.synthesis(ws, residuals), plain)


def test_segments_chain_to_the_full_pass(G):
    ws = G.broadcast(G.mapping(torch.randn(2, SMALL.z_dim)))
    state = G.synthesis.run(ws, 0, 1)
    state = G.synthesis.run(ws, 2, 2, state=state)
    state = G.synthesis.run(ws, 3, state=state)
    assert torch.equal(state[1], G.synthesis(ws))


def test_residual_is_added_after_its_block_only(G):
    ws = G.broadcast(G.mapping(torch.randn(1, SMALL.z_dim)))
    s = G.space("F4")
    delta = torch.randn(1, *s.shape)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1  # top half only
    x4, _ = G.synthesis.run(ws, 0, 2, hook=lambda k, x, skip: (x + mask * delta if k == 4 else x, skip))
    ref4, _ = G.synthesis.run(ws, 0, 2)
    diff = (x4 - ref4).abs().sum(1)[0]
    assert diff[8:].max() == 0 and diff[:8].min() > 0
    # The skip image entering the block is untouched: blocks before F4 give the same state.
    state = G.synthesis.run(ws, 0, 1, hook=lambda k, x, skip: (x + delta if k == 4 else x, skip))
    assert all(torch.equal(a, b) for a, b in zip(state, G.synthesis.run(ws, 0, 1)))
    assert not torch.equal(G.synthesis(ws, {4: (mask, delta)}), G.synthesis(ws))


def test_last_block_is_a_real_space(G):
    # F6 is the last block of the 32 px generator; its delta reaches the image through its ToRGB.
    ws = G.broadcast(G.mapping(torch.randn(1, SMALL.z_dim)))
    s = G.space("F6")
    out = G.synthesis(ws, {6: (torch.ones(1, 1, 32, 32), torch.randn(1, *s.shape))})
    assert (out - G.synthesis(ws)).abs().mean() > 1e-3


def test_noise_modes(G):
    ws = G.broadcast(G.mapping(torch.randn(1, SMALL.z_dim)))
    const = G.synthesis(ws, noise_mode="const")
    assert torch.equal(const, G.synthesis(ws, noise_mode="const"))
    assert not torch.equal(G.synthesis(ws, noise_mode="random"), G.synthesis(ws, noise_mode="random"))
    assert not torch.equal(G.synthesis(ws, noise_mode="none"), const)
    with pytest.raises(ValueError):
        G.synthesis(ws, noise_mode="fixed")


def test_truncation_moves_toward_w_avg(G):
    G.mapping.w_avg.copy_(G.mean_w(2000))
    z = torch.randn(4, SMALL.z_dim)
    w = G.mapping(z)
    assert torch.allclose(G.mapping(z, truncation=0.0), G.mapping.w_avg.expand_as(w))
    half = G.mapping(z, truncation=0.5)
    assert torch.allclose(half, (w + G.mapping.w_avg) / 2, atol=1e-5)


def test_batch_items_are_independent(G):
    ws = G.broadcast(G.mapping(torch.randn(3, SMALL.z_dim)))
    batched = G.synthesis(ws)
    single = torch.cat([G.synthesis(ws[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
