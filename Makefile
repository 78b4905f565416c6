# Two commands do all the set-up (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qconvert-installed
DEMO_CKPT := models/checkpoints/digits_cnn-lcq-w4a4.pt
DEMO_CALIB := models/data/digits_calib.npz

.PHONY: setup ops demo test lint
setup: $(STAMP) ops

# torch is pinned here, before the package, so pip takes the CPU build on disk
# instead of resolving a multi-GB CUDA build from the bare requirement.
# Installing the package also compiles the native library into it
# (scikit-build-core runs custom_ops/CMakeLists.txt). After C++ edits, `make ops`
# is enough: qconvert prefers a dev build newer than the installed copy.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The native library's dev build in custom_ops/build: the C++ model runner, the
# ASan variant (build.sh asan) and quick rebuilds after C++ edits. The library
# inside the installed package comes from the pip install above.
ops: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash custom_ops/build.sh

demo: setup
	mkdir -p out
	$(BIN)/qconvert export $(DEMO_CKPT) --out out/demo.onnx --force
	$(BIN)/qconvert validate $(DEMO_CKPT) out/demo.onnx --calib $(DEMO_CALIB)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/pytest -q
