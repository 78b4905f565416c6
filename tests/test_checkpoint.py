"""save_checkpoint / load_checkpoint: bit-identical round trips and clear errors on bad files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qconvert import QConvertError, load_checkpoint, save_checkpoint
from qconvert.archs import build_architecture
from qconvert.checkpoint import InputSpec
from qconvert.quant import SCHEMES, QConv2d, QLinear, quantize_model

DIGITS = {"in_channels": 1, "width": 8}



def trained(scheme: str, arch: str = "digits_cnn", kwargs: dict | None = None,
            steps: int = 3, **options) -> torch.nn.Module:
    """A quantized model after a few SGD steps (parameters and BN statistics moved), in eval."""
    torch.manual_seed(0)
    model = build_architecture(arch, DIGITS if kwargs is None else kwargs)
    quantize_model(model, scheme, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(8, 1, 8, 8, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def batch(seed: int = 2) -> torch.Tensor:
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def save(path: Path, model, arch: str = "digits_cnn", kwargs: dict | None = None) -> Path:
    return save_checkpoint(path, model, arch=arch, arch_kwargs=DIGITS if kwargs is None else kwargs,
                           input_shape=(1, 8, 8), mean=(0.5,), std=(0.25,),
                           training={"epochs": 3, "top1": 0.5})


def check_round_trip(model, path: Path, arch: str, kwargs: dict) -> None:
    x = batch()
    with torch.no_grad():
        want = model(x)
    assert torch.isfinite(want).all()
    ckpt = load_checkpoint(save(path, model, arch, kwargs))
    assert not any(m.training for m in ckpt.model.modules())
    with torch.no_grad():
        got = ckpt.model(x)
    assert torch.equal(got, want)
    # the loaded model keeps working in training mode too: its quantizers are initialised
    original, loaded = model.state_dict(), ckpt.model.state_dict()
    assert list(loaded) == list(original)
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    assert ckpt.arch == arch and ckpt.arch_kwargs == kwargs
    assert ckpt.layer_specs == model.qconvert_specs
    assert ckpt.model.qconvert_specs == model.qconvert_specs
    for name, spec in ckpt.layer_specs.items():
        layer = ckpt.model.get_submodule(name)
        if spec is None:
            assert not isinstance(layer, QConv2d | QLinear)
        else:
            assert isinstance(layer, QConv2d | QLinear) and layer.layer_spec == spec
    assert ckpt.input == InputSpec((1, 8, 8), (0.5,), (0.25,))
    assert ckpt.training == {"epochs": 3, "top1": 0.5}
    assert ckpt.path == path
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_round_trip_is_bit_identical(scheme, tmp_path):
    model = trained(scheme)
    check_round_trip(model, tmp_path / "m.pt", "digits_cnn", DIGITS)
    assert load_checkpoint(tmp_path / "m.pt").scheme == scheme
    assert load_checkpoint(tmp_path / "m.pt").model.qconvert_scheme == scheme


def test_round_trip_with_overrides_and_per_channel(tmp_path):
    model = trained("asq-post", per_channel=True, overrides={
        "features.3": {"weight": {"kind": "pot", "bits": 3}},
        "features.7": {"weight": {"kind": "lcq", "normalize": True, "per_channel": False},
                       "act": {"kind": "lcq", "bits": 2}},
        "classifier": None,
    })
    assert model.qconvert_specs["classifier"] is None
    check_round_trip(model, tmp_path / "mixed.pt", "digits_cnn", DIGITS)


def test_user_architecture_import_path(tmp_path):
    kwargs = {"classes": 3, "width": 8}
    model = trained("asq-lsq", "tests.user_arch:build", kwargs)
    assert model(batch()).shape == (5, 3)
    check_round_trip(model, tmp_path / "user.pt", "tests.user_arch:build", kwargs)
    assert type(load_checkpoint(tmp_path / "user.pt").model).__name__ == "TinyUserNet"


@pytest.mark.parametrize("arch", [
    "tests.no_such_module_qconvert:build",
    "tests.user_arch:no_such_builder",
    "tests.user_arch:NOT_CALLABLE",
    "no_such_builtin_arch",
])
def test_unusable_architecture_path_raises_naming_it(arch, tmp_path):
    path = save(tmp_path / "m.pt", trained("lsq", steps=1), arch=arch)
    with pytest.raises(QConvertError) as info:
        load_checkpoint(path)
    assert arch in str(info.value)
    assert str(path) in str(info.value)


BROKEN_MODULES = {
    "syntax-error": "def build(:\n    pass\n",
    "raises-on-import": "raise RuntimeError('missing optional dependency')\n",
}


@pytest.mark.parametrize("kind", list(BROKEN_MODULES))
def test_arch_module_that_fails_to_import_raises_qconvert_error(kind, tmp_path, monkeypatch):
    module = f"qconvert_broken_arch_{kind.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(BROKEN_MODULES[kind])
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = f"{module}:build"
    path = save(tmp_path / "m.pt", trained("lsq", steps=1), arch=arch)
    with pytest.raises(QConvertError, match=arch):
        load_checkpoint(path)


def test_whole_pickled_module_refused(tmp_path):
    model = trained("lsq", steps=1)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(QConvertError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "pickle" in message
    assert "save_checkpoint" in message  # says how to fix it
    # trusting the file either loads it or refuses it cleanly; it never crashes
    try:
        ckpt = load_checkpoint(path, allow_pickle=True)
    except QConvertError as exc:
        assert str(path) in str(exc)
    else:
        with torch.no_grad():
            assert torch.equal(ckpt.model(batch()), model(batch()))


def test_pickled_module_with_input_spec_loads_only_with_allow_pickle(tmp_path):
    model = trained("post", steps=1)
    model.qconvert_input = {"shape": [1, 8, 8]}
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(QConvertError, match="pickle"):
        load_checkpoint(path)
    try:
        ckpt = load_checkpoint(path, allow_pickle=True)
    except QConvertError as exc:  # refusing is allowed, as long as it is a clean refusal
        assert str(path) in str(exc)
        return
    assert not any(m.training for m in ckpt.model.modules())
    assert ckpt.scheme == "post" and ckpt.layer_specs == model.qconvert_specs
    assert ckpt.input.shape == (1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ckpt.model(batch()), model(batch()))


def test_plain_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(trained("lsq", steps=1).state_dict(), path)
    with pytest.raises(QConvertError, match="qconvert-checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.fixture
def good(tmp_path) -> Path:
    return save(tmp_path / "good.pt", trained("asq-post", steps=1))


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_file(good, keep):
    data = good.read_bytes()
    path = good.with_name("truncated.pt")
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(QConvertError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)  # one line, not torch's traceback text


def test_missing_file(tmp_path):
    with pytest.raises(QConvertError, match="no such"):
        load_checkpoint(tmp_path / "nope.pt")



def write_non_pt(tmp_path: Path, kind: str) -> Path:
    if kind == "npy":
        path = tmp_path / "array.npy"
        np.save(path, np.arange(6, dtype=np.float32))
    elif kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("just some text, not a model\n")
    elif kind == "json":
        path = tmp_path / "model.json"
        path.write_text('{"format": "qconvert-checkpoint"}')
    elif kind == "empty":
        path = tmp_path / "empty.pt"
        path.write_bytes(b"")
    else:
        path = tmp_path / "fake.zip"
        path.write_bytes(b"PK\x03\x04" + bytes(range(200)))
    return path


@pytest.mark.parametrize("kind", [
    "npy", "json", "empty", "zip-garbage",
    "text",
])
def test_non_pt_file(tmp_path, kind):
    path = write_non_pt(tmp_path, kind)
    with pytest.raises(QConvertError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_non_pt_file_with_allow_pickle_does_not_advise_allow_pickle(tmp_path):
    path = write_non_pt(tmp_path, "npy")
    with pytest.raises(QConvertError) as info:
        load_checkpoint(path, allow_pickle=True)
    assert str(path) in str(info.value)
    assert "allow-pickle" not in str(info.value)


def rewrite(good: Path, name: str, edit) -> Path:
    payload = torch.load(good, weights_only=True)
    edit(payload)
    path = good.with_name(name)
    torch.save(payload, path)
    return path


def test_wrong_format_name(good):
    path = rewrite(good, "other.pt", lambda p: p.update(format="onnx-export"))
    with pytest.raises(QConvertError, match="qconvert-checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_unsupported_version(good):
    path = rewrite(good, "v99.pt", lambda p: p.update(version=99))
    with pytest.raises(QConvertError, match="99") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def drop_key(payload):
    del payload["state_dict"]["features.3.weight_quant.alpha"]


def add_key(payload):
    payload["state_dict"]["features.3.extra_buffer"] = torch.zeros(2)


def reshape_key(payload):
    payload["state_dict"]["features.3.weight"] = torch.zeros(16, 8, 5, 5)


@pytest.mark.parametrize(("edit", "needle"), [
    (drop_key, "features.3.weight_quant.alpha"),
    (add_key, "features.3.extra_buffer"),
    (reshape_key, "features.3.weight"),
], ids=["missing", "extra", "wrong-shape"])
def test_state_dict_mismatch(good, edit, needle):
    path = rewrite(good, "edited.pt", edit)
    with pytest.raises(QConvertError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and needle in message


@pytest.mark.parametrize("key", ["state_dict", "arch", "layers", "input"])
def test_missing_payload_entry(good, key):
    path = rewrite(good, f"no-{key}.pt", lambda p: p.pop(key))
    with pytest.raises(QConvertError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_save_refuses_an_unquantized_model(tmp_path):
    with pytest.raises(QConvertError):
        save_checkpoint(tmp_path / "m.pt", build_architecture("digits_cnn", DIGITS),
                        arch="digits_cnn", input_shape=(1, 8, 8))
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------- versioned modules, input spec


class _VersionedBlock(torch.nn.Sequential):
    """Reads its version from the state dict's metadata on load, as MNASNet does."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be set to 1 or 2 instead of "
                             f"{local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def versioned_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        _VersionedBlock(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten()),
        torch.nn.Linear(4 * 6 * 6, 3))


