"""Quantizers against the closed forms in docs/quantizers.md.

Every expectation here is computed in the test itself, with numpy / python floats
(or plain torch arithmetic), never with the helpers of the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qconvert.quant import (
    ASQQuantizer,
    LCQQuantizer,
    LSQQuantizer,
    PowerQuantizer,
    QuantSpec,
    StepAdapter,
)

BITS = list(range(2, 9))



# --------------------------------------------------------------------------- helpers


def heavy(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Heavy-tailed float32 data (gaussian times log-normal), no exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g)) * scale
    return torch.where(x == 0, torch.full_like(x, 1e-3), x)


def bounds(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range, written out from docs/quantizers.md."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def ready(q, signed: bool | None = None):
    """Mark a quantizer initialised; the test sets its parameters by hand."""
    q.initialized.fill_(True)
    if signed is not None:
        q.signed_flag.fill_(signed)
    return q


def even_of(k: int) -> int:
    """Of the two integers k and k + 1, the even one."""
    return k if k % 2 == 0 else k + 1


def set_adapter_to_one(q: ASQQuantizer) -> None:
    """Last adapter layer: weight 0, bias 1, so beta == 1 exactly for any input."""
    last = [m for m in q.adapter.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.0)


def np_softmax(theta: np.ndarray) -> np.ndarray:
    e = np.exp(theta - theta.max())
    return e / e.sum()


def np_compand(theta: np.ndarray, v: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q(v), S f(v)): Q(v) = f^-1(round(S f(v)) / S) in float64, f piecewise linear."""
    k_n = theta.size
    t = np_softmax(theta.astype(np.float64))
    slope = k_n * t
    offset = np.concatenate([[0.0], np.cumsum(t)[:-1]])
    start = np.arange(k_n) / k_n
    k = np.clip(np.floor(v * k_n).astype(int), 0, k_n - 1)
    scaled = (slope[k] * (v - start[k]) + offset[k]) * top
    u = np.round(scaled) / top
    kk = np.clip(np.searchsorted(offset, u, side="right") - 1, 0, k_n - 1)
    return start[kk] + (u - offset[kk]) / slope[kk], scaled


def near_tie(scaled: np.ndarray) -> np.ndarray:
    """Where float32 and float64 rounding could disagree."""
    return np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) < 1e-3


def sum_close(got, expected, magnitude, rel: float = 1e-5) -> None:
    """float32 sums against float64 ones: tolerance scaled by the sum of |terms|."""
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=rel * np.max(magnitude) + 1e-7)


# --------------------------------------------------------------------------- level tables


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_lsq_levels_per_tensor_are_step_times_k(bits, signed):
    rng = np.random.default_rng(bits)
    s = np.float32(rng.uniform(0.01, 2.0))
    q = LSQQuantizer(bits, signed=signed)
    q.step.data.fill_(float(s))
    lo, hi = bounds(bits, signed)
    expected = np.array([np.float32(np.float64(s) * k) for k in range(lo, hi + 1)], np.float32)
    got = q.levels().numpy()
    assert got.dtype == np.float32 and got.shape == (2**bits,)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("bits", BITS)
def test_lsq_levels_per_channel_are_step_times_k(bits):
    rng = np.random.default_rng(100 + bits)
    steps = rng.uniform(0.01, 2.0, size=5).astype(np.float32)
    q = LSQQuantizer(bits, is_weight=True, channels=5)
    q.step.data.copy_(torch.from_numpy(steps))
    lo, hi = bounds(bits, True)
    expected = np.array(
        [[np.float32(np.float64(s) * k) for k in range(lo, hi + 1)] for s in steps], np.float32
    )
    got = q.levels().numpy()
    assert got.shape == (5, 2**bits)
    np.testing.assert_array_equal(got, expected)


def power_table(bits: int, root: int) -> np.ndarray:
    """Strict budget: 0 and +-2^(-e/root) for e = 0..M-1, M = 2^(b-1) - 1, ascending."""
    m = 2 ** (bits - 1) - 1
    mags = np.array([np.float32(2.0 ** (-e / root)) for e in range(m)], np.float32)
    return np.concatenate([-mags, [np.float32(0)], mags[::-1]]).astype(np.float32)


@pytest.mark.parametrize("root", [1, 2], ids=["pot", "post"])
@pytest.mark.parametrize("bits", BITS)
def test_power_levels_strict_budget(bits, root):
    q = PowerQuantizer(bits, root)
    got = q.levels().numpy()
    expected = power_table(bits, root)
    assert got.dtype == np.float32
    assert got.shape == (2**bits - 1,)  # sign bit + M magnitudes + zero: never 2^b + 1
    np.testing.assert_array_equal(got, expected)
    m = 2 ** (bits - 1) - 1
    assert got[-1] == np.float32(1.0)
    assert got[m + 1] == np.float32(2.0 ** (-(m - 1) / root))  # smallest magnitude


