"""Ray Serve scale-out on a real two-node cluster on 127.0.0.1: one server replica per node
(1 CPU each), the proxy spreading requests over both, and an adapter loaded and activated
through the admin API reaching both replicas.

Ray runs from deploy/.venv-ray with token authentication on (a token made for this run, in
the environment, never in ~/.ray), its session files in a temporary folder, fixed ports
outside Ray's worker range, and every process it started stopped by process group, never by
name (no `ray stop`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from deploy_helpers import RAY_BIN, REPO, free_ports, new_key, run

pytestmark = pytest.mark.deploy
FAMILY = "smollm2-135m"
MODEL = "smollm2-135m-instruct"
STARTUP_TIMEOUT_S = 300
SYNC_TIMEOUT_S = 30
REPLICA_HEADER = "x-safesteer-replica"


class RayCluster:
    """Two `ray start --block` nodes, each in its own process group."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Unix socket paths must stay short: Ray's session folder goes in /tmp directly.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ssray-", dir="/tmp"))
        (
            self.gcs_port,
            self.http_port,
            *self.node_ports,
        ) = free_ports(2 + 2 * 7)
        self.env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ADDRESS": "",
            "PYTHONPATH": str(REPO / "deploy" / "ray"),
            "OMP_NUM_THREADS": "1",
        }
        self.nodes: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _ports(self, index: int) -> list[str]:
        ports = self.node_ports[index * 7 : index * 7 + 7]
        names = [
            "--node-manager-port", "--object-manager-port", "--metrics-export-port",
            "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port",
            "--runtime-env-agent-port", "--ray-client-server-port",
        ]  # fmt: skip
        flags = [f"{name}={port}" for name, port in zip(names, ports, strict=True)]
        return flags if index == 0 else flags[:-1]  # the client server runs on the head

    def start_node(self, index: int) -> None:
        common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        if index == 0:
            role = [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
            ]
        else:
            role = [f"--address={self.address}"]
        log = (self.folder / f"node{index}.log").open("wb")
        self.nodes.append(
            subprocess.Popen(
                [str(RAY_BIN / "ray"), "start", "--block", *role, *common, *self._ports(index)],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one, by id
            )
        )

    def wait_for_nodes(self, count: int) -> None:
        code = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    pytest.fail(f"a Ray node exited early; see {self.folder}")
            result = run([RAY_BIN / "python", "-c", code, self.address], env=self.env, check=False)
            if result.returncode == 0 and result.stdout.strip().endswith(str(count)):
                return
            time.sleep(2)
        pytest.fail(f"Ray did not reach {count} nodes; see {self.folder}")

    def wait_for_app(self, name: str) -> None:
        """Until Serve reports the application RUNNING: every replica started, not just one
        (the proxy answers as soon as the first replica is up)."""
        code = (
            "import ray, sys; from ray import serve; "
            "ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "app = serve.status().applications.get(sys.argv[2]); "
            "print(getattr(app.status, 'value', app.status) if app else 'MISSING')"
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = ""
        while time.monotonic() < deadline:
            result = run(
                [RAY_BIN / "python", "-c", code, self.address, name], env=self.env, check=False
            )
            status = result.stdout.strip()
            if status.startswith("RUNNING"):
                return
            if status.startswith("DEPLOY_FAILED"):
                break
            time.sleep(3)
        pytest.fail(f"Serve application {name}: {status}; logs in {self.temp_dir}")

    def stop(self) -> None:
        """SIGTERM each node's process group (the groups of processes this test started),
        then SIGKILL what is left of them."""
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=20)
        time.sleep(1)
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The Serve app from deploy/ray on two nodes; yields its URL, keys and adapter ids."""
    if not (RAY_BIN / "ray").exists():
        pytest.fail("deploy/.venv-ray is missing: run deploy/ci/setup.sh")
    folder = tmp_path_factory.mktemp("ray")
    keys = folder / "keys.toml"
    admin_key = new_key(keys, "ci-admin", "admin")
    client_key = new_key(keys, "ci-client", "client")
    adapters = folder / "adapters" / FAMILY
    adapters.mkdir(parents=True)
    builtin = REPO / "adapters" / FAMILY / "safety.safetensors"
    shutil.copy(builtin, adapters / "safety.safetensors")
    # A second adapter of the family for the swap: the built-in one, 1.5 times as strong.
    code = (
        "import sys; from safesteer.adapters.adapter import SafetyAdapter as A; "
        "a = A.load(sys.argv[1]); s = a * 1.5; s.save(sys.argv[2]); print(a.id, s.id)"
    )
    ids = run([RAY_BIN / "python", "-c", code, builtin, adapters / "strong.safetensors"])
    builtin_id, strong_id = ids.stdout.split()
    registry = folder / "registry.toml"
    registry.write_text(
        f'adapter_dir = "{folder / "adapters"}"\n\n[[models]]\nname = "{MODEL}"\n'
        f'source = "{MODEL}"\n\n[[families]]\nfamily = "{FAMILY}"\n'
        f'adapters = ["{FAMILY}/safety.safetensors"]\n'
    )

    cluster = RayCluster(folder)
    config = yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": cluster.http_port}
    app = config["applications"][0]
    app["args"]["settings"] = {
        "config": str(registry),
        "keys_file": str(keys),
        "state_dir": str(folder / "state"),
        "threads": 1,
    }
    config_file = folder / "serve_config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    try:
        cluster.start_node(0)
        cluster.wait_for_nodes(1)
        cluster.start_node(1)
        cluster.wait_for_nodes(2)
        print(f"\n[deploy] two Ray nodes up in {time.monotonic() - started:.0f} s")
        run(
            [RAY_BIN / "serve", "run", "--non-blocking", "--address", cluster.address,
             config_file],
            env=cluster.env,
            timeout=STARTUP_TIMEOUT_S,
        )  # fmt: skip
        url = f"http://127.0.0.1:{cluster.http_port}"
        cluster.wait_for_app(app["name"])
        wait_until_ready(url, folder)
        print(f"[deploy] Serve app ready in {time.monotonic() - started:.0f} s")
        yield {
            "url": url,
            "admin_key": admin_key,
            "client_key": client_key,
            "builtin_id": builtin_id,
            "strong_id": strong_id,
            "state_dir": folder / "state",
        }
    finally:
        cluster.stop()


def wait_until_ready(url: str, folder: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"the Serve app was not ready in {STARTUP_TIMEOUT_S} s; logs in {folder}")


def chat_round(app: dict[str, Any], count: int) -> list[tuple[str, str]]:
    """`count` chat completions, 4 at a time: (replica, adapter id) of each."""
    client = openai.OpenAI(
        base_url=f"{app['url']}/v1", api_key=app["client_key"], max_retries=0, timeout=120
    )

    def one(i: int) -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {i % 5 + 2}."}],
            max_tokens=6,
            temperature=0,
        )
        reply = raw.parse()
        return raw.headers[REPLICA_HEADER], (reply.model_extra or {})["safety"]["adapter"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(count)))


def admin(app: dict[str, Any], method: str, route: str, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {app['admin_key']}"}
    return httpx.request(method, f"{app['url']}{route}", headers=headers, json=body or None,
                         timeout=60)  # fmt: skip


def wait_for_sync(app: dict[str, Any], replicas: set[str], version: int) -> dict[str, Any]:
    """Poll /admin/sync (each call lands on some replica) until every replica has applied
    `version`; returns the last state seen per replica."""
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while time.monotonic() < deadline:
        state = admin(app, "GET", "/admin/sync").json()
        seen[state["replica"]] = state
        if set(seen) >= replicas and all(seen[r]["version"] >= version for r in replicas):
            return seen
        time.sleep(0.2)
    pytest.fail(f"replicas did not all reach version {version}: {json.dumps(seen)}")


def test_two_replicas_answer_and_an_adapter_swap_reaches_both(ray_app: dict[str, Any]) -> None:
    before = chat_round(ray_app, 10)
    replicas = {replica for replica, _ in before}
    print(f"[deploy] before the swap: {Counter(r for r, _ in before)}")
    assert len(replicas) == 2, f"the proxy sent every request to one replica: {before}"
    assert {adapter for _, adapter in before} == {ray_app["builtin_id"]}

    started = time.monotonic()
    loaded = admin(ray_app, "POST", "/admin/adapters/load", path=f"{FAMILY}/strong.safetensors")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["id"] == ray_app["strong_id"]
    wait_for_sync(ray_app, replicas, 1)
    activated = admin(
        ray_app, "POST", f"/admin/families/{FAMILY}/activate", adapter=ray_app["strong_id"]
    )
    assert activated.status_code == 200, activated.text
    handled_by = activated.headers[REPLICA_HEADER]
    synced = wait_for_sync(ray_app, replicas, 2)
    print(f"[deploy] load + activate reached both replicas in {time.monotonic() - started:.1f} s")
    active = {adapter for state in synced.values() for adapter in state["active"].values()}
    assert active == {ray_app["strong_id"]}

    after = chat_round(ray_app, 10)
    print(f"[deploy] after the swap: {Counter(r for r, _ in after)}")
    assert {adapter for _, adapter in after} == {ray_app["strong_id"]}
    assert {replica for replica, _ in after} == replicas
    # The replica that did not handle the activation applied it from AdapterSync, audited.
    audit = [
        json.loads(line) for line in (ray_app["state_dir"] / "audit.jsonl").read_text().splitlines()
    ]
    synced_activations = [
        e for e in audit if e["actor"] == "ray-sync" and e["action"] == "activate"
    ]
    assert synced_activations and all(e["outcome"] == "ok" for e in synced_activations)
    assert handled_by in replicas
