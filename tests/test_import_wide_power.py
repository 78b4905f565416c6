"""WidePowerQuantizer: POT / POST with 2^b + 1 levels (imported checkpoints), its tie
ranks, and its deploy form as (b + 1)-bit Pow2Shift codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qconvert.export.deploy import deploy_weight
from qconvert.ops import pow2_shift
from qconvert.ops.packing import unpack_codes_np
from qconvert.quant import LayerSpec, QuantSpec, WidePowerQuantizer, apply_layer_specs


def wide(bits: int, root: int, channels: int = 0, seed: int = 0) -> WidePowerQuantizer:
    q = WidePowerQuantizer(bits, root, channels=channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q.alpha.copy_(0.05 + torch.rand(q.alpha.shape, generator=g))
    q.initialized.fill_(True)
    return q.eval()


def expected_magnitudes(bits: int, root: int) -> np.ndarray:
    """0 and base^-e for e = 0 .. 2^(b-1) - 1, ascending (float64 -> float32)."""
    base = 2.0 if root == 1 else np.sqrt(2.0)
    mags = [base ** -float(e) for e in range(2 ** (bits - 1))]
    return np.array([0.0] + sorted(mags), dtype=np.float32)


@pytest.mark.parametrize("root", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_level_set_has_two_to_the_b_plus_one_levels(bits, root):
    q = wide(bits, root)
    levels = q.levels().numpy() / q.alpha.item()
    mags = expected_magnitudes(bits, root)
    assert levels.shape == (2 ** bits + 1,)
    np.testing.assert_allclose(levels, np.concatenate([-mags[::-1][:-1], mags]), rtol=1e-6)
    assert np.all(np.diff(q.levels().numpy()) > 0)


@pytest.mark.parametrize("root", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 7])
def test_forward_is_the_nearest_level_by_float32_distance(bits, root):
    """Brute force over every level: the smallest float32 |v - level|, ties to the lower
    rank; weights include exact midpoints and values beyond the clip."""
    q = wide(bits, root, channels=3, seed=bits)
    g = torch.Generator().manual_seed(bits + 10 * root)
    unit = q._unit_levels()
    mids = ((unit[:-1] + unit[1:]) / 2)
    w = torch.cat([torch.randn(3, 200, generator=g) * 0.6,
                   mids.repeat(3, 1), torch.tensor([[1.7, -2.0, 0.0]] * 3)], dim=1)
    alpha = q.alpha.detach().view(-1, 1)
    w = w * alpha  # exact for the midpoints only when w / alpha returns them; checked below
    with torch.no_grad():
        got = q(w)
    v = torch.clamp(w / alpha, -1, 1)
    distance = (v.unsqueeze(-1) - unit).abs()  # [C, n, L]
    best = distance.min(dim=-1, keepdim=True).values
    candidates = torch.where(distance == best, q.tie_rank.float(), torch.inf)
    expected = unit[candidates.argmin(dim=-1)] * alpha
    assert torch.equal(got, expected)
    assert int((distance == best).sum(-1).gt(1).sum()) > 0  # some ties were exercised


def test_default_ranks_send_ties_toward_zero():
    q = wide(3, 1)  # magnitudes 0, 1/8, 1/4, 1/2, 1
    with torch.no_grad():
        q.alpha.fill_(1.0)
        got = q(torch.tensor([0.75, -0.75, 0.0625, -0.375, 0.1875]))
    assert got.tolist() == [0.5, -0.5, 0.0, -0.25, 0.125]


def test_ranks_decide_ties_and_only_ties():
    q = wide(3, 1)
    with torch.no_grad():
        q.alpha.fill_(1.0)
        q.tie_rank.copy_(torch.arange(8, -1, -1))  # prefer the upper neighbour everywhere
        got = q(torch.tensor([0.75, -0.75, 0.0625, 0.74, 0.76]))
    assert got.tolist() == [1.0, -0.5, 0.125, 0.5, 1.0]


@pytest.mark.parametrize("root", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4, 7])
def test_deploy_codes_decode_to_the_forward_values(bits, root):
    """Pow2Shift at b + 1 bits, decoded by the op's reference, gives the QAT weight bit for
    bit, every level included."""
    q = wide(bits, root, channels=4, seed=3)
    unit = q._unit_levels()
    g = torch.Generator().manual_seed(1)
    w = torch.cat([unit.repeat(4, 1), torch.randn(4, 50, generator=g) * 0.5], dim=1)
    w = w * q.alpha.detach().view(-1, 1)
    deployed = deploy_weight(q, w)
    assert deployed.bits == bits + 1
    with torch.no_grad():
        expected = q(w)
    decoded = pow2_shift.reference(deployed.codes.numpy(), deployed.alpha.numpy(),
                                   bits=bits + 1, shape=list(w.shape), root=root)
    np.testing.assert_array_equal(decoded, expected.numpy())
    codes = unpack_codes_np(deployed.codes.numpy(), bits + 1, w.numel())
    m = codes & ((1 << bits) - 1)
    assert set(np.unique(m)) <= {0} | set(range(2 ** (bits - 1), 2 ** bits))


def test_eight_bits_are_refused():
    with pytest.raises(ValueError, match="2..7"):
        WidePowerQuantizer(8, 1)


def test_spec_kinds_build_wide_quantizers_and_ranks_survive_the_state_dict():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3))
    spec = LayerSpec(weight=QuantSpec("post-wide", 3, per_channel=True),
                     act=QuantSpec("lsq", 4, signed=False))
    apply_layer_specs(net, {"0": spec})
    q = net[0].weight_quant
    assert isinstance(q, WidePowerQuantizer) and q.root == 2 and q.alpha.shape == (3,)
    state = net.state_dict()
    assert "0.weight_quant.tie_rank" in state
    state["0.weight_quant.tie_rank"] = torch.arange(9)
    other = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3))
    apply_layer_specs(other, {"0": spec})
    other.load_state_dict(state)
    assert other[0].weight_quant.tie_rank.tolist() == list(range(9))
