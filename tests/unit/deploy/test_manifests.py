"""The deploy manifests (deploy/compose.yaml, deploy/k8s/) against the code they run.

No Docker engine or Kubernetes cluster runs here, so the checks are static, on
deploy/k8s as the real kustomize builds it (tests/unit/deploy/kustomize.py): the
YAML parses; images are ours (deploy/Dockerfile) or pinned; every TALLY_* name
is a real setting; every port a probe, healthcheck, Service or address points at
is one its target listens on; every command is a real `tally` subcommand or
module. Each checker returns a list of problems, and each is also fed a broken
snippet to prove it can fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.deploy.kustomize import kustomize_build
from tests.unit.deploy.manifest_checks import (
    DEPLOY,
    K8S,
    check_command,
    compose_argv,
    compose_command_problems,
    compose_env_problems,
    compose_image_problems,
    compose_listens,
    compose_port_problems,
    containers,
    env_file_keys,
    is_built,
    k8s_argv,
    k8s_command_problems,
    k8s_env_problems,
    k8s_image_problems,
    k8s_port_problems,
    load_compose,
    pod_specs,
)

# ----------------------------------------------------------------------- tests


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (DEPLOY / "compose.yaml").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    return load_compose(compose_text)


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    doc = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/k8s` applies: kustomize's output."""
    return [
        doc
        for doc in yaml.safe_load_all(kustomize_build())
        if isinstance(doc, dict) and "kind" in doc
    ]


@pytest.fixture(scope="module")
def secret_keys() -> set[str]:
    return env_file_keys(K8S / "secrets.env.example")


def test_every_yaml_under_deploy_parses() -> None:
    files = yaml_files()
    assert DEPLOY / "compose.yaml" in files
    assert K8S / "kustomization.yaml" in files
    for path in files:
        assert list(yaml.safe_load_all(path.read_text(encoding="utf-8"))), path
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load("services:\n  api:\n image: [tally")


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    listed = {K8S / name for name in kustomization["resources"]}
    on_disk = {p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk
    generated = kustomization["secretGenerator"][0]
    assert generated["name"] == "tally-secrets"
    assert generated["envs"] == ["secrets.env"]  # from secrets.env.example


# images


def test_images_are_built_or_pinned(
    compose: dict[str, Any], manifests: list[dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    assert compose_image_problems(compose) == []
    assert k8s_image_problems(manifests, kustomization) == []


@pytest.mark.parametrize(
    ("image", "why"),
    [
        ("redis:7.2", "neither built"),
        ("apache/kafka:latest", "explicit tag"),
        ("apache/kafka", "explicit tag"),
        ("apache/kafka:3.9.0", "pins 4.3.0"),
        ("tally", "explicit tag"),
        ("${IMAGE}", "not fixed"),
    ],
)
def test_the_image_check_can_fail(image: str, why: str) -> None:
    (problem,) = compose_image_problems({"services": {"x": {"image": image}}})
    assert why in problem


def test_a_built_service_must_use_deploy_dockerfile() -> None:
    service = {"image": "tally:local", "build": {"context": "..", "dockerfile": "Dockerfile"}}
    assert compose_image_problems({"services": {"x": service}})


# environment names


def test_every_variable_is_a_setting_or_in_env_example(
    compose_text: str,
    compose: dict[str, Any],
    manifests: list[dict[str, Any]],
    secret_keys: set[str],
) -> None:
    example = env_file_keys(DEPLOY / ".env.example")
    assert compose_env_problems(compose_text, compose, example) == []
    assert k8s_env_problems(manifests, secret_keys) == []
    # and the guards for the secrets are there
    assert "${TALLY_ADMIN_KEY:?" in compose_text
    assert "${CLICKHOUSE_PASSWORD:?" in compose_text


def test_the_variable_check_can_fail() -> None:
    text = (
        "services:\n  x:\n    image: tally:1\n    environment:\n      TALLY_NOPE: ${UNSET_THING}\n"
    )
    problems = compose_env_problems(text, load_compose(text), set())
    assert len(problems) == 2
    configmap = {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"TALLY_KAFKA_BOOT": ""}}
    assert k8s_env_problems([configmap], {"TALLY_ADMIN_KEYS"}) != []
    assert len(k8s_env_problems([configmap], {"TALLY_ADMIN_KEYS"})) == 2


# ports


def test_every_port_referenced_is_listened_on(
    compose: dict[str, Any], manifests: list[dict[str, Any]], secret_keys: set[str]
) -> None:
    assert compose_port_problems(compose) == []
    assert k8s_port_problems(manifests, secret_keys) == []


def test_ports_are_derived_from_the_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert compose_listens(services["kafka"]) == {9092, 9093}
    assert compose_listens(services["api"]) == {8000}
    assert compose_listens(services["worker"]) == {9464}  # metrics
    assert compose_listens(services["migrate"]) == set()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (("worker", "healthcheck", "test"), "does not listen on 9999"),
        (("sink", "environment", "TALLY_KAFKA_BOOTSTRAP"), "does not listen on 9999"),
        (("api", "environment", "TALLY_API_PORT"), "not listened on"),
        (("worker", "healthcheck", None), "no healthcheck"),
    ],
)
def test_the_compose_port_check_can_fail(
    compose: dict[str, Any], change: tuple[str, str, str | None], why: str
) -> None:
    broken = yaml.safe_load(yaml.safe_dump(compose))
    service, key, field = change
    if field is None:
        del broken["services"][service][key]
    elif key == "healthcheck":
        broken["services"][service][key][field] = [
            "CMD",
            "python",
            "-m",
            "deploy.healthcheck",
            "tcp://kafka:9999",
        ]
    elif field == "TALLY_API_PORT":
        broken["services"][service][key][field] = "8080"  # published 8000 no longer served
    else:
        broken["services"][service][key][field] = "kafka:9999"
    assert any(why in p for p in compose_port_problems(broken))


