"""The image for real: built through compose (offline, from the host wheelhouse and a local
base image), started with `docker-compose up`, healthy, and answering one chat completion
over 127.0.0.1 through the openai client. Needs the engine `.ci/deploy-checks` starts."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from deploy_helpers import REPO, free_ports, new_key, run, tool

pytestmark = pytest.mark.deploy
DOCKER = "/usr/bin/docker"  # Debian's client: it can build with BuildKit without buildx
HEALTHY_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(base URL, client key, container name) of a compose project that is up and healthy."""
    if "DOCKER_HOST" not in os.environ or "SAFESTEER_BASE_IMAGE" not in os.environ:
        pytest.fail("DOCKER_HOST and SAFESTEER_BASE_IMAGE must be set: run .ci/deploy-checks")
    folder: Path = tmp_path_factory.mktemp("compose")
    keys = folder / "keys.toml"
    client_key = new_key(keys, "ci-client", "client")
    keys.chmod(0o644)  # the container's user (uid 10001) reads the bind-mounted secret
    (port,) = free_ports(1)
    project = f"safesteer-ci-{os.getpid()}"
    env = {
        "SAFESTEER_KEYS": str(keys),
        "SAFESTEER_PUBLISH": f"127.0.0.1:{port}",
        "SAFESTEER_IMAGE": os.environ.get("SAFESTEER_IMAGE", "safesteer:ci"),
        "BASE_IMAGE": os.environ["SAFESTEER_BASE_IMAGE"],
        "OFFLINE": "1",
        "COMPOSE_DOCKER_CLI_BUILD": "1",
        "DOCKER_BUILDKIT": "1",
        "PATH": f"/usr/bin:{os.environ['PATH']}",
    }
    command = [tool("docker-compose"), "-p", project, "-f", REPO / "deploy" / "compose.yaml"]
    started = time.monotonic()
    run([*command, "build"], env=env, timeout=1500)
    print(f"\n[deploy] image {env['SAFESTEER_IMAGE']} built in {time.monotonic() - started:.0f} s")
    try:
        started = time.monotonic()
        run([*command, "up", "-d", "--no-build"], env=env)
        container = run([*command, "ps", "-q", "safesteer"], env=env).stdout.strip()
        status = ""
        while time.monotonic() - started < HEALTHY_TIMEOUT_S:
            status = run(
                [DOCKER, "inspect", "-f", "{{.State.Health.Status}}", container]
            ).stdout.strip()
            if status == "healthy":
                break
            time.sleep(1)
        if status != "healthy":
            logs = run([DOCKER, "logs", "--tail", "40", container], check=False)
            pytest.fail(f"container {status} after {HEALTHY_TIMEOUT_S} s:\n{logs.stderr}")
        print(f"[deploy] compose up: healthy in {time.monotonic() - started:.0f} s")
        yield f"http://127.0.0.1:{port}", client_key, container
    finally:
        run([*command, "down", "-v", "--remove-orphans"], env=env, check=False)


def test_container_answers_a_chat_completion(compose: tuple[str, str, str]) -> None:
    url, key, _ = compose
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    started = time.monotonic()
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    elapsed = time.monotonic() - started
    content = reply.choices[0].message.content
    safety = (reply.model_extra or {})["safety"]
    print(f"[deploy] chat completion in {elapsed:.1f} s: {content!r} (adapter {safety['adapter']})")
    assert content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert safety["adapter"].startswith("smollm2-135m-safety@")


def test_container_refuses_requests_without_a_valid_key(compose: tuple[str, str, str]) -> None:
    url, _, _ = compose
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-ss-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_container_runs_as_non_root_on_a_read_only_root(compose: tuple[str, str, str]) -> None:
    _, _, container = compose
    assert run([DOCKER, "exec", container, "id", "-u"]).stdout.strip() == "10001"
    probe = run([DOCKER, "exec", container, "touch", "/opt/x"], check=False)
    assert probe.returncode != 0  # read_only: true in compose.yaml
