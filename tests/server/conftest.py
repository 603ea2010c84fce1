"""Fixtures for engine and API tests: the tiny chat model, apps and an openai client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tiny_chat import TINY_MODEL_NAME, tiny_loaded_model

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.loading import LoadedModel
from safesteer.server.app import create_app
from safesteer.server.registry import ModelRegistry, ServedModel
from safesteer.server.settings import Settings

AppFactory = Callable[..., FastAPI]


@pytest.fixture
def loaded() -> LoadedModel:
    return tiny_loaded_model()


@pytest.fixture
def strong_adapter(random_adapter: Any, loaded: LoadedModel) -> SafetyAdapter:
    """An adapter whose default mix visibly changes the tiny model's greedy output."""
    adapter: SafetyAdapter = random_adapter(loaded.model, layers=(1, 2), norm=6.0)
    return adapter


@pytest.fixture
def make_app(loaded: LoadedModel, strong_adapter: SafetyAdapter) -> AppFactory:
    def factory(adapter: SafetyAdapter | None = strong_adapter, **settings: Any) -> FastAPI:
        config = Settings(model=TINY_MODEL_NAME, **settings)
        served = ServedModel(TINY_MODEL_NAME, loaded, adapter, config)
        return create_app(config, ModelRegistry([served]))

    return factory


@pytest.fixture
def http(make_app: AppFactory) -> Iterator[TestClient]:
    with TestClient(make_app()) as client:  # the context runs the app's lifespan
        yield client


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
    )