@pytest.mark.parametrize("root", [1, 2], ids=["pot", "post"])
def test_power_levels_scale_with_alpha_per_channel(root):
    alphas = np.array([0.3, 1.7, 0.05], np.float32)
    q = PowerQuantizer(5, root, channels=3)
    q.alpha.data.copy_(torch.from_numpy(alphas))
    base = power_table(5, root).astype(np.float64)
    expected = np.array([(np.float64(a) * base).astype(np.float32) for a in alphas])
    np.testing.assert_array_equal(q.levels().numpy(), expected)


def test_power_levels_four_bit_example():
    pot, post = PowerQuantizer(4, 1).levels(), PowerQuantizer(4, 2).levels()
    assert pot.numel() == post.numel() == 15
    assert pot[8].item() == 2.0**-6 and pot[-1].item() == 1.0
    assert post[8].item() == 2.0**-3 and post[-1].item() == 1.0
    np.testing.assert_array_equal(
        post[7:].numpy(),
        np.float32([0, 2**-3, 2**-2.5, 2**-2, 2**-1.5, 2**-1, 2**-0.5, 1]),
    )


def uniform_table(bits: int, signed: bool, alpha: np.float32) -> np.ndarray:
    """alpha * j / S in float32 (j / S first, as the quantizer's output formula reads)."""
    top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    j = np.arange(top + 1, dtype=np.float32)
    mags = alpha * (j / np.float32(top))
    if not signed:
        return mags
    return np.concatenate([-mags[::-1][:-1], mags])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_lcq_theta_zero_levels_are_uniform(bits, signed):
    alpha = np.float32(1.37)
    q = LCQQuantizer(bits, signed=signed)
    q.alpha.data.fill_(float(alpha))
    got = q.levels().numpy()
    assert got.shape == ((2**bits - 1),) if signed else (2**bits,)
    np.testing.assert_array_equal(got, uniform_table(bits, signed, alpha))


def uniform_quantize(x: np.ndarray, bits: int, signed: bool, alpha: np.float32) -> np.ndarray:
    top = np.float32(2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    if signed:
        v = np.minimum(np.abs(x) / alpha, np.float32(1))
        return alpha * (np.round(v * top) / top) * np.sign(x)
    v = np.clip(x / alpha, np.float32(0), np.float32(1))
    return alpha * (np.round(v * top) / top)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_lcq_theta_zero_forward_is_uniform(bits, signed):
    alpha = np.float32(0.9)
    x = heavy((4, 3, 5, 5), seed=bits)
    q = ready(LCQQuantizer(bits, signed=signed), signed)
    q.alpha.data.fill_(float(alpha))
    with torch.no_grad():
        got = q(x).numpy()
    expected = uniform_quantize(x.numpy(), bits, signed, alpha)
    assert expected.dtype == np.float32
    assert (np.abs(x.numpy()) > alpha).any()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("bits", BITS)
def test_lcq_theta_zero_normalized_weight_is_sigma_times_uniform(bits):
    w = heavy((6, 3, 3, 3), seed=20 + bits)
    alpha = np.float32(2.5)
    q = ready(LCQQuantizer(bits, is_weight=True, normalize=True))
    q.alpha.data.fill_(float(alpha))
    sigma = w.std()
    w_hat = ((w - w.mean()) / sigma).numpy()
    with torch.no_grad():
        got = q(w).numpy()
    expected = sigma.numpy() * uniform_quantize(w_hat, bits, True, alpha)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        q.levels(w).numpy(), sigma.numpy() * uniform_table(bits, True, alpha)
    )


# --------------------------------------------------------------------------- forward ⊂ levels

KINDS = [
    "lsq-w", "lsq-w-pc", "lsq-a-signed", "lsq-a-unsigned",
    "lcq-w-norm", "lcq-w", "lcq-a-signed", "lcq-a-unsigned",
    "asq-a-signed", "asq-a-unsigned",
    "pot-w", "pot-w-pc", "pot-w-norm", "post-w", "post-w-pc", "post-w-norm",
]
WEIGHT_KINDS = [k for k in KINDS if "-w" in k]


