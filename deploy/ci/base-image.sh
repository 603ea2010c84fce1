#!/usr/bin/env bash
# The local base image for offline builds: Debian bookworm (minbase) with python3 and venv,
# made by debootstrap and `docker import`, since no container registry is reachable here.
# Prints the image name; does nothing when the engine already has it.
set -euo pipefail

IMAGE="${SAFESTEER_BASE_IMAGE:-local/bookworm-python3:12}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKER=/usr/bin/docker
: "${DOCKER_HOST:?start the engine first: eval \"\$(deploy/ci/dockerd.sh start)\"}"

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: run deploy/ci/setup.sh" >&2; exit 1; }
rootfs="$(mktemp -d /tmp/safesteer-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
# Keep the image small: apt lists and caches are not needed at run time.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "$IMAGE"