def test_versioned_module_loads(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(versioned_net(), "lsq")
    model.train()(batch())
    path = save_checkpoint(tmp_path / "v.pt", model.eval(),
                           arch="tests.test_checkpoint:versioned_net", input_shape=(1, 8, 8))
    ckpt = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(ckpt.model(batch()), model(batch()))


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (8, 8), (3, 8, 8)])
def test_save_refuses_an_input_shape_the_model_cannot_take(shape, tmp_path):
    with pytest.raises(QConvertError, match=r"cannot take input_shape .*the shape of one "
                                            r"sample, without the batch dimension"):
        save_checkpoint(tmp_path / "m.pt", trained("lsq", steps=1), arch="digits_cnn",
                        arch_kwargs=DIGITS, input_shape=shape)
    assert not (tmp_path / "m.pt").exists()


def test_shape_check_keeps_training_modes(tmp_path):
    model = trained("lsq", steps=1).train()
    model.features[1].eval()  # e.g. a frozen BatchNorm
    save(tmp_path / "m.pt", model)
    assert model.training and not model.features[1].training and model.features[0].training


class _TokenNet(torch.nn.Module):
    def __init__(self, vocab: int = 30) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.fc(self.embed(ids)).mean(dim=1))


def token_net(vocab: int = 30) -> torch.nn.Module:
    return _TokenNet(vocab)


