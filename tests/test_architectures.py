"""One small model per architecture family, round-tripped as a user would: quantize, train a
few steps, save with a ``module:callable`` architecture, ``qconvert export``,
``qconvert validate --synthetic 16 --per-layer``.

The builders below are the architectures the checkpoints name
(``tests.test_architectures:<builder>``); they follow the families' published designs
at toy sizes (torchvision cannot be imported here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from qconvert.checkpoint import load_checkpoint, save_checkpoint
from qconvert.export.deploy import to_deploy
from qconvert.export.weight_decode import DECODE_DOMAIN
from qconvert.ops import DOMAIN
from qconvert.quant import QUANTIZED_LAYERS, quantize_model

from .conftest import assert_one_line_error, invoke

MODULE = "tests.test_architectures"
VOCAB, TOKENS = 50, 12


# ---------------------------------------------------------------- architectures


class SqueezeExcitation(nn.Module):
    """torchvision's SE block: pool -> 1x1 conv -> ReLU -> 1x1 conv -> hard sigmoid -> scale."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(F.relu(self.fc1(self.avgpool(x))))
        return x * F.hardsigmoid(scale)


class InvertedResidual(nn.Module):
    """MobileNetV3 block: expand 1x1, depthwise 3x3, SE, project 1x1; residual when it fits."""

    def __init__(self, cin: int, expanded: int, cout: int, stride: int) -> None:
        super().__init__()
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish(),
            nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded), nn.Hardswish(),
            SqueezeExcitation(expanded, max(8, expanded // 4)),
            nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
            InvertedResidual(16, 32, 16, 1), InvertedResidual(16, 48, 24, 2),
            InvertedResidual(24, 64, 24, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(24, 32), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class VisionTransformer(nn.Module):
    """torchvision's ViT layout: patch conv, class token, learned positions, pre-norm
    nn.TransformerEncoder, LayerNorm, Linear head on the class token."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 32, heads: int = 4,
                 layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x + self.pos_embedding)
        return self.head(self.ln(x[:, 0]))


class TextTransformer(nn.Module):
    """Token ids -> embedding + positions -> post-norm nn.TransformerEncoder -> mean -> head.
    Encoder layers in the ReLU, even-head, post-norm configuration that PyTorch runs
    through its fused fast path in eval mode."""

    def __init__(self, vocab: int = VOCAB, tokens: int = TOKENS, dim: int = 32,
                 classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.pos).mean(dim=1))


class AudioCNN(nn.Module):
    """1-D convolutions over a waveform (M5-style): wide strided stem, narrow blocks, head."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        blocks = []
        for cin, cout, kernel, stride in ((1, 16, 9, 4), (16, 16, 3, 1), (16, 32, 3, 2),
                                          (32, 32, 3, 1)):
            blocks += [nn.Conv1d(cin, cout, kernel, stride, kernel // 2), nn.BatchNorm1d(cout),
                       nn.ReLU(), nn.MaxPool1d(2)]
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=-1))


class AutoEncoder(nn.Module):
    """Strided conv encoder, ConvTranspose2d decoder; reconstructs the image."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 3, 2, 1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 3, 2, 1, output_padding=1), nn.ReLU(),
            nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class VersionedStage(nn.Sequential):
    """Like torchvision's MNASNet: the layout depends on the state dict's version metadata,
    and loading a state dict without it is an error."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class MnasNetLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.layers = VersionedStage(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.classifier = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x).mean(dim=(2, 3)))


def mobilenet_like() -> nn.Module:
    return MobileNetLike()


def vision_transformer() -> nn.Module:
    return VisionTransformer()


def text_transformer() -> nn.Module:
    return TextTransformer()


def audio_cnn() -> nn.Module:
    return AudioCNN()


def autoencoder() -> nn.Module:
    return AutoEncoder()


def mnasnet_like() -> nn.Module:
    return MnasNetLike()


# ---------------------------------------------------------------- the round trip


@dataclass(frozen=True)
class Family:
    builder: str
    shape: tuple[int, ...]
    classifier: bool = True  # False: the output is an image, top-1 means nothing
    tokens: bool = False
    overrides: dict = field(default_factory=dict)

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.tokens:
            return torch.randint(0, VOCAB, (n, *self.shape), generator=gen)
        return torch.randn(n, *self.shape, generator=gen)


FAMILIES = {
    "mobilenet": Family("mobilenet_like", (3, 32, 32)),
    "vit": Family("vision_transformer", (3, 16, 16)),
    "text": Family("text_transformer", (TOKENS,), tokens=True),
    "audio": Family("audio_cnn", (1, 256)),
    "autoencoder": Family("autoencoder", (1, 16, 16), classifier=False),
    "mnasnet": Family("mnasnet_like", (3, 16, 16)),
}
SCHEMES = ("lcq", "asq-post")


def trained(family: Family, scheme: str, steps: int = 2, **options) -> nn.Module:
    """build -> quantize W4A4 -> a few SGD steps on random data (quantizers initialise and
    every parameter moves) -> eval."""
    torch.manual_seed(0)
    model = globals()[family.builder]()
    quantize_model(model, scheme, 4, 4, overrides=family.overrides, **options)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        out = model(family.batch(8, gen))
        loss = out.square().mean() if not family.classifier else F.cross_entropy(
            out, torch.randint(0, out.shape[1], (8,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # BatchNorm statistics of the trained weights, as training leaves
        for module in model.modules():  # them: after two steps they would still be the init
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the batches below
        for _ in range(4):
            model(family.batch(16, gen))
    return model.eval()


def save(tmp_path, family: Family, model: nn.Module):
    token_options = {"input_dtype": "int64"} if family.tokens else {}
    return save_checkpoint(tmp_path / "model.pt", model, arch=f"{MODULE}:{family.builder}",
                           input_shape=family.shape, **token_options)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("key", list(FAMILIES))
def test_round_trip(key, scheme, tmp_path):
    family = FAMILIES[key]
    model = trained(family, scheme)
    path = save(tmp_path, family, model)

    # Deploy form: the same function as the QAT model, bit for bit, before any ONNX.
    ckpt = load_checkpoint(path)
    deploy, layers = to_deploy(ckpt.model)
    x = family.batch(4, torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(deploy(x), model(x))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
    assert sorted(layer.name for layer in layers) == sorted(quantized)

    out = tmp_path / "model.onnx"
    result = invoke(["export", path, "--out", out])
    assert result.exit_code == 0, result.output + result.stderr
    assert "coverage:" in result.output
    _check_graph(onnx.load(str(out)).graph, model, attention=key in ("vit", "text"))
    report_path = tmp_path / "report.json"
    result = invoke(["validate", path, out, "--synthetic", "16", "--per-layer",
                     "--report", report_path])
    report = json.loads(report_path.read_text())
    assert result.exit_code == 0, result.output + result.stderr  # the default verdict: PASS
    checked = [layer for layer in report["layers"] if not layer["merged"]]
    assert checked and len(report["layers"]) == len(quantized)
    for layer in report["layers"]:
        assert layer["op_mismatches"] == 0 and layer["weight_mismatches"] == 0, layer
    assert report["nan_samples"] == 0
    if family.classifier:
        assert report["top1_agreement"] == 1.0, result.output
    else:
        assert report["sqnr_db"] is None or report["sqnr_db"] > 30, result.output


class _AttentionBlock(nn.Module):
    """Self-attention on [N, T, C] tokens, then a Linear on the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


LAYER_KINDS = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3, 2, 1), nn.Conv1d(8, 4, 1)), (4, 4, 11)),
    "conv_transpose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 8, 3, 2, 1, 1),
                                               nn.ConvTranspose2d(8, 2, 2, 2, groups=2)),
                         (4, 4, 5, 5)),
    "linear_tokens": (lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)),
                      (4, 6, 16)),
    "attention": (_AttentionBlock, (4, 6, 16)),
}


@pytest.mark.parametrize("scheme", ["lsq", "lcq", "asq-lsq", "asq-post", "pot", "post"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_deploy_form_of_each_layer_kind_is_bit_exact(kind, scheme):
    """The deploy form (packed weights + decode ops, activation ops) computes exactly what
    the QAT layers compute, for every scheme and each new layer kind."""
    build, shape = LAYER_KINDS[kind]
    torch.manual_seed(0)
    model = quantize_model(build(), scheme, 4, 4, first_last_bits=None)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        model.train()(torch.randn(shape, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    deploy, layers = to_deploy(model.eval())
    assert len(layers) == sum(isinstance(m, QUANTIZED_LAYERS) for m in model.modules())
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        assert torch.equal(deploy(x), model(x))


def _check_graph(graph: onnx.GraphProto, model: nn.Module, attention: bool) -> None:
    """Standard ONNX ops plus qconvert ops only, attention as MatMul / Softmax, and no float
    copy of any quantized weight."""
    assert {n.domain for n in graph.node} <= {"", DOMAIN, DECODE_DOMAIN}
    if attention:
        assert {"MatMul", "Softmax"} <= {n.op_type for n in graph.node}
    floats = [numpy_helper.to_array(i) for i in graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT]
    for module in model.modules():
        if isinstance(module, QUANTIZED_LAYERS):
            weight = module.weight.detach().numpy()
            assert not any(f.shape == weight.shape and np.array_equal(f, weight)
                           for f in floats)


# expected Conv/Linear-like layer counts: everything is quantized, the first and last by the
# rule (the text model's first layer is its first attention's q, k and v projections)
QUANTIZED_COUNTS = {"mobilenet": 18, "vit": 2 + 2 * 6, "text": 1 + 2 * 6, "audio": 5,
                    "autoencoder": 5, "mnasnet": 4}


@pytest.mark.parametrize("key", list(FAMILIES))
def test_every_layer_quantized_but_the_rule_ones(key):
    family = FAMILIES[key]
    torch.manual_seed(0)
    model = quantize_model(globals()[family.builder](), "lcq", 4, 4)
    coverage = model.qconvert_coverage
    assert len(coverage.layers) == QUANTIZED_COUNTS[key]
    assert not coverage.left_float
    by_rule = 4 if key == "text" else 2
    assert [layer.status for layer in coverage.exceptions] == ["rule"] * by_rule
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    assert len(layers) == QUANTIZED_COUNTS[key]
    four_bit = [m for m in layers if m.weight_quant.bits == 4 and m.act_quant.bits == 4]
    assert len(four_bit) == QUANTIZED_COUNTS[key] - by_rule
    if key == "text":
        assert {layer.name for layer in coverage.exceptions} == {
            "encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.k_proj",
            "encoder.layers.0.self_attn.v_proj", "head"}


def test_text_model_with_attention_left_float_exports_and_validates(tmp_path):
    family = FAMILIES["text"]
    floats = {f"encoder.layers.{i}.self_attn.{p}": None for i in range(2)
              for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    model = trained(Family(family.builder, family.shape, tokens=True, overrides=floats), "lcq")
    path = save(tmp_path, family, model)
    out, summary = tmp_path / "model.onnx", tmp_path / "export.json"
    result = invoke(["export", path, "--out", out, "--report", summary])
    assert result.exit_code == 0, result.output + result.stderr
    float_lines = [line for line in result.output.splitlines() if "kept float" in line]
    assert len(float_lines) == 8
    coverage = json.loads(summary.read_text())["coverage"]
    assert sorted(e["name"] for e in coverage if e["status"] == "float") == sorted(floats)
    result = invoke(["validate", path, out, "--synthetic", "16", "--per-layer"])
    assert "top-1 agreement 100.00%" in result.output, result.output


def test_synthetic_token_ids_are_valid_ids():
    from qconvert.calib import synthetic

    data = synthetic(64, (TOKENS,), vocab_size=VOCAB)
    assert data.x.dtype == np.int64 and data.x.shape == (64, TOKENS)
    assert data.x.min() >= 0 and data.x.max() < VOCAB
    assert len(np.unique(data.x)) > VOCAB // 2  # spread over the vocabulary


@pytest.mark.parametrize("ids, needle", [
    (np.array([[0, 3, 50]]), r"span 0\.\.50, the model's vocabulary is 0\.\.49"),
    (np.array([[-1, 3, 4]]), r"span -1\.\.4"),
    (np.array([[0.5, 1.0, 2.0]], np.float32), "fractional"),
])
def test_bad_token_ids_are_one_line_errors(ids, needle):
    from qconvert.errors import QConvertError
    from qconvert.preprocess import prepare_inputs

    with pytest.raises(QConvertError, match=needle):
        prepare_inputs(ids, (3,), vocab_size=VOCAB)
    good = prepare_inputs(np.array([[0, 3, 49]], np.float32), (3,), vocab_size=VOCAB)
    assert good.dtype == torch.int64 and good.tolist() == [[0, 3, 49]]


def test_integer_calibration_file_validates_a_token_model(tmp_path):
    family = FAMILIES["text"]
    path = save(tmp_path, family, trained(family, "lcq"))
    out = tmp_path / "model.onnx"
    assert invoke(["export", path, "--out", out]).exit_code == 0
    rng = np.random.default_rng(3)
    calib = tmp_path / "ids.npz"
    np.savez(calib, x=rng.integers(0, VOCAB, (20, TOKENS)).astype(np.int32),
             y=rng.integers(0, 4, 20))
    result = invoke(["validate", path, out, "--calib", calib])
    assert "samples 20" in result.output and "top-1 agreement 100.00%" in result.output, (
        result.output + result.stderr)


def test_integer_mode_refuses_a_1d_convolution_in_one_line(tmp_path):
    family = FAMILIES["audio"]
    path = save(tmp_path, family, trained(family, "lcq"))
    result = invoke(["export", path, "--out", tmp_path / "int.onnx", "--mode", "integer"])
    assert "1-D Conv" in assert_one_line_error(result)
