#!/usr/bin/env bash
# Build the llama.cpp peers of bench/serving_bench.py, apart from the project's own venv:
#   bench/.venv-peers/                 llama-cpp-python[server] (the Python wrapper's server)
#   bench/.peers-build/bin/llama-server  llama.cpp's C++ server, from the source vendored in the
#                                        same llama-cpp-python sdist (skip with --no-llama-server)
# Both compile from source (~5 minutes each on 2 cores). -march=native turns on AMX on these
# CPUs and ggml's AMX kernels segfault, so AMX is switched off explicitly.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venv-peers"
SRC="$HERE/.peers-src"
BUILD="$HERE/.peers-build"
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
WITH_SERVER=1
[[ "${1:-}" == "--no-llama-server" ]] && WITH_SERVER=0

mkdir -p "$SRC"
SDIST="$SRC/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VERSION"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'" \
        CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "$VENV/bin/pip" install "llama-cpp-python[server] @ file://$SDIST"
fi
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

if [[ "$WITH_SERVER" == 1 && ! -x "$BUILD/bin/llama-server" ]]; then
    # Extracted once: a re-run resumes an interrupted build instead of starting over.
    [[ -d "$SRC/llama_cpp_python-$VERSION" ]] || tar -xzf "$SDIST" -C "$SRC"
    cmake -S "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$BUILD" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX"
    cmake --build "$BUILD" --target llama-server -j "$JOBS"
fi
[[ -x "$BUILD/bin/llama-server" ]] && "$BUILD/bin/llama-server" --version 2>&1 | head -2
echo "peers ready"
