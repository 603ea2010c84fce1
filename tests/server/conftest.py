"""Fixtures for engine and API tests: the tiny chat model, apps and an openai client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tiny_chat import TINY_MODEL_NAME, tiny_loaded_model

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.loading import LoadedModel
from safesteer.server.app import create_app
from safesteer.server.settings import Settings
from safesteer.server.startup import Server, build_server

AppFactory = Callable[..., FastAPI]


@pytest.fixture
def loaded() -> LoadedModel:
    return tiny_loaded_model()


@pytest.fixture
def strong_adapter(random_adapter: Any, loaded: LoadedModel) -> SafetyAdapter:
    """An adapter whose default mix visibly changes the tiny model's greedy output."""
    adapter: SafetyAdapter = random_adapter(loaded.model, layers=(1, 2), norm=6.0)
    return adapter


def serve_tiny(
    loaded: LoadedModel,
    adapter: SafetyAdapter | None,
    tmp_path: Path,
    **settings: Any,
) -> tuple[Settings, Server]:
    """Settings and a server for the tiny model; the adapter goes through a real file."""
    adapter_dir = tmp_path / "adapters"
    if adapter is not None:
        adapter.save(adapter_dir / "tiny" / "adapter.safetensors")
    settings.setdefault("adapter_dir", adapter_dir)
    settings.setdefault("state_dir", tmp_path / "state")
    settings.setdefault("no_adapter", adapter is None)
    config = Settings(model=TINY_MODEL_NAME, **settings)
    return config, build_server(config, [(TINY_MODEL_NAME, loaded)])


@pytest.fixture
def make_app(loaded: LoadedModel, strong_adapter: SafetyAdapter, tmp_path: Path) -> AppFactory:
    def factory(adapter: SafetyAdapter | None = strong_adapter, **settings: Any) -> FastAPI:
        config, server = serve_tiny(loaded, adapter, tmp_path, **settings)
        return create_app(config, server)

    return factory


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def http(make_app: AppFactory) -> Iterator[TestClient]:
    with TestClient(make_app()) as client:  # the context runs the app's lifespan
        yield client


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
    )
