#!/usr/bin/env bash
# Builds the qconvert ONNX Runtime custom-op library.
#
#   bash custom_ops/build.sh            # Release: custom_ops/build/libqconvert_ops.so
#   bash custom_ops/build.sh asan       # ASan+UBSan: custom_ops/build/asan/libqconvert_ops.so
#
# ORT headers: found by ort_headers.sh ($QCONVERT_ORT_INCLUDE, else
# /usr/include/onnxruntime, else Debian trixie's libonnxruntime-dev, fetched
# once), the same script the pip wheel build's CMake run asks.
# Re-running is cheap: cmake only rebuilds what changed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VARIANT="${1:-release}"

# The pip wheel's libonnxruntime.so, for the C++ test program (optional).
# The project's venv when there is one (make ops also puts it first on PATH).
find_ort_library() {
  local python=python3
  [[ -x "$HERE/../.venv/bin/python" ]] && python="$HERE/../.venv/bin/python"
  # find_spec locates the package without importing it: keeps rebuilds quick.
  "$python" - <<'PY' 2>/dev/null || true
import glob, importlib.util, os
spec = importlib.util.find_spec("onnxruntime")
dirs = list(spec.submodule_search_locations or []) if spec else []
libs = sorted(glob.glob(os.path.join(dirs[0], "capi", "libonnxruntime.so*"))) if dirs else []
print(libs[0] if libs else "")
PY
}

case "$VARIANT" in
  release) BUILD_DIR="$HERE/build"; SANITIZE=OFF ;;
  asan)    BUILD_DIR="$HERE/build/asan"; SANITIZE=ON ;;
  *) echo "usage: $0 [release|asan]" >&2; exit 2 ;;
esac

INCLUDE_DIR="$(bash "$HERE/ort_headers.sh")"
ORT_LIB="$(find_ort_library)"
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)

# Configure only once per build directory (or when the inputs change):
# that is what keeps a repeated `make ops` quick.
CONFIG_KEY="$INCLUDE_DIR|$ORT_LIB|$SANITIZE|${GENERATOR[*]:-make}"
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" || "$(cat "$BUILD_DIR/.config-key" 2>/dev/null)" != "$CONFIG_KEY" ]]; then
  rm -rf "$BUILD_DIR/CMakeCache.txt" "$BUILD_DIR/CMakeFiles"
  cmake -S "$HERE" -B "$BUILD_DIR" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DQCONVERT_ORT_INCLUDE="$INCLUDE_DIR" \
    -DQCONVERT_ORT_LIBRARY="$ORT_LIB" \
    -DQCONVERT_SANITIZE="$SANITIZE" >/dev/null
  echo "$CONFIG_KEY" > "$BUILD_DIR/.config-key"
fi
cmake --build "$BUILD_DIR" -j 2
echo "build.sh: $BUILD_DIR/libqconvert_ops.so"
