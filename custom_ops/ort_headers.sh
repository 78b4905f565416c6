#!/usr/bin/env bash
# Prints the directory holding the ONNX Runtime C/C++ headers (onnxruntime_cxx_api.h
# and the lite custom-op header) the qconvert library compiles against.
#
# The one place that finds them; build.sh and CMakeLists.txt (hence the pip
# wheel build) both ask it. In order:
#   1. $QCONVERT_ORT_INCLUDE (an error if it lacks the headers),
#   2. /usr/include/onnxruntime,
#   3. Debian trixie's libonnxruntime-dev (ORT 1.21), downloaded once and
#      unpacked into custom_ops/build/ort-headers with a private apt state
#      directory: nothing is installed and /var/lib/apt is not modified.
# Only Debian's mirror is contacted, and only in case 3.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
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
  echo "ort_headers.sh: fetching ONNX Runtime headers (libonnxruntime-dev, trixie) from $mirror" >&2
  apt-get "${opts[@]}" -qq update >&2
  (cd "$work/deb" && apt-get "${opts[@]}" -qq download libonnxruntime-dev >&2)
  dpkg-deb -x "$work"/deb/libonnxruntime-dev_*.deb "$HEADER_CACHE/root"
  rm -rf "$work"
}

if [[ -n "${QCONVERT_ORT_INCLUDE:-}" ]]; then
  have_headers "$QCONVERT_ORT_INCLUDE" && { echo "$QCONVERT_ORT_INCLUDE"; exit 0; }
  echo "ort_headers.sh: QCONVERT_ORT_INCLUDE=$QCONVERT_ORT_INCLUDE lacks the ORT C++/lite headers" >&2
  exit 1
fi
have_headers /usr/include/onnxruntime && { echo /usr/include/onnxruntime; exit 0; }
CACHED="$HEADER_CACHE/root/usr/include/onnxruntime"
have_headers "$CACHED" || fetch_debian_headers
have_headers "$CACHED" || { echo "ort_headers.sh: no ORT headers found in $CACHED" >&2; exit 1; }
echo "$CACHED"
