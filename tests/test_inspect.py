"""qconvert inspect: op counts, parameter / MAC counts and ASQ adapter overhead, checked
against independent counts on the ONNX graph and the PyTorch model."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from torch import nn

from qconvert.quant import ASQQuantizer

from .conftest import ALL_KEYS, assert_one_line_error, invoke, quantized_layers


def torch_macs(model: nn.Module, shape) -> tuple[int, int]:
    """(all MACs, adapter MACs) per sample, from forward hooks on every convolution
    (1-D, 2-D, transposed) and Linear."""
    adapters = {id(m) for q in model.modules() if isinstance(q, ASQQuantizer)
                for m in q.adapter.modules()}
    totals = {"all": 0, "adapter": 0}

    def hook(module, inputs, output):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input element
            macs = inputs[0][0].numel() * (module.out_channels // module.groups) * math.prod(
                module.kernel_size)
        elif isinstance(module, nn.modules.conv._ConvNd):  # each output element
            macs = output[0].numel() * (module.in_channels // module.groups) * math.prod(
                module.kernel_size)
        else:
            macs = output[0].numel() * module.in_features
        totals["all"] += macs
        if id(module) in adapters:
            totals["adapter"] += macs

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return totals["all"], totals["adapter"]


def adapter_params(model: nn.Module) -> int:
    return sum(p.numel() for q in model.modules() if isinstance(q, ASQQuantizer)
               for m in q.adapter.modules() if isinstance(m, nn.Linear)
               for p in m.parameters())


_JSON: dict = {}


def inspect_json(zoo, key: str) -> dict:
    if key not in _JSON:
        result = invoke(["inspect", "--json", zoo.onnx_path(key)])
        assert result.exit_code == 0, result.output
        _JSON[key] = json.loads(result.stdout)
    return _JSON[key]


@pytest.mark.parametrize("key", ALL_KEYS)
def test_custom_op_counts(zoo, key):
    info = inspect_json(zoo, key)
    model = zoo.onnx_model(key)
    counts = Counter(n.op_type for n in model.graph.node if n.domain == "qconvert")
    assert info["custom_ops"] == dict(counts)
    assert sum(counts.values()) > 0


@pytest.mark.parametrize("key", ALL_KEYS)
def test_params_bits_and_macs(zoo, key):
    case = zoo.case(key)
    info = inspect_json(zoo, key)
    layers = quantized_layers(case.model)
    params = sum(layer.weight.numel() for _, layer in layers)
    assert info["weight_params"] == params
    assert info["quantized_params"] == params
    assert info["weight_bits"] == sum(layer.weight.numel() * layer.weight_quant.bits
                                      for _, layer in layers)
    assert len(info["layers"]) == len(layers)
    assert sorted((entry["params"], entry["bits"]) for entry in info["layers"]) == sorted(
        (layer.weight.numel(), layer.weight_quant.bits) for _, layer in layers)
    macs, adapter_macs = torch_macs(case.model, case.shape)
    assert info["macs"] == macs
    assert info["adapter_macs"] == adapter_macs
    # per-layer MACs of the quantized layers add up to the rest
    assert sum(entry["macs"] for entry in info["layers"]) == macs - adapter_macs


@pytest.mark.parametrize("key", ALL_KEYS)
def test_adapter_overhead_only_for_asq(zoo, key):
    case = zoo.case(key)
    info = inspect_json(zoo, key)
    if case.scheme.startswith("asq"):
        assert info["adapter_params"] == adapter_params(case.model) > 0
        assert info["adapter_macs"] > 0
        assert info["adapter_param_ratio"] == pytest.approx(
            info["adapter_params"] / info["quantized_params"])
    else:
        assert adapter_params(case.model) == 0
        assert info["adapter_params"] == 0 and info["adapter_macs"] == 0


def test_metadata_in_json(zoo):
    info = inspect_json(zoo, "digits-lcq")
    model = zoo.onnx_model("digits-lcq")
    assert info["metadata"] == {p.key: p.value for p in model.metadata_props}
    assert info["size_vs_ideal"] == pytest.approx(info["file_bytes"] / info["ideal_bytes"])
    assert info["size_vs_fp32"] == pytest.approx(info["file_bytes"] / info["fp32_bytes"])


@pytest.mark.parametrize("key", ["digits-lsq", "digits-asq-lsq"])
def test_text_output_matches_json(zoo, key):
    info = inspect_json(zoo, key)
    result = invoke(["inspect", zoo.onnx_path(key)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"qconvert ops: {info['custom_ops']}" in out
    assert f"MACs/sample {info['macs']}" in out
    assert f"weight bits {info['weight_bits']}" in out
    assert f"file {info['file_bytes']} B" in out
    for entry in info["layers"]:
        assert entry["layer"] in out
    if info["adapter_params"]:
        assert f"ASQ adapters: {info['adapter_params']} params" in out
    else:
        assert "ASQ adapters" not in out


def test_inspect_missing_file(tmp_path):
    result = invoke(["inspect", tmp_path / "nope.onnx"])
    assert "no such ONNX model" in assert_one_line_error(result)


def test_inspect_not_onnx(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\xff\xfe not protobuf" * 5)
    assert_one_line_error(invoke(["inspect", path]))


@pytest.mark.parametrize("key", ["autoencoder", "audio"])
def test_macs_of_transposed_and_1d_convolutions(key, tmp_path):
    """A transposed convolution's MACs follow its input, not its output (which would count
    stride^2 times too many); 1-D convolutions count their one kernel dimension."""
    from .test_architectures import FAMILIES, save, trained

    family = FAMILIES[key]
    model = trained(family, "lsq")
    out = tmp_path / "model.onnx"
    assert invoke(["export", save(tmp_path, family, model), "--out", out]).exit_code == 0
    result = invoke(["inspect", "--json", out])
    assert result.exit_code == 0, result.output
    macs, _ = torch_macs(model, family.shape)
    assert json.loads(result.stdout)["macs"] == macs