def build(kind: str, bits: int, seed: int = 0):
    """A quantizer initialised from data, with its range shrunk so some data lies beyond it."""
    torch.manual_seed(seed)
    is_weight = "-w" in kind
    x = heavy((6, 3, 3, 3) if is_weight else (4, 8, 5, 5), seed=seed + 7 * bits)
    signed = None if is_weight else kind.endswith("-signed")
    if kind.startswith("lsq"):
        q = LSQQuantizer(bits, signed=signed, is_weight=is_weight,
                         channels=6 if kind.endswith("-pc") else 0)
    elif kind.startswith("lcq"):
        q = LCQQuantizer(bits, signed=signed, is_weight=is_weight, normalize=kind.endswith("norm"))
    elif kind.startswith("asq"):
        q = ASQQuantizer(bits, channels=8, signed=signed)
    else:
        q = PowerQuantizer(bits, 1 if kind.startswith("pot") else 2,
                           channels=6 if kind.endswith("-pc") else 0,
                           normalize=kind.endswith("norm"))
    q.train()
    with torch.no_grad():
        q(x)
        assert bool(q.initialized)
        if kind.startswith("lcq"):
            q.theta.copy_(torch.randn(q.theta.shape, generator=torch.Generator().manual_seed(3)))
        domain = (x - x.mean()) / x.std() if kind.endswith("norm") else x
        rows = domain.abs().reshape(6, -1) if kind.endswith("-pc") else domain.abs().reshape(1, -1)
        reach = 0.6 * rows.max(dim=1).values  # the clip range: 60 % of the largest input
        if hasattr(q, "step"):
            q.step.copy_(reach / q.code_range[1])
        else:
            q.alpha.copy_(reach)
    q.eval()
    return q, x


def table_rows(q, kind: str, x: torch.Tensor) -> torch.Tensor:
    """Level table as [rows, L]: one row per tensor, per output channel or per sample (ASQ)."""
    if kind.startswith("asq"):
        lo, hi = q.code_range
        s_a = (q.step * q.beta(x)).detach()
        return s_a.view(-1, 1) * torch.arange(lo, hi + 1, dtype=torch.float32)
    table = q.levels(x) if kind == "lcq-w-norm" else q.levels()
    return table.view(-1, table.shape[-1]).detach()


def expected_table_size(kind: str, bits: int) -> int:
    if kind.startswith(("pot", "post")) or kind in ("lcq-w", "lcq-w-norm", "lcq-a-signed"):
        return 2**bits - 1
    return 2**bits


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_outputs_are_levels(kind, bits):
    q, x = build(kind, bits)
    with torch.no_grad():
        y = q(x)
        table = table_rows(q, kind, x)
    assert table.dtype == torch.float32
    assert table.shape[-1] == expected_table_size(kind, bits)
    assert torch.all(table[:, 1:] > table[:, :-1]), "levels must be strictly ascending"
    rows = y.reshape(table.shape[0], -1)
    for r, t in zip(rows, table, strict=True):
        assert torch.isin(r, t).all(), f"{kind} {bits}-bit produced values outside its levels"
    # the extremes are reached: the data goes beyond the clip range
    assert torch.isin(table[:, -1], y).any() or torch.isin(table[:, 0], y).any()
    assert torch.unique(y).numel() >= 3


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_encode_indexes_levels_to_reproduce_forward(kind, bits):
    q, w = build(kind, bits)
    with torch.no_grad():
        y = q(w)
        codes = q.encode(w)
        table = table_rows(q, kind, w)
    assert codes.dtype == torch.int64 and codes.shape == w.shape
    assert int(codes.min()) >= 0 and int(codes.max()) < table.shape[-1]
    if table.shape[0] == 1:
        rebuilt = table[0][codes]
    else:
        rebuilt = torch.gather(table, 1, codes.reshape(table.shape[0], -1)).view_as(w)
    assert torch.equal(rebuilt, y)


