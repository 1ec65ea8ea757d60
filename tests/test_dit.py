"""The backbone: shapes, determinism, adaLN-Zero init, and the DiT paper's size table."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.dit import DiT, dit

# DiT paper, Table 4 (32x32x4 latents, patch 2): params (M) and forward GFLOPs.
PAPER = {"S": (33, 6.06), "B": (130, 23.01), "L": (458, 80.71), "XL": (675, 118.64)}


def tiny(**kw):
    return DiT((3, 16, 16), hidden=64, depth=2, heads=4, patch=4, **kw)


@pytest.mark.parametrize(
    "shape,patch", [((3, 16, 16), 4), ((1, 16, 16), 2), ((4, 32, 32), 2), ((3, 8, 16), 4)]
)
def test_output_has_input_shape(shape, patch):
    net = DiT(shape, hidden=64, depth=1, heads=2, patch=patch, num_classes=5)
    x = torch.randn(3, *shape)
    v = net(x, torch.rand(3), torch.full((3,), 0.25), torch.tensor([0, 4, 5]))
    assert v.shape == x.shape


def test_zero_initialised_output_and_no_randomness_in_forward():
    net = tiny(num_classes=3)
    x, t, d = torch.randn(4, 3, 16, 16), torch.rand(4), torch.full((4,), 1 / 128)
    assert net(x, t, d).abs().max() == 0  # adaLN-Zero + zero final layer: v = 0 at init
    torch.nn.init.normal_(net.final.linear.weight)  # open the output to see the blocks
    for b in net.blocks:
        torch.nn.init.normal_(b.adaLN[-1].weight, std=0.02)
    net.train()
    a = net(x, t, d, torch.tensor([0, 1, 2, 3]))
    b = net(x, t, d, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(a, b), "train-mode forward must be deterministic (no label dropout inside)"
    # the step size and the label both change the output
    assert not torch.allclose(a, net(x, t, torch.full((4,), 0.5), torch.tensor([0, 1, 2, 3])))
    assert not torch.allclose(a, net(x, t, d))  # null label


def test_naive_attention_matches_sdpa():
    torch.manual_seed(0)
    fast, slow = tiny(), tiny(naive_attention=True)
    for b in fast.blocks:
        torch.nn.init.normal_(b.adaLN[-1].weight, std=0.05)
    torch.nn.init.normal_(fast.final.linear.weight, std=0.05)
    slow.load_state_dict(fast.state_dict())
    x, t, d = torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2)
    torch.testing.assert_close(fast(x, t, d), slow(x, t, d), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", list(PAPER))
def test_param_count_and_gflops_match_the_dit_paper(size):
    params_m, gflops = PAPER[size]
    with torch.device("meta"):  # no memory for XL's 675M parameters
        net = dit(size, (4, 32, 32), patch=2, num_classes=1000)
    n = sum(p.numel() for p in net.parameters())
    n_d = sum(p.numel() for p in net.d_embed.parameters())
    hidden = net.hidden
    assert n_d == 256 * hidden + hidden + hidden * hidden + hidden  # the d embedder, documented
    # Without our d embedder the count is the paper's (it rounds to 1M; the sigma channels it
    # also predicts are 4 * p^2 * hidden more, well inside the rounding).
    assert abs((n - n_d) / 1e6 - params_m) < 1.0, f"{size}: {(n - n_d) / 1e6:.2f}M vs {params_m}M"
    assert net.gflops() == pytest.approx(gflops, rel=2e-3)


def test_gflops_agrees_with_torch_flop_counter():
    net = DiT(
        (4, 16, 16), hidden=96, depth=3, heads=4, patch=2, num_classes=10, naive_attention=True
    )
    x = torch.randn(2, 4, 16, 16)
    with FlopCounterMode(display=False) as counter:
        net(x, torch.rand(2), torch.rand(2), torch.tensor([1, 2]))
    measured = counter.get_total_flops() / 2 / 2 / 1e9  # FLOPs -> MACs, per sample
    assert measured == pytest.approx(net.gflops(), rel=0.02)


def test_bad_patch_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by patch size 3"):
        DiT((3, 16, 16), hidden=64, depth=1, heads=2, patch=3)
