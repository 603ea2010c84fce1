#!/usr/bin/env bash
# A private Docker engine for the deploy checks: its own data root, exec root and socket
# under $SAFESTEER_DEPLOY_CACHE (the layer cache survives between runs), stopped by its PID.
#
#   deploy/ci/dockerd.sh start   # prints `export DOCKER_HOST=unix://...` once it answers
#   deploy/ci/dockerd.sh stop
set -euo pipefail

CACHE="${SAFESTEER_DEPLOY_CACHE:-/var/cache/safesteer-deploy}"
ROOT="$CACHE/docker"
RUN_DIR="${SAFESTEER_DOCKER_RUN:-/tmp/safesteer-dockerd}"
SOCK="$RUN_DIR/docker.sock"
PIDFILE="$RUN_DIR/dockerd.pid"
DOCKER=/usr/bin/docker  # Debian's client; a newer client elsewhere on PATH lacks buildx

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-}" in
start)
    if running; then
        echo "export DOCKER_HOST=unix://$SOCK"
        exit 0
    fi
    command -v dockerd >/dev/null || { echo "dockerd missing: run deploy/ci/setup.sh" >&2; exit 1; }
    mkdir -p "$ROOT" "$RUN_DIR/exec"
    dockerd --data-root "$ROOT" --exec-root "$RUN_DIR/exec" --pidfile "$PIDFILE" \
        -H "unix://$SOCK" \
        >"$RUN_DIR/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do
        if DOCKER_HOST="unix://$SOCK" "$DOCKER" version >/dev/null 2>&1; then
            echo "export DOCKER_HOST=unix://$SOCK"
            exit 0
        fi
        sleep 0.5
    done
    echo "dockerd did not answer in 30 s:" >&2
    tail -20 "$RUN_DIR/dockerd.log" >&2
    exit 1
    ;;
stop)
    if running; then
        pid="$(cat "$PIDFILE")"
        kill "$pid"
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    fi
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
