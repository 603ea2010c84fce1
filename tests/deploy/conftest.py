"""Deploy checks: the Dockerfile and manifests linted and validated, the image built and run
through compose, and the Ray Serve application on a two-node local cluster.

They need tools the project's venv does not have (deploy/.venv-tools, deploy/.venv-ray, a
Docker engine, a local base image) and minutes of machine time, so they run only when
SAFESTEER_DEPLOY_TESTS=1: `.ci/deploy-checks` (or `make deploy-check`) installs everything
and sets it. In the default test run they are reported as skipped.
"""

from __future__ import annotations

import os

import pytest

ENABLED = os.environ.get("SAFESTEER_DEPLOY_TESTS") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "deploy: deploy checks (Docker, manifests, Ray); SAFESTEER_DEPLOY_TESTS=1"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="deploy checks run from .ci/deploy-checks")
    for item in items:
        if item.get_closest_marker("deploy") is not None:
            item.add_marker(skip)