def _api_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "tally-api"
    )


@pytest.mark.parametrize("breakage", ["probe", "service", "configmap", "address"])
def test_the_k8s_port_check_can_fail(
    manifests: list[dict[str, Any]], secret_keys: set[str], breakage: str
) -> None:
    docs = yaml.safe_load(yaml.safe_dump(manifests))
    api = _api_deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    if breakage == "probe":
        api["readinessProbe"]["httpGet"]["port"] = 8001
    elif breakage == "service":
        service = next(d for d in docs if d["kind"] == "Service")
        service["spec"]["ports"][0]["targetPort"] = 8080
    elif breakage == "configmap":
        config = next(d for d in docs if d["kind"] == "ConfigMap")
        config["data"]["TALLY_API_PORT"] = "9000"  # containerPort and probes still say 8000
    else:
        config = next(d for d in docs if d["kind"] == "ConfigMap")
        config["data"]["TALLY_KAFKA_BOOTSTRAP"] = "tally-api:9092"  # a Service, wrong port
    assert k8s_port_problems(docs, secret_keys) != []


# commands


def test_every_command_is_real(compose: dict[str, Any], manifests: list[dict[str, Any]]) -> None:
    assert compose_command_problems(compose) == []
    assert k8s_command_problems(manifests) == []
    roles = {compose_argv(s)[1] for s in compose["services"].values() if is_built(s["image"])}
    assert {"worker", "sink", "api", "migrate"} <= roles


@pytest.mark.parametrize(
    "argv",
    [
        ["tally", "wrker"],
        ["tally"],
        ["tally", "loadgen", "--no-such-flag"],
        ["python", "-m", "deploy.no_such_module"],
        ["sh", "-c", "tally worker"],
    ],
)
def test_the_command_check_can_fail(argv: list[str]) -> None:
    assert check_command("x", argv) != []


# what the manifests must say


def test_sinks_as_the_topology_test_runs_them(manifests: list[dict[str, Any]]) -> None:
    """Two fenced sinks (tests/e2e/test_topology.py runs `--sinks 2`); the fence, not
    the rollout, keeps them exact, so a rolling update may overlap old and new pods,
    and voluntary disruptions take one at a time."""
    sink = next(
        d for d in manifests if d["kind"] == "Deployment" and d["metadata"]["name"] == "tally-sink"
    )
    assert sink["spec"]["replicas"] == 2
    assert sink["spec"]["strategy"]["type"] == "RollingUpdate"
    (container,) = sink["spec"]["template"]["spec"]["containers"]
    assert k8s_argv(container) == ["tally", "sink"]
    (pdb,) = [
        d
        for d in manifests
        if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "tally-sink"
    ]
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": sink["spec"]["selector"]["matchLabels"]},
    }


def test_api_probes_use_readyz_and_healthz(manifests: list[dict[str, Any]]) -> None:
    (api,) = _api_deployment(manifests)["spec"]["template"]["spec"]["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_no_kafka_or_clickhouse_inside_the_k8s_manifests(manifests: list[dict[str, Any]]) -> None:
    for name, _, spec in pod_specs(manifests):
        for container in containers(spec):
            assert is_built(container["image"]), name
