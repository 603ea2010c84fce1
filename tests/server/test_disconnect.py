"""Clients that go away free their rows: a real uvicorn server on a loopback port."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import AppFactory, running, wait_until

from safesteer.adapters.loading import LoadedModel
from safesteer.server.engine import Engine

LONG: dict[str, Any] = {
    "messages": [{"role": "user", "content": "go on"}],
    "max_tokens": 200,
    "ignore_eos": True,
    "temperature": 0,
}


@pytest.fixture
def live(make_app: AppFactory, loaded: LoadedModel) -> Iterator[tuple[str, Engine]]:
    def slow_step(*_: Any) -> None:
        time.sleep(0.02)  # 200 tokens take ~4 s: the request is surely running when we leave

    loaded.model.register_forward_pre_hook(slow_step)
    app = make_app()
    with running(app) as url:
        yield url, app.state.serving.registry.models[0].engine


def test_stream_client_leaving_frees_its_row(live: tuple[str, Engine]) -> None:
    url, engine = live
    with (
        httpx.Client(base_url=url) as client,
        client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response,
    ):
        lines = response.iter_lines()
        next(lines)
        assert wait_until(lambda: engine.active_rows == 1, 5)
    # The connection is closed: the row must leave long before its 200 tokens are done.
    assert wait_until(lambda: engine.active_rows == 0, 1.0)


def test_non_stream_client_leaving_frees_its_row(live: tuple[str, Engine]) -> None:
    url, engine = live
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=0.5) as client:
        client.post("/v1/chat/completions", json=LONG)
    assert wait_until(lambda: engine.active_rows == 0, 1.0)
    # ... and the server still answers.
    with httpx.Client(base_url=url) as client:
        ok = client.post("/v1/chat/completions", json={**LONG, "max_tokens": 2})
    assert ok.status_code == 200
