#!/usr/bin/env bash
# Builds the qconvert ONNX Runtime custom-op library.
#
#   bash custom_ops/build.sh            # Release: custom_ops/build/libqconvert_ops.so
#   bash custom_ops/build.sh asan       # ASan+UBSan: custom_ops/build/asan/libqconvert_ops.so
#
# ORT headers come from $QCONVERT_ORT_INCLUDE, else /usr/include/onnxruntime,
# else Debian trixie's libonnxruntime-dev (1.21) .deb, downloaded once into
# custom_ops/build/ort-headers without touching the system's apt state.
# Re-running is cheap: cmake only rebuilds what changed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VARIANT="${1:-release}"
HEADER_CACHE="$HERE/build/ort-headers"

have_headers() { [[ -f "$1/onnxruntime_lite_custom_op.h" && -f "$1/onnxruntime_cxx_api.h" ]]; }

# The Debian mirror the machine already uses (deb822 or one-line format).
debian_mirror() {
  local uri
  uri="$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
  if [[ -z "$uri" ]]; then
    uri="$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# Downloads and unpacks libonnxruntime-dev from trixie with a private apt
# state directory: nothing is installed, /var/lib/apt is not modified.
fetch_debian_headers() {
  local work="$HEADER_CACHE/apt" mirror keyring=""
  mirror="$(debian_mirror)"
  rm -rf "$work"
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
  [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] \
    && keyring=" [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
  echo "deb$keyring $mirror trixie main" > "$work/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$work/sources.list"
              -o "Dir::Etc::SourceParts=/dev/null"
              -o "Dir::State::Lists=$work/lists"
              -o "Dir::Cache=$work/cache"
              -o "Debug::NoLocking=1"
              -o "APT::Get::List-Cleanup=0")
  echo "build.sh: fetching ONNX Runtime headers (libonnxruntime-dev, trixie) from $mirror" >&2
  apt-get "${opts[@]}" -qq update >&2
  (cd "$work/deb" && apt-get "${opts[@]}" -qq download libonnxruntime-dev >&2)
  dpkg-deb -x "$work"/deb/libonnxruntime-dev_*.deb "$HEADER_CACHE/root"
  rm -rf "$work"
}

find_headers() {
  if [[ -n "${QCONVERT_ORT_INCLUDE:-}" ]]; then
    have_headers "$QCONVERT_ORT_INCLUDE" && { echo "$QCONVERT_ORT_INCLUDE"; return; }
    echo "build.sh: QCONVERT_ORT_INCLUDE=$QCONVERT_ORT_INCLUDE lacks the ORT C++/lite headers" >&2
    exit 1
  fi
  have_headers /usr/include/onnxruntime && { echo /usr/include/onnxruntime; return; }
  local cached="$HEADER_CACHE/root/usr/include/onnxruntime"
  have_headers "$cached" || fetch_debian_headers
  have_headers "$cached" || { echo "build.sh: no ORT headers found in $cached" >&2; exit 1; }
  echo "$cached"
}

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

INCLUDE_DIR="$(find_headers)"
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
