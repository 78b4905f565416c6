"""quantize_model: which quantizer lands where, on the example nets and on user modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qconvert.archs import ARCHITECTURES
from qconvert.quant import (
    SCHEMES,
    ASQQuantizer,
    LCQQuantizer,
    LSQQuantizer,
    PowerQuantizer,
    QConv2d,
    QLinear,
    Quantizer,
    quantize_model,
)

ARCH_INPUTS = {"digits_cnn": 8, "resnet20": 16, "mobilenetv2_small": 16}


# What the scheme table means, written out independently: (weight class, root, act class).
EXPECTED = {
    "lsq": (LSQQuantizer, None, LSQQuantizer),
    "lcq": (LCQQuantizer, None, LCQQuantizer),
    "asq-lsq": (LSQQuantizer, None, ASQQuantizer),
    "asq-post": (PowerQuantizer, 2, ASQQuantizer),
    "pot": (PowerQuantizer, 1, LSQQuantizer),
    "post": (PowerQuantizer, 2, LSQQuantizer),
}


def test_scheme_table_is_the_documented_one():
    assert set(SCHEMES) == set(EXPECTED)


def float_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d / Linear layers of a model, skipping the ones inside quantizers (ASQ adapters)."""
    inside_quantizers = {
        id(sub) for m in model.modules() if isinstance(m, Quantizer) for sub in m.modules()
    }
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and id(m) not in inside_quantizers}


def check_layer(layer, weight_cls, root, act_cls, w_bits, a_bits) -> None:
    assert isinstance(layer.weight_quant, weight_cls)
    assert isinstance(layer.act_quant, act_cls)
    assert layer.weight_quant.bits == w_bits
    assert layer.act_quant.bits == a_bits
    assert layer.weight_quant.is_weight and not layer.act_quant.is_weight
    if root is not None:
        assert layer.weight_quant.root == root


def all_quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