# --------------------------------------------------------------------------- ASQ == LSQ at beta 1


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_asq_quantize_with_beta_one_equals_lsq(bits, signed):
    x = heavy((3, 8, 4, 4), seed=bits, scale=2.0)
    step = torch.tensor([0.21])
    lsq = ready(LSQQuantizer(bits, signed=signed), signed)
    lsq.step.data.copy_(step)
    asq = ready(ASQQuantizer(bits, channels=8, signed=signed), signed)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y_lsq = lsq(x1)
    y_asq = asq.quantize_with(x2, step, torch.ones(3))
    assert torch.equal(y_asq, y_lsq)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y_lsq.backward(g)
    y_asq.backward(g)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("channels", [4, 16], ids=["small-adapter", "mlp-adapter"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asq_with_unit_beta_adapter_equals_lsq(bits, signed, channels):
    torch.manual_seed(0)
    x = heavy((3, channels, 4, 4), seed=bits, scale=2.0)
    asq = ready(ASQQuantizer(bits, channels=channels, signed=signed), signed)
    set_adapter_to_one(asq)
    asq.step.data.fill_(0.17)
    lsq = ready(LSQQuantizer(bits, signed=signed), signed)
    lsq.step.data.fill_(0.17)
    assert torch.equal(asq.beta(x), torch.ones(3))
    y_asq, y_lsq = asq(x), lsq(x)
    assert torch.equal(y_asq, y_lsq)
    assert torch.isin(y_asq, asq.levels()).all()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y_asq.backward(g)
    y_lsq.backward(g)
    torch.testing.assert_close(asq.step.grad, lsq.step.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- round half to even


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_lsq_and_asq_ties_round_to_even(bits, signed):
    s = 0.375  # (k + 0.5) * s and its quotient by s are exact in float32
    lo, hi = bounds(bits, signed)
    ks = list(range(lo, hi))
    xs = np.array([(k + 0.5) * s for k in ks], np.float64)
    assert np.array_equal(xs.astype(np.float32).astype(np.float64), xs)
    x = torch.from_numpy(xs.astype(np.float32))
    codes = np.array([even_of(k) for k in ks], np.float64)
    expected = torch.from_numpy((codes * s).astype(np.float32))

    lsq = ready(LSQQuantizer(bits, signed=signed, is_weight=False), signed)
    lsq.step.data.fill_(s)
    with torch.no_grad():
        assert torch.equal(lsq(x), expected)
        assert torch.equal(lsq.encode(x), torch.from_numpy(codes).long() - lo)

    asq = ready(ASQQuantizer(bits, channels=4, signed=signed), signed)
    set_adapter_to_one(asq)
    asq.step.data.fill_(s)
    with torch.no_grad():
        got = asq(x.view(-1, 1).expand(-1, 4).contiguous())
    assert torch.equal(got[:, 0], expected)


@pytest.mark.parametrize("bits", BITS)
def test_pot_ties_round_to_even_code(bits):
    table = power_table(bits, 1)
    m = 2 ** (bits - 1) - 1
    mags = table[m:].astype(np.float64)  # code 0..M
    mids = (mags[:-1] + mags[1:]) / 2
    assert np.array_equal(mids.astype(np.float32).astype(np.float64), mids)  # exact ties
    q = ready(PowerQuantizer(bits, 1))
    w = torch.from_numpy(np.concatenate([mids, -mids]).astype(np.float32))
    codes = np.array([even_of(c) for c in range(m)])
    expected = np.concatenate([mags[codes], -mags[codes]]).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(q(w).numpy(), expected)
        np.testing.assert_array_equal(q.encode(w).numpy(), np.concatenate([codes, -codes]) + m)


@pytest.mark.parametrize("root", [1, 2], ids=["pot", "post"])
@pytest.mark.parametrize("bits", BITS)
def test_power_picks_the_nearest_level(bits, root):
    """Away from ties, each |w| / alpha maps to the nearest magnitude (brute force, float64)."""
    alpha = np.float32(0.8)
    w = heavy((2000,), seed=bits + root)
    q = ready(PowerQuantizer(bits, root))
    q.alpha.data.fill_(float(alpha))
    mags = power_table(bits, root)[2 ** (bits - 1) - 1:].astype(np.float64)
    v = np.minimum(np.abs(w.numpy()).astype(np.float64) / np.float64(alpha), 1.0)
    dist = np.abs(v[:, None] - mags[None, :])
    nearest = dist.argmin(axis=1)
    clear = np.sort(dist, axis=1)[:, 1] - np.sort(dist, axis=1)[:, 0] > 1e-5
    expected = (alpha * mags[nearest].astype(np.float32)) * np.sign(w.numpy())
    with torch.no_grad():
        got = q(w).numpy()
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], expected[clear])


@pytest.mark.parametrize("signed", [True, False])
def test_lcq_theta_zero_ties_round_to_even(signed):
    checked = 0
    for bits in BITS:
        top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        js = [j for j in range(top)
              if np.float32((j + 0.5) / top) * np.float32(top) == np.float32(j + 0.5)]
        x = torch.from_numpy(np.array([(j + 0.5) / top for j in js], np.float32))
        q = ready(LCQQuantizer(bits, signed=signed), signed)  # alpha = 1, theta = 0
        expected = np.array([even_of(j) for j in js], np.float32) / np.float32(top)
        with torch.no_grad():
            np.testing.assert_array_equal(q(x).numpy(), expected)
        checked += len(js)
    assert checked > 100


# --------------------------------------------------------------------------- gradients


def lsq_closed_form(x: np.ndarray, s: float, lo: int, hi: int):
    """Per-element dy/dx and (unscaled) dy/ds from docs/quantizers.md, inside = lo <= x/s <= hi."""
    z = (x / np.float32(s)).astype(np.float64)
    inside = (z >= lo) & (z <= hi)
    dx = inside.astype(np.float64)
    ds = np.where(inside, np.round(z) - z, np.where(z < lo, lo, hi))
    return dx, ds


def in_half_step_band(z: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """x / s within half a step beyond the clip range: clipped, but rounds onto lo / hi."""
    return ((z > hi) & (z <= hi + 0.5)) | ((z < lo) & (z >= lo - 0.5))


def clear_of_band(x: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Move the elements inside the half-step band to well inside the range."""
    z = x / s
    return torch.where(in_half_step_band(z, lo, hi), s * (lo + hi) / 2 + 0.3 * s, x)


def spread(shape, s, lo, hi, seed) -> torch.Tensor:
    """x / s uniform over [lo - 3, hi + 3]: inside and beyond the clip range on both sides."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * (hi - lo + 6) + lo - 3) * s


LSQ_GRAD_CASES = ["weight", "weight-per-channel", "act-signed", "act-unsigned"]


def lsq_grad_setup(case: str, bits: int, band: bool):
    if case.startswith("weight"):
        shape, signed, n = (5, 4, 3, 3), True, 5 * 4 * 3 * 3
    else:
        shape, signed, n = (4, 6, 3, 3), case == "act-signed", 6 * 3 * 3
    lo, hi = bounds(bits, signed)
    channels = 5 if case == "weight-per-channel" else 0
    steps = torch.tensor([0.3, 0.11, 0.7, 0.05, 1.9][: channels or 1])
    view = steps.view(-1, 1, 1, 1) if channels else steps
    x = spread(shape, view, lo, hi, seed=bits)
    if band:  # only the half step beyond the range on either side
        g = torch.Generator().manual_seed(bits)
        frac = torch.rand(shape, generator=g) * 0.45 + 0.02
        x = torch.where(torch.rand(shape, generator=g) < 0.5, hi + frac, lo - frac) * view
    else:
        x = clear_of_band(x, view, lo, hi)
    q = ready(LSQQuantizer(bits, signed=signed, is_weight=case.startswith("weight"),
                           channels=channels), signed)
    q.step.data.copy_(steps)
    return q, x, view, lo, hi, n


def check_lsq_grads(case: str, bits: int, band: bool) -> None:
    q, x, view, lo, hi, n = lsq_grad_setup(case, bits, band)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    xr = x.clone().requires_grad_(True)
    q(xr).backward(g)
    dx, ds = lsq_closed_form(x.numpy(), view.numpy(), lo, hi)
    gn = g.numpy().astype(np.float64)
    scale = 1.0 / math.sqrt(n * hi)
    terms = (gn * ds).reshape(view.numel(), -1) * scale
    np.testing.assert_allclose(xr.grad.numpy(), gn * dx, rtol=1e-5, atol=1e-6)
    sum_close(q.step.grad.numpy(), terms.sum(axis=1), np.abs(terms).sum(axis=1))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", LSQ_GRAD_CASES)
def test_lsq_gradients_match_closed_form(case, bits):
    check_lsq_grads(case, bits, band=False)



@pytest.mark.parametrize("case", ["weight", "act-signed"])
def test_lsq_gradients_zero_just_beyond_clip_range(case):
    check_lsq_grads(case, 4, band=True)


LCQ_GRAD_CASES = ["weight", "act-signed", "act-unsigned"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("case", LCQ_GRAD_CASES)
def test_lcq_gradients_match_closed_form(case, bits):
    alpha = 1.3
    signed = case != "act-unsigned"
    if case == "weight":
        shape, n = (5, 4, 3, 3), 5 * 4 * 3 * 3
        q = LCQQuantizer(bits, is_weight=True, normalize=False)
    else:
        shape, n = (4, 6, 3, 3), 6 * 3 * 3
        q = LCQQuantizer(bits, signed=signed)
    ready(q, signed)
    theta = torch.randn(16, generator=torch.Generator().manual_seed(bits)) * 0.8
    q.theta.data.copy_(theta)
    q.alpha.data.fill_(alpha)
    gen = torch.Generator().manual_seed(10 + bits)
    x = (torch.rand(shape, generator=gen) * 2 - 1) * 2 * alpha  # |x| up to 2 alpha
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.01), x)
    top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    v_all = np.clip((np.abs(x.numpy()) if signed else x.numpy()).astype(np.float64) / alpha, 0, 1)
    ambiguous = torch.from_numpy(near_tie(np_compand(theta.numpy(), v_all, top)[1]))
    x = torch.where(ambiguous, torch.full_like(x, 1.5 * alpha), x)
    xr = x.clone().requires_grad_(True)
    g = torch.randn(shape, generator=gen)
    q(xr).backward(g)

    xn, gn = x.numpy().astype(np.float64), g.numpy().astype(np.float64)
    if signed:
        v = np.abs(xn) / alpha
        inside = v <= 1
        sgn = np.sign(xn)
    else:
        v = xn / alpha
        inside = (v >= 0) & (v <= 1)
        sgn = (xn > 0).astype(np.float64)  # below the range: 0, above: +1
    qv = np_compand(theta.numpy(), np.clip(v, 0, 1), top)[0]
    terms = gn * np.where(inside, sgn * (qv - v), sgn) * math.sqrt(top / n)
    np.testing.assert_allclose(xr.grad.numpy(), gn * inside, rtol=1e-5, atol=1e-6)
    sum_close(q.alpha.grad.numpy(), [terms.sum()], np.abs(terms).sum())
    assert q.theta.grad is not None and torch.isfinite(q.theta.grad).all()
    assert q.theta.grad.abs().sum() > 0


@pytest.mark.parametrize("channels", [0, 5], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("root", [1, 2], ids=["pot", "post"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_power_gradients_match_closed_form(bits, root, channels):
    shape = (5, 4, 3, 3)
    n, m = 5 * 4 * 3 * 3, 2 ** (bits - 1) - 1
    alphas = torch.tensor([0.8, 0.3, 1.1, 0.5, 0.9][: channels or 1])
    view = alphas.view(-1, 1, 1, 1) if channels else alphas
    q = ready(PowerQuantizer(bits, root, channels=channels))
    q.alpha.data.copy_(alphas)
    gen = torch.Generator().manual_seed(bits * 10 + root)
    w = (torch.rand(shape, generator=gen) * 2 - 1) * 1.6 * view
    w = torch.where(w.abs() < 1e-4, torch.full_like(w, 1e-2), w)
    mags = power_table(bits, root)[m:].astype(np.float64)
    v_all = np.minimum(np.abs(w.numpy()).astype(np.float64) / view.numpy(), 1)
    gaps = np.sort(np.abs(v_all[..., None] - mags), axis=-1)
    w = torch.where(torch.from_numpy(gaps[..., 1] - gaps[..., 0] < 1e-5), 1.5 * view, w)
    wr = w.clone().requires_grad_(True)
    g = torch.randn(shape, generator=gen)
    q(wr).backward(g)

    a = np.broadcast_to(view.numpy().astype(np.float64), shape)
    v_raw = np.abs(w.numpy().astype(np.float64)) / a
    inside = v_raw <= 1
    v = np.minimum(v_raw, 1)
    nearest = mags[np.abs(v[..., None] - mags).argmin(axis=-1)]
    sgn, gn = np.sign(w.numpy()), g.numpy().astype(np.float64)
    terms = (gn * np.where(inside, sgn * (nearest - v), sgn) / math.sqrt(n * m))
    terms = terms.reshape(alphas.numel(), -1)
    np.testing.assert_allclose(wr.grad.numpy(), gn * inside, rtol=1e-5, atol=1e-6)
    sum_close(q.alpha.grad.numpy(), terms.sum(axis=1), np.abs(terms).sum(axis=1))


def asq_data(bits: int, signed: bool, s_a: torch.Tensor, band: bool) -> torch.Tensor:
    lo, hi = bounds(bits, signed)
    view = s_a.view(-1, 1, 1, 1)
    x = spread((s_a.numel(), 8, 3, 3), view, lo, hi, seed=bits)
    if band:
        g = torch.Generator().manual_seed(bits)
        frac = torch.rand(x.shape, generator=g) * 0.45 + 0.02
        return torch.where(torch.rand(x.shape, generator=g) < 0.5, hi + frac, lo - frac) * view
    return clear_of_band(x, view, lo, hi)


def lsq_step_grad_per_sample(x, s_a, g, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """G_b, the (unscaled) LSQ step gradient of sample b at its step s_a[b]; and sum |terms|."""
    out, mag = [], []
    for b in range(x.shape[0]):
        _, ds = lsq_closed_form(x[b].numpy(), s_a[b].numpy(), lo, hi)
        terms = g[b].numpy().astype(np.float64) * ds
        out.append(terms.sum())
        mag.append(np.abs(terms).sum())
    return np.array(out), np.array(mag)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asq_quantize_with_gradients(bits, signed):
    lo, hi = bounds(bits, signed)
    q = ready(ASQQuantizer(bits, channels=8, signed=signed), signed)
    step = torch.tensor([0.23], requires_grad=True)
    beta = torch.tensor([0.7, 1.0, 1.4], requires_grad=True)
    s_a = (step * beta).detach()
    x = asq_data(bits, signed, s_a, band=False)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    q.quantize_with(x, step, beta).backward(g)
    big_g, mag = lsq_step_grad_per_sample(x, s_a, g, lo, hi)
    sum_close(beta.grad.numpy(), 0.23 * big_g, 0.23 * mag)
    b64 = beta.detach().numpy().astype(np.float64)
    sum_close(step.grad.numpy(), [(b64 * big_g).sum()], (b64 * mag).sum())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asq_forward_gradients(bits, signed):
    """Through the adapter: ds = gradscale * sum_b beta_b G_b, dbeta_b = s G_b."""
    torch.manual_seed(bits)
    lo, hi = bounds(bits, signed)
    q = ready(ASQQuantizer(bits, channels=8, signed=signed), signed)
    q.step.data.fill_(0.23)
    x = spread((3, 8, 3, 3), 0.23, lo, hi, seed=bits)
    for _ in range(10):  # beta depends on x: move elements out of the band until stable
        with torch.no_grad():
            s_a = (q.step * q.beta(x)).view(-1, 1, 1, 1)
        moved = clear_of_band(x, s_a, lo, hi)
        if torch.equal(moved, x):
            break
        x = moved
    with torch.no_grad():
        beta = q.beta(x)
        s_a = q.step * beta
        assert not in_half_step_band(x / s_a.view(-1, 1, 1, 1), lo, hi).any()
        pre = q.adapter.net[:-1](x.mean(dim=(2, 3)))
        assert (pre > 0).all()  # ReLU and the beta floor pass the gradient
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    q(x).backward(g)
    n = 8 * 3 * 3
    big_g, mag = lsq_step_grad_per_sample(x, s_a, g, lo, hi)
    b64 = beta.numpy().astype(np.float64)
    scale = 1 / math.sqrt(n * hi)
    sum_close(q.step.grad.numpy(), [(b64 * big_g).sum() * scale], (b64 * mag).sum() * scale)
    last = q.adapter.net[-2]
    sum_close(last.bias.grad.numpy(), [0.23 * big_g.sum()], 0.23 * mag.sum())


def test_asq_gradients_just_beyond_clip_range():
    bits, signed = 4, True
    lo, hi = bounds(bits, signed)
    q = ready(ASQQuantizer(bits, channels=8, signed=signed), signed)
    step = torch.tensor([0.23], requires_grad=True)
    beta = torch.tensor([0.7, 1.0, 1.4], requires_grad=True)
    x = asq_data(bits, signed, (step * beta).detach(), band=True)
    xr = x.clone().requires_grad_(True)
    q.quantize_with(xr, step, beta).sum().backward()
    # every element is clipped: no input gradient, beta gets s * (lo or hi) per element
    assert torch.equal(xr.grad, torch.zeros_like(x))
    big_g = np.where(x.numpy() > 0, hi, lo).reshape(3, -1).sum(axis=1)
    np.testing.assert_allclose(beta.grad.numpy(), 0.23 * big_g, rtol=1e-5)


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("bits", BITS)
def test_lsq_init_from_first_batch(bits):
    x = heavy((4, 6, 5, 5), seed=bits)
    xn = x.numpy().astype(np.float64)
    mean_abs = np.abs(xn).mean()
    # activations, sign auto-detected (the batch has negatives -> signed, Qp = 2^(b-1) - 1)
    q = LSQQuantizer(bits)
    q.train()
    q(x)
    assert q.signed and bool(q.initialized)
    np.testing.assert_allclose(q.step.item(), 2 * mean_abs / math.sqrt(2 ** (bits - 1) - 1),
                               rtol=1e-5)
    # unsigned activations: Qp = 2^b - 1
    q = LSQQuantizer(bits, signed=False)
    q.train()
    q(x)
    assert not q.signed
    np.testing.assert_allclose(q.step.item(), 2 * mean_abs / math.sqrt(2**bits - 1), rtol=1e-5)
    # weights per output channel
    w = heavy((6, 3, 3, 3), seed=50 + bits)
    q = LSQQuantizer(bits, is_weight=True, channels=6)
    q.train()
    q(w)
    per_channel = np.abs(w.numpy().astype(np.float64)).reshape(6, -1).mean(axis=1)
    np.testing.assert_allclose(q.step.detach().numpy(),
                               2 * per_channel / math.sqrt(2 ** (bits - 1) - 1), rtol=1e-5)
    # ASQ: same rule for its base step
    q = ASQQuantizer(bits, channels=6)
    q.train()
    q(x)
    np.testing.assert_allclose(q.step.item(), 2 * mean_abs / math.sqrt(2 ** (bits - 1) - 1),
                               rtol=1e-5)


def test_init_happens_once():
    x = heavy((4, 6, 5, 5), seed=1)
    q = LSQQuantizer(4)
    q.train()
    q(x)
    step = q.step.detach().clone()
    q(x * 10)
    assert torch.equal(q.step.detach(), step)


ACT_FACTORIES = {
    "lsq": lambda: LSQQuantizer(4),
    "lcq": lambda: LCQQuantizer(4),
    "asq": lambda: ASQQuantizer(4, channels=6),
}


@pytest.mark.parametrize("kind", list(ACT_FACTORIES))
def test_sign_auto_detected_from_first_batch(kind):
    torch.manual_seed(0)
    x = heavy((4, 6, 5, 5), seed=2)
    assert (x < 0).any()
    q = ACT_FACTORIES[kind]()
    q.train()
    q(x)
    assert q.signed
    assert q.levels().min() < 0
    with torch.no_grad():
        assert (q(x) < 0).any()

    q = ACT_FACTORIES[kind]()
    q.train()
    q(x.abs())  # all non-negative first batch -> unsigned, and it stays so
    assert not q.signed
    assert q.levels().min() == 0
    assert q.levels().numel() == 16
    with torch.no_grad():
        y = q(x)
    assert not q.signed
    assert (y >= 0).all()
    assert torch.equal(y[x < 0], torch.zeros_like(y[x < 0]))


def test_explicit_sign_is_not_overridden():
    x = heavy((4, 6, 5, 5), seed=3)
    q = LSQQuantizer(4, signed=False)
    q.train()
    q(x)
    assert not q.signed
    q = LSQQuantizer(4, signed=True)
    q.train()
    q(x.abs())
    assert q.signed


ALL_FACTORIES = {
    **ACT_FACTORIES,
    "lsq-w": lambda: LSQQuantizer(4, is_weight=True),
    "lcq-w": lambda: LCQQuantizer(4, is_weight=True, normalize=True),
    "pot-w": lambda: PowerQuantizer(4, 1),
    "post-w": lambda: PowerQuantizer(4, 2, channels=6),
}


@pytest.mark.parametrize("kind", list(ALL_FACTORIES))
def test_uninitialised_quantizer_in_eval_mode_raises(kind):
    q = ALL_FACTORIES[kind]()
    q.eval()
    with pytest.raises(RuntimeError, match="initialis"):
        q(heavy((6, 6, 3, 3), seed=0))
    assert not bool(q.initialized)
    q.train()
    q(heavy((6, 6, 3, 3), seed=0))
    q.eval()
    q(heavy((6, 6, 3, 3), seed=1))  # now fine


# --------------------------------------------------------------------------- bit range

BIT_FACTORIES = {
    "lsq": lambda b: LSQQuantizer(b),
    "lsq-w": lambda b: LSQQuantizer(b, is_weight=True, channels=3),
    "lcq": lambda b: LCQQuantizer(b, is_weight=True),
    "asq": lambda b: ASQQuantizer(b, channels=8),
    "pot": lambda b: PowerQuantizer(b, 1),
    "post": lambda b: PowerQuantizer(b, 2),
    "spec": lambda b: QuantSpec("lsq", b),
}


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 16])
@pytest.mark.parametrize("kind", list(BIT_FACTORIES))
def test_bits_outside_range_raise(kind, bits):
    with pytest.raises(ValueError, match=str(bits)):
        BIT_FACTORIES[kind](bits)


@pytest.mark.parametrize("kind", list(BIT_FACTORIES))
def test_bits_inside_range_accepted(kind):
    for bits in BITS:
        BIT_FACTORIES[kind](bits)


@pytest.mark.parametrize("shape, axis, pooled_dims", [
    ((3, 8), 1, ()), ((3, 8), -1, ()),
    ((3, 8, 5), 1, (2,)), ((3, 8, 5, 4), 1, (2, 3)),  # convolution inputs: C is dim 1
    ((3, 5, 8), -1, (1,)), ((3, 2, 5, 8), -1, (1, 2)),  # linear inputs: C is the last dim
])
def test_step_adapter_pools_every_axis_but_batch_and_features(shape, axis, pooled_dims):
    torch.manual_seed(0)
    adapter = StepAdapter(8, feature_axis=axis)
    x = torch.randn(shape)
    features = x.mean(dim=pooled_dims) if pooled_dims else x
    assert features.shape == (3, 8)
    with torch.no_grad():
        assert torch.equal(adapter(x), adapter.net(features).clamp_min(1e-8).reshape(-1))


def test_asq_on_a_token_sequence_has_one_step_per_sample():
    torch.manual_seed(0)
    q = ASQQuantizer(4, 8, feature_axis=-1).train()
    x = torch.randn(3, 5, 8)
    y = q(x)
    s_a = (q.step * q.beta(x)).detach()
    assert s_a.shape == (3,)
    for n in range(3):  # each sample on its own grid of step s_a[n]
        codes = y[n].detach() / s_a[n]
        assert torch.allclose(codes, codes.round(), atol=1e-4)


def test_step_adapter_rejects_other_feature_axes():
    with pytest.raises(ValueError, match="feature_axis"):
        StepAdapter(8, feature_axis=2)
