"""Clients that go away free their rows: a real uvicorn server on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import AppFactory

from safesteer.adapters.loading import LoadedModel
from safesteer.server.engine import Engine

LONG: dict[str, Any] = {
    "messages": [{"role": "user", "content": "go on"}],
    "max_tokens": 200,
    "ignore_eos": True,
    "temperature": 0,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def live(make_app: AppFactory, loaded: LoadedModel) -> Iterator[tuple[str, Engine]]:
    def slow_step(*_: Any) -> None:
        time.sleep(0.02)  # 200 tokens take ~4 s: the request is surely running when we leave

    loaded.model.register_forward_pre_hook(slow_step)
    app = make_app()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    engine = app.state.serving.registry.models[0].engine
    try:
        yield url, engine
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def _wait_until(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_stream_client_leaving_frees_its_row(live: tuple[str, Engine]) -> None:
    url, engine = live
    with (
        httpx.Client(base_url=url) as client,
        client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response,
    ):
        lines = response.iter_lines()
        next(lines)
        assert _wait_until(lambda: engine.active_rows == 1, 5)
    # The connection is closed: the row must leave long before its 200 tokens are done.
    assert _wait_until(lambda: engine.active_rows == 0, 1.0)


def test_non_stream_client_leaving_frees_its_row(live: tuple[str, Engine]) -> None:
    url, engine = live
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=0.5) as client:
        client.post("/v1/chat/completions", json=LONG)
    assert _wait_until(lambda: engine.active_rows == 0, 1.0)
    # ... and the server still answers.
    with httpx.Client(base_url=url) as client:
        ok = client.post("/v1/chat/completions", json={**LONG, "max_tokens": 2})
    assert ok.status_code == 200