@pytest.mark.parametrize("scheme", list(EXPECTED))
@pytest.mark.parametrize("arch", list(ARCH_INPUTS))
def test_quantize_example_architectures(arch, scheme):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch](in_channels=1)
    reference = copy.deepcopy(model)
    originals = float_layers(reference)
    assert len(originals) >= 4

    assert quantize_model(model, scheme, weight_bits=4, act_bits=3) is model
    replaced = float_layers(model)
    assert list(replaced) == list(originals)  # same names, same order
    for name, layer in replaced.items():
        kind = QConv2d if isinstance(originals[name], nn.Conv2d) else QLinear
        assert type(layer) is kind, name
        assert torch.equal(layer.weight, originals[name].weight)
        if isinstance(layer, QConv2d):
            for attr in ("stride", "padding", "dilation", "groups", "kernel_size"):
                assert getattr(layer, attr) == getattr(originals[name], attr)

    names = list(replaced)
    first, last = replaced[names[0]], replaced[names[-1]]
    assert isinstance(first, QConv2d) and isinstance(last, QLinear)
    check_layer(first, LSQQuantizer, None, LSQQuantizer, 8, 8)
    check_layer(last, LSQQuantizer, None, LSQQuantizer, 8, 8)
    assert first.act_quant.signed
    weight_cls, root, act_cls = EXPECTED[scheme]
    for name in names[1:-1]:
        check_layer(replaced[name], weight_cls, root, act_cls, 4, 3)
    assert model.qconvert_scheme == scheme
    assert set(model.qconvert_specs) == set(names)

    size = ARCH_INPUTS[arch]
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(1))  # >= 0
    model.train()
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert all(bool(q.initialized) for q in all_quantizers(model))
    assert first.act_quant.signed  # stays signed although the images are non-negative
    out.square().mean().backward()
    for name, layer in replaced.items():
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all(), name
        assert layer.weight.grad.abs().sum() > 0, name
    for q in all_quantizers(model):
        for p in q.parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all()
        main = q.step if hasattr(q, "step") else q.alpha
        assert main.grad is not None
    if act_cls is ASQQuantizer:
        asq = replaced[names[1]].act_quant
        assert all(p.grad is not None for p in asq.adapter.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


class UserNet(nn.Module):
    """Depthwise (groups = C), dilation, stride, bias, and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=True)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.dw2 = nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16)
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 5))

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.act(self.dw(x))
        x = self.act(self.pw(x))
        return self.head(self.act(self.dw2(x)))


@pytest.mark.parametrize("scheme", list(EXPECTED))
def test_user_module_with_depthwise_dilation_stride_bias(scheme):
    torch.manual_seed(0)
    model = UserNet()
    reference = copy.deepcopy(model)
    quantize_model(model, scheme, weight_bits=4, act_bits=4)
    for name, ref in float_layers(reference).items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QConv2d | QLinear), name
        assert (layer.bias is None) == (ref.bias is None)
        if ref.bias is not None:
            assert torch.equal(layer.bias, ref.bias)
        if isinstance(ref, nn.Conv2d):
            assert (layer.stride, layer.padding, layer.dilation, layer.groups) == (
                ref.stride, ref.padding, ref.dilation, ref.groups)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    model.train()
    out = model(x)
    assert out.shape == (3, 5)
    out.sum().backward()
    assert model.dw.weight.grad is not None and model.dw.bias.grad is not None
    assert model.head[1].weight.grad is not None


def test_eight_bit_lsq_is_close_to_float():
    """At 8 bits everywhere the quantized net tracks the float one (an end-to-end sanity check)."""
    torch.manual_seed(0)
    model = UserNet()
    reference = copy.deepcopy(model).eval()
    quantize_model(model, "lsq", weight_bits=8, act_bits=8)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        got, want = model(x), reference(x)
    rel = (got - want).norm() / want.norm()
    assert rel < 0.15, rel  # LSQ's init (2 mean|w| / sqrt(Qp)) is coarse even at 8 bits
    # and 2-bit is clearly coarser than 8-bit: the check can tell them apart
    coarse = quantize_model(copy.deepcopy(reference), "lsq", weight_bits=2, act_bits=2,
                            first_last_bits=2)
    coarse.train()
    coarse(x)
    coarse.eval()
    with torch.no_grad():
        assert ((coarse(x) - want).norm() / want.norm()) > 2 * rel


def test_overrides_bits_kind_and_float():
    torch.manual_seed(0)
    model = ARCHITECTURES["digits_cnn"](in_channels=1)
    head = copy.deepcopy(model.classifier)
    names = list(float_layers(model))
    assert names == ["features.0", "features.3", "features.7", "classifier"]
    quantize_model(model, "asq-post", weight_bits=4, act_bits=4, overrides={
        "features.0": {"weight": {"bits": 6}},
        "features.3": {"weight": {"bits": 2}},
        "features.7": {"weight": {"kind": "lsq", "per_channel": True}, "act": {"kind": "lcq",
                                                                             "bits": 3}},
        "classifier": None,
    })
    first = model.features[0]
    check_layer(first, LSQQuantizer, None, LSQQuantizer, 6, 8)
    assert first.act_quant.signed
    check_layer(model.features[3], PowerQuantizer, 2, ASQQuantizer, 2, 4)
    check_layer(model.features[7], LSQQuantizer, None, LCQQuantizer, 4, 3)
    assert model.features[7].weight_quant.step.numel() == model.features[7].out_channels
    assert type(model.classifier) is nn.Linear
    assert torch.equal(model.classifier.weight, head.weight)
    assert model.qconvert_specs["classifier"] is None
    assert model.qconvert_specs["features.3"].weight.bits == 2
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model.train()
    model(x).sum().backward()


def test_per_channel_option():
    model = ARCHITECTURES["digits_cnn"](in_channels=1)
    quantize_model(model, "pot", per_channel=True)
    for layer in float_layers(model).values():
        out = layer.out_channels if isinstance(layer, QConv2d) else layer.out_features
        param = layer.weight_quant.step if hasattr(layer.weight_quant, "step") \
            else layer.weight_quant.alpha
        assert param.numel() == out
    with pytest.raises(ValueError, match="per"):
        quantize_model(ARCHITECTURES["digits_cnn"](in_channels=1), "lcq", per_channel=True)


def test_first_last_bits_none_treats_them_like_the_others():
    model = ARCHITECTURES["digits_cnn"](in_channels=1)
    quantize_model(model, "post", weight_bits=3, act_bits=3, first_last_bits=None)
    for layer in float_layers(model).values():
        check_layer(layer, PowerQuantizer, 2, LSQQuantizer, 3, 3)


def unchanged(model: nn.Module) -> bool:
    return not any(isinstance(m, Quantizer) for m in model.modules())


def test_unknown_override_name_raises_and_leaves_model_alone():
    model = ARCHITECTURES["digits_cnn"](in_channels=1)
    with pytest.raises(ValueError, match="features.99"):
        quantize_model(model, "lsq", overrides={"features.99": None, "classifier": None})
    assert unchanged(model)
    with pytest.raises(ValueError, match="nonexistent_layer"):
        quantize_model(model, "lsq", overrides={"nonexistent_layer": {"weight": {"bits": 2}}})
    assert unchanged(model)


def test_unknown_scheme_raises_with_its_name():
    model = ARCHITECTURES["digits_cnn"](in_channels=1)
    with pytest.raises(ValueError, match="apot-lsq"):
        quantize_model(model, "apot-lsq")
    assert unchanged(model)


@pytest.mark.parametrize(("override", "needle"), [
    ({"weight": {"kind": "bogus-w"}}, "bogus-w"),
    ({"act": {"kind": "bogus-a"}}, "bogus-a"),
    ({"weights": {"bits": 2}}, "weights"),
    ({"weight": {"bits": 9}}, "9"),
    ({"act": {"bits": 1}}, "1"),
])
def test_bad_override_contents_raise(override, needle):
    model = ARCHITECTURES["digits_cnn"](in_channels=1)
    with pytest.raises(ValueError, match=needle):
        quantize_model(model, "lsq", overrides={"features.3": override})


@pytest.mark.parametrize("bits", [1, 9])
def test_scheme_bits_out_of_range_raise(bits):
    with pytest.raises(ValueError, match=str(bits)):
        quantize_model(ARCHITECTURES["digits_cnn"](in_channels=1), "lsq", weight_bits=bits)
    with pytest.raises(ValueError, match=str(bits)):
        quantize_model(ARCHITECTURES["digits_cnn"](in_channels=1), "lsq", act_bits=bits)


# --------------------------------------------------------------------------- layer arithmetic


def lsq_reference(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """s * clamp(round(x / s), lo, hi), written out (per output channel if step has C entries)."""
    s = step.detach().view(-1, *([1] * (x.dim() - 1))) if step.numel() > 1 else step.detach()
    return s * torch.clamp(torch.round(x / s), lo, hi)


CONV_CASES = [
    # (cin, cout, kernel, stride, padding, dilation, groups, bias)
    (4, 8, 3, 1, 0, 1, 1, False),
    (4, 8, 3, 2, 1, 1, 1, True),
    (4, 8, 3, 1, 2, 2, 1, True),
    (8, 8, 3, 1, 1, 1, 8, True),
    (8, 8, 5, 2, 4, 2, 8, False),
    (6, 9, 3, (2, 1), (1, 0), (1, 2), 3, True),
]


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_qconv2d_is_conv_of_quantized_input_and_weight(case, per_channel):
    cin, cout, k, stride, padding, dilation, groups, bias = case
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias)
    model = quantize_model(nn.Sequential(conv), "lsq", weight_bits=4, act_bits=3,
                           first_last_bits=None, per_channel=per_channel)
    layer = model[0]
    x = torch.randn(2, cin, 11, 10, generator=torch.Generator().manual_seed(1)) * 2
    model.train()
    model(x)  # init; x has negatives -> signed activations
    model.eval()
    with torch.no_grad():
        got = layer(x)
        qa = lsq_reference(x, layer.act_quant.step, -4, 3)
        qw = lsq_reference(layer.weight, layer.weight_quant.step, -8, 7)
        want = F.conv2d(qa, qw, layer.bias, stride, padding, dilation, groups)
        float_out = conv(x)
    assert layer.act_quant.signed
    assert got.shape == float_out.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, float_out, atol=1e-3)  # it really is quantized


@pytest.mark.parametrize("scheme", list(EXPECTED))
@pytest.mark.parametrize("case", CONV_CASES[2:], ids=[str(i) for i in range(2, len(CONV_CASES))])
def test_qconv2d_uses_its_quantizers_for_every_scheme(case, scheme):
    cin, cout, k, stride, padding, dilation, groups, bias = case
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias)
    layer = quantize_model(nn.Sequential(conv), scheme, first_last_bits=None)[0]
    x = torch.randn(2, cin, 9, 9, generator=torch.Generator().manual_seed(1))
    layer.train()
    layer(x)
    layer.eval()
    with torch.no_grad():
        want = F.conv2d(layer.act_quant(x), layer.weight_quant(layer.weight), layer.bias,
                        stride, padding, dilation, groups)
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_qlinear_is_linear_of_quantized_input_and_weight(bias):
    torch.manual_seed(0)
    lin = nn.Linear(12, 5, bias=bias)
    layer = quantize_model(nn.Sequential(lin), "lsq", weight_bits=3, act_bits=4,
                           first_last_bits=None)[0]
    assert isinstance(layer, QLinear)
    x = torch.rand(6, 12, generator=torch.Generator().manual_seed(2))  # >= 0: unsigned
    layer.train()
    layer(x)
    layer.eval()
    with torch.no_grad():
        got = layer(x)
        qa = lsq_reference(x, layer.act_quant.step, 0, 15)
        qw = lsq_reference(layer.weight, layer.weight_quant.step, -4, 3)
        want = F.linear(qa, qw, layer.bias)
    assert not layer.act_quant.signed
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- more layer kinds, attention


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One training-mode SGD step: initialises every quantizer that the forward pass runs."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    (out[0] if isinstance(out, tuple) else out).square().mean().backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("layer, x", [
    (nn.Conv1d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
     torch.randn(2, 4, 5, 5)),
    (nn.Linear(4, 6), torch.randn(2, 7, 4)),
], ids=["conv1d", "conv_transpose2d", "linear_on_tokens"])
def test_new_layer_kinds_compute_the_float_op_on_quantized_input_and_weight(layer, x):
    """Under lcq W4A4 these layers were left float before (with first/last layers off)."""
    model = nn.Sequential(copy.deepcopy(layer))
    quantize_model(model, "lcq", 4, 4, first_last_bits=None)
    q = model[0]
    assert type(q).__name__ == "Q" + type(layer).__name__
    _train_step(model, x)
    with torch.no_grad():
        reference = copy.deepcopy(layer)
        reference.weight.copy_(q.weight_quant(q.weight))
        reference.bias.copy_(q.bias)
        want = reference(q.act_quant(x))
        assert torch.equal(model(x), want)
        assert not torch.equal(q.act_quant(x), x)  # the input really was quantized
    assert q.weight_quant.bits == 4 and q.act_quant.bits == 4


class _Attention(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_projections_are_quantized_and_their_quantizers_run(batch_first):
    torch.manual_seed(0)
    model = _Attention(batch_first)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    with torch.no_grad():
        float_out = model(x)
    quantize_model(model, "lcq", 4, 4, first_last_bits=None)
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    for name in projections:
        assert isinstance(model.attn.get_submodule(name), QLinear), name
    _train_step(model, x)
    for name in projections:
        layer = model.attn.get_submodule(name)
        assert bool(layer.act_quant.initialized) and bool(layer.weight_quant.initialized), name
    with torch.no_grad():
        out = model(x)
    assert not torch.allclose(out, float_out, atol=1e-6)  # the quantizers change the result


def _attention_reference(attn, x: torch.Tensor) -> torch.Tensor:
    """Batch-first multi-head self-attention written out from its definition."""
    n, t, e = x.shape
    heads = attn.num_heads

    def split(y):
        return y.reshape(n, t, heads, e // heads).permute(0, 2, 1, 3)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (e // heads) ** 0.5, dim=-1)
    return attn.out_proj((weights @ v).permute(0, 2, 1, 3).reshape(n, t, e))


def test_split_attention_computes_multihead_attention():
    torch.manual_seed(0)
    model = _Attention()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        want = model(x)
        quantize_model(model, "lcq", 4, 4, overrides={n: None for n in (
            "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head")})
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.attn(x, x, x)[0], _attention_reference(model.attn, x),
                                   rtol=1e-5, atol=1e-6)


def test_transformer_fast_path_does_not_bypass_the_quantizers():
    """In eval mode under no_grad, nn.TransformerEncoderLayer runs a fused kernel that reads
    the projection and feed-forward weights directly; the quantized model must not."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    x = torch.randn(3, 5, 16)
    quantize_model(model, "lcq", 4, 4, first_last_bits=None)
    _train_step(model, x)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[:, -1] = True
    for kwargs in ({}, {"src_key_padding_mask": padding}):
        with torch.no_grad():
            fast = model(x, **kwargs)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():
                slow = model(x, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        assert not fast.is_nested
        assert torch.equal(fast, slow), kwargs


def test_asq_on_token_inputs_pools_over_the_tokens():
    """ASQ on a Linear fed [N, T, C] crashed in training (the adapter pooled dim 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    quantize_model(model, "asq-lsq", 4, 4, first_last_bits=None)
    x = torch.randn(4, 7, 16)
    _train_step(model, x)
    adapter = model[0].act_quant.adapter
    with torch.no_grad():
        want = adapter.net(x.mean(dim=1)).clamp_min(1e-8).reshape(-1)  # one per sample
        assert torch.equal(model[0].act_quant.beta(x), want)


# ---------------------------------------------------------------- the coverage report


class _Mixed(nn.Module):
    """A conv stem, an LSTM (unsupported), a Conv2d subclass with its own forward, a head."""

    class StandardizedConv(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            return F.conv2d(x, (w - w.mean()) / (w.std() + 1e-5), self.bias, self.stride,
                            self.padding)

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.std_conv = self.StandardizedConv(4, 4, 3, padding=1)
        self.rnn = nn.LSTM(4, hidden, batch_first=True)
        self.mid = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        x = self.std_conv(self.stem(x)).flatten(2).transpose(1, 2)
        return self.head(self.mid(self.rnn(x)[0][:, -1]))


def test_coverage_lists_every_layer_left_float_and_why():
    model = quantize_model(_Mixed(), "lcq", 4, 4, overrides={"mid": None},
                           allow_unsupported=True)
    rows = {layer.name: (layer.status, layer.reason)
            for layer in model.qconvert_coverage.exceptions}
    assert rows == {
        "stem": ("rule", "lsq 8-bit weights, lsq 8-bit input by the first/last-layer rule"),
        "std_conv": ("float", "StandardizedConv overrides Conv2d.forward (its arithmetic is "
                              "its own)"),
        "rnn": ("float", "unsupported layer type LSTM"),
        "mid": ("float", "kept float by an override"),
        "head": ("rule", "lsq 8-bit weights, lsq 8-bit input by the first/last-layer rule"),
    }
    assert type(model.std_conv) is _Mixed.StandardizedConv and type(model.rnn) is nn.LSTM
    lstm_params = 4 * 8 * (4 + 8 + 2)
    assert model.qconvert_coverage.layers[2].params == lstm_params
    lines = model.qconvert_coverage.lines()
    assert lines[0].startswith("coverage: 2 of 5 Conv/Linear-like layers quantized")
    assert len(lines) == 6 and "unsupported layer type LSTM" in lines[3]


def test_unsupported_layers_holding_most_parameters_are_an_error_unless_allowed():
    with pytest.raises(ValueError, match=r"hold \d+% .*rnn \(LSTM\).*allow_unsupported=True"):
        quantize_model(_Mixed(hidden=32), "lcq", 4, 4)
    model = quantize_model(_Mixed(hidden=32), "lcq", 4, 4, allow_unsupported=True)
    assert isinstance(model.head, QLinear)
    # a small unsupported layer is reported, not refused
    model = quantize_model(nn.Sequential(nn.Linear(64, 64), nn.Conv3d(1, 1, 1),
                                         nn.Linear(64, 4)), "lcq", 4, 4)
    assert [layer.reason for layer in model.qconvert_coverage.left_float] == [
        "unsupported layer type Conv3d"]
