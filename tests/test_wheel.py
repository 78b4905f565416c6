"""The built wheel works on its own: bundled native library, CLI, export + validate.

Builds the wheel from this source tree, installs it into a fresh virtual
environment and runs that environment's `qconvert` on a shipped checkpoint.
The new environment reaches the dependencies already installed for this
interpreter through a .pth file (no download, no second torch), and the wheel
is installed with --no-deps; PYTHONPATH is cleared and the commands run outside
the source tree, so only the installed wheel can provide `qconvert`.

Slow (marked `slow`): it compiles the native library through the wheel build
(incremental after the first run, in custom_ops/build/wheel/) and runs export
and validate in a new process. Needs the build backend from PyPI (pip's build
isolation) and the ORT headers (custom_ops/ort_headers.sh).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "models" / "checkpoints" / "digits_cnn-lcq-w4a4.pt"
CALIB = REPO / "models" / "data" / "digits_calib.npz"

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def isolated_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "QCONVERT_OPS_LIB", "VIRTUAL_ENV")}
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with the freshly built wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    env = isolated_env()
    run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--quiet",
         "--wheel-dir", str(dist)], cwd=work, env=env)
    (wheel,) = dist.glob("qconvert-*.whl")

    root = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=work, env=env)
    python = root / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                  cwd=work, env=env).strip()
    # The dependencies this interpreter already has (torch, onnxruntime, ...).
    # Directories listed in a .pth file are appended to sys.path, after the
    # venv's own site-packages, and their own .pth files are not run: an
    # editable install of the source tree there stays invisible.
    outer = dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib")])
    (Path(purelib) / "_outer_site_packages.pth").write_text("\n".join(outer) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)], cwd=work, env=env)
    return root


def test_installed_package_is_the_wheel(venv):
    code = "import qconvert; print(qconvert.__file__); print(qconvert.ops_library_path())"
    out = run([str(venv / "bin" / "python"), "-c", code], cwd=venv, env=isolated_env())
    module, library = (Path(line) for line in out.split())
    assert module.is_relative_to(venv), f"qconvert imported from {module}, not the wheel"
    assert library.is_relative_to(venv) and library.is_file()


def test_wheel_exports_and_validates_with_bundled_library(venv, tmp_path):
    env = isolated_env()
    qconvert = str(venv / "bin" / "qconvert")
    library = Path(run([qconvert, "ops-lib"], cwd=tmp_path, env=env).strip())
    assert library.is_relative_to(venv) and library.name == "libqconvert_ops.so"

    model, report = tmp_path / "model.onnx", tmp_path / "report.json"
    run([qconvert, "export", str(CHECKPOINT), "--out", str(model)], cwd=tmp_path, env=env)
    out = run([qconvert, "validate", str(CHECKPOINT), str(model), "--calib", str(CALIB),
               "--report", str(report)], cwd=tmp_path, env=env)
    assert "runtime: native" in out
    assert json.loads(report.read_text())["runtime"] == "native"