@pytest.mark.parametrize("vocab_size, want", [(None, 30), (20, 20)])
def test_token_input_spec_records_dtype_and_vocabulary(vocab_size, want, tmp_path):
    model = quantize_model(token_net(), "lsq")
    model.train()(torch.randint(0, 30, (4, 5)))
    path = save_checkpoint(tmp_path / "t.pt", model.eval(),
                           arch="tests.test_checkpoint:token_net", input_shape=(5,),
                           input_dtype="int64", vocab_size=vocab_size)
    ckpt = load_checkpoint(path)
    assert ckpt.input == InputSpec((5,), (), (), "int64", want)
    assert ckpt.input.torch_dtype == torch.int64
    assert torch.load(path, weights_only=True)["input"]["dtype"] == "int64"


def test_token_input_without_vocabulary_is_refused(tmp_path):
    model = trained("lsq", steps=1)
    with pytest.raises(QConvertError, match="needs vocab_size="):
        save_checkpoint(tmp_path / "m.pt", model, arch="digits_cnn", arch_kwargs=DIGITS,
                        input_shape=(1, 8, 8), input_dtype="int64")
    with pytest.raises(QConvertError, match="input_dtype 'float16' is not supported"):
        save_checkpoint(tmp_path / "m.pt", model, arch="digits_cnn", arch_kwargs=DIGITS,
                        input_shape=(1, 8, 8), input_dtype="float16")


def test_coverage_travels_with_the_checkpoint(good):
    ckpt = load_checkpoint(good)
    assert [(layer.name, layer.status) for layer in ckpt.coverage.exceptions] == [
        ("features.0", "rule"), ("classifier", "rule")]
    # a checkpoint saved without coverage or metadata (older qconvert) still loads
    old = load_checkpoint(rewrite(good, "old.pt", lambda p: (p.pop("coverage"),
                                                              p.pop("state_metadata"))))
    assert [layer.status for layer in old.coverage.layers] == ["quantized"] * len(
        old.coverage.layers)
