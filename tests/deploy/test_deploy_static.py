"""Static deploy checks: hadolint, yamllint, the rendered Kubernetes manifests validated
strictly, the Ray Serve configs against Ray's own schema, and `docker-compose config`."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import RAY_BIN, REPO, new_key, run, tool

pytestmark = pytest.mark.deploy
K8S = REPO / "deploy" / "k8s"


def test_hadolint_passes_the_dockerfile() -> None:
    run([tool("hadolint"), "--failure-threshold", "info", REPO / "Dockerfile"])


def test_yamllint_passes_deploy() -> None:
    run([tool("yamllint"), "--strict", "-c", REPO / "deploy" / "yamllint.yaml", REPO / "deploy"])


def render(kustomization: Path) -> list[dict[str, Any]]:
    output = run([tool("kubectl"), "kustomize", kustomization]).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def validate(documents: list[dict[str, Any]], tmp_path: Path, name: str) -> None:
    rendered = tmp_path / f"{name}.yaml"
    rendered.write_text(yaml.safe_dump_all(documents))
    result = run([tool("kubernetes-validate"), "--strict", "--quiet", rendered], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def k8s_tree(tmp_path: Path) -> Path:
    """deploy/k8s copied, with a generated keys.toml for the example overlay."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    new_key(tree / "overlays" / "example" / "keys.toml", "ci-admin", "admin")
    return tree


def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in documents}


def test_kustomize_base_renders_and_validates(k8s_tree: Path, tmp_path: Path) -> None:
    documents = render(k8s_tree / "base")
    validate(documents, tmp_path, "base")
    kinds = by_kind(documents)
    assert set(kinds) >= {
        "Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim",
        "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceAccount",
    }  # fmt: skip
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The generated (hash-suffixed) names are the ones the pod mounts.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == kinds["Secret"]["metadata"]["name"]
    assert volumes["registry"]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]


def test_kustomize_example_overlay_renders_and_validates(k8s_tree: Path, tmp_path: Path) -> None:
    documents = render(k8s_tree / "overlays" / "example")
    validate(documents, tmp_path, "overlay")
    kinds = by_kind(documents)
    assert all(
        doc["metadata"].get("namespace") == "safesteer"
        for doc in documents
        if doc["kind"] != "Namespace"
    )
    image = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/safesteer:0.1.0"
    keys = kinds["Secret"]["data"]["keys.toml"]
    assert "placeholder" not in base64.b64decode(keys).decode()


def ray_schema_check(config: dict[str, Any]) -> None:
    """Validate a Serve config with Ray's own schema (in deploy/.venv-ray)."""
    python = RAY_BIN / "python"
    if not python.exists():
        pytest.fail("deploy/.venv-ray is missing: run deploy/ci/setup.sh")
    code = (
        "import json, sys; from ray.serve.schema import ServeDeploySchema; "
        "ServeDeploySchema.model_validate(json.load(sys.stdin)); print('ok')"
    )
    result = subprocess.run(
        [str(python), "-c", code], input=json.dumps(config), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_serve_config_matches_ray_schema() -> None:
    ray_schema_check(yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text()))


def test_rayservice_manifest(tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all((REPO / "deploy" / "ray" / "rayservice.yaml").read_text()))
    kinds = by_kind(documents)
    service = kinds["RayService"]["spec"]
    ray_schema_check(yaml.safe_load(service["serveConfigV2"]))
    # No schema for the CRD here: check its pod templates as core PodTemplates instead.
    cluster = service["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]
    pod_templates = [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"},
         "template": template}
        for i, template in enumerate(templates)
    ]  # fmt: skip
    validate([kinds["ConfigMap"], *pod_templates], tmp_path, "rayservice")
    head_env = {e["name"]: e["value"] for e in templates[0]["spec"]["containers"][0]["env"]}
    assert head_env["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] == "0"
    assert cluster["authOptions"]["mode"] == "token"


def test_compose_config_is_valid(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    new_key(keys, "ci", "client")
    run(
        [tool("docker-compose"), "-f", REPO / "deploy" / "compose.yaml", "config", "-q"],
        env={"SAFESTEER_KEYS": str(keys)},
    )
