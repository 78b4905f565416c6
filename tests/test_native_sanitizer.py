"""The native kernels under AddressSanitizer + UndefinedBehaviorSanitizer.

Builds custom_ops/build/asan/libqconvert_ops.so (`bash custom_ops/build.sh
asan`), then runs tests/test_native_ops.py, tests/test_native_qconv_clamp.py (with its
shape/attribute fuzz), tests/test_native_qdepthwise_conv_clamp.py and the fuzz driver in a child
Python with the ASan runtime preloaded. The library is built with
-fno-sanitize-recover=all, so any finding aborts the child and fails the test.
By hand, from the repository root:

    bash custom_ops/build.sh asan && \
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
    ASAN_OPTIONS=detect_leaks=0 \
    QCONVERT_OPS_LIB=$PWD/custom_ops/build/asan/libqconvert_ops.so \
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_native_ops.py

(libstdc++ is preloaded too: Python does not link it, and ASan must see its
__cxa_throw at start-up. Leak checking is off because CPython itself keeps
memory until exit.) Skipped only when gcc's sanitizer runtimes are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASAN_LIB = REPO / "custom_ops" / "build" / "asan" / "libqconvert_ops.so"
FINDINGS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


def gcc_runtime(name: str) -> str | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def asan_env() -> dict[str, str]:
    runtimes = [gcc_runtime("libasan.so"), gcc_runtime("libubsan.so"), gcc_runtime("libstdc++.so")]
    if None in runtimes:
        pytest.skip("gcc's ASan/UBSan runtime is not installed")
    build = subprocess.run(
        ["bash", str(REPO / "custom_ops" / "build.sh"), "asan"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    env = dict(os.environ)
    env.update(
        {
            "LD_PRELOAD": f"{runtimes[0]} {runtimes[2]}",
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
            "QCONVERT_OPS_LIB": str(ASAN_LIB),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return env


def run_child(args: list[str], env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for finding in FINDINGS:
        assert finding not in output, output[-6000:]
    return output


def test_sanitized_library_is_the_one_loaded(asan_env):
    probe = (
        "import onnxruntime as ort; from qconvert import native; "
        "so = ort.SessionOptions(); native.register(so); "
        "maps = open('/proc/self/maps').read(); "
        "assert 'libasan' in maps and 'build/asan/libqconvert_ops.so' in maps, 'not sanitized'; "
        "print('ok')"
    )
    assert "ok" in run_child(["-c", probe], asan_env, timeout=120)


@pytest.mark.parametrize("portable", ["0", "1"], ids=["avx2", "portable"])
def test_kernel_tests_under_sanitizers(asan_env, portable):
    env = dict(asan_env, QCONVERT_OPS_PORTABLE=portable)
    output = run_child(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_native_ops.py",
         "tests/test_native_qconv_clamp.py", "tests/test_native_qdepthwise_conv_clamp.py"],
        env,
        timeout=900,
    )
    assert " passed" in output and " failed" not in output, output[-3000:]


def test_fuzz_under_sanitizers(asan_env):
    output = run_child(
        [
            "-m",
            "tests.test_native_fuzz",
            "--seconds",
            "45",
            "--cases",
            "3000",
            "--seed",
            "20240601",
        ],
        asan_env,
        timeout=600,
    )
    line = next(ln for ln in output.splitlines() if ln.startswith("fuzz:"))
    print(line)
    cases = int(line.split()[1])
    assert cases >= 500, line  # time-bounded: fewer cases on a loaded machine
