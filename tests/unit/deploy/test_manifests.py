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

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from deploy.cli import parser
from deploy.config_doc import SECTIONS
from processors.settings import WorkerSettings
from query_api.settings import ApiSettings
from tests.unit.deploy.kustomize import kustomize_build

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
REPO = DEPLOY.parent
K8S = DEPLOY / "k8s"

# The image built from deploy/Dockerfile is called `tally` (any registry prefix).
BUILT_IMAGE = "tally"
BUILT_DEFAULT_ARGV = ["tally", "api"]  # the Dockerfile's ENTRYPOINT + CMD
# Third-party images: pinned here, and what they listen on by default (images
# whose ports come from their environment, like Kafka's listeners, say None).
ALLOWED_IMAGES: dict[str, tuple[str, set[int] | None]] = {
    "apache/kafka": ("4.3.0", None),
    "clickhouse/clickhouse-server": ("25.8", {8123, 9000}),
    "prom/prometheus": ("v3.5.0", {9090}),
}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# --------------------------------------------------------------------- helpers


def known_settings() -> set[str]:
    return {f"TALLY_{name.upper()}" for _, cls in SECTIONS for name in cls.model_fields}


def env_file_keys(path: Path) -> set[str]:
    keys = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            keys.add(line.split("=", 1)[0].strip())
    return keys


def split_image(image: str) -> tuple[str, str | None]:
    """('apache/kafka', '4.3.0') from 'apache/kafka:4.3.0'; a registry port is no tag."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, None
    return name, tag


def is_built(image: str) -> bool:
    return split_image(image)[0].rsplit("/", 1)[-1] == BUILT_IMAGE


def check_image(where: str, image: str) -> list[str]:
    name, tag = split_image(image)
    if "$" in image:
        return [f"{where}: image {image!r} is not fixed in the file"]
    if tag in (None, "", "latest"):
        return [f"{where}: image {image!r} needs an explicit tag, not latest"]
    if is_built(image):
        return []
    if name not in ALLOWED_IMAGES:
        return [f"{where}: image {image!r} is neither built from deploy/Dockerfile nor allowed"]
    if ALLOWED_IMAGES[name][0] != tag:
        return [f"{where}: image {image!r}: the allow-list pins {ALLOWED_IMAGES[name][0]}"]
    return []


def argv_of(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(part) for part in value]


def subcommands() -> set[str]:
    for action in parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("deploy/cli.py has no subcommands")


def check_command(where: str, argv: list[str]) -> list[str]:
    """A command run in the tally image: `tally <sub> ...` or `python -m <module> ...`."""
    if argv[:1] == ["tally"]:
        if len(argv) < 2 or argv[1] not in subcommands():
            return [f"{where}: {shlex.join(argv)!r} is not a subcommand of deploy/cli.py"]
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parser().parse_args(argv[1:])
            except SystemExit:
                return [f"{where}: {shlex.join(argv)!r}: {err.getvalue().strip()}"]
        return []
    if argv[:2] == ["python", "-m"] and len(argv) > 2:
        if importlib.util.find_spec(argv[2]) is None:
            return [f"{where}: module {argv[2]} does not exist"]
        return []
    return [f"{where}: {shlex.join(argv)!r} is neither `tally <sub>` nor `python -m <module>`"]


_ADDRESS = re.compile(r"(?:(?:https?|tcp)://)?(?:[^\s/@'\"]*@)?([A-Za-z0-9_.-]+):(\d{1,5})\b")


def addresses(text: str) -> list[tuple[str, int]]:
    return [(host, int(port)) for host, port in _ADDRESS.findall(text)]


def address_values(env: dict[str, str]) -> Iterator[tuple[str, str, int]]:
    """(variable, host, port) of every TALLY_*BOOTSTRAP and TALLY_*URL value."""
    for name, value in env.items():
        if not name.startswith("TALLY_") or not value:
            continue
        if name.endswith("BOOTSTRAP"):
            for address in value.split(","):
                host, _, port = address.strip().rpartition(":")
                yield name, host, int(port) if port.isdigit() else -1
        elif name.endswith("_URL"):
            parsed = urlparse(value)
            if parsed.scheme in ("http", "https"):
                port = parsed.port or (8443 if parsed.scheme == "https" else 8123)
                yield name, parsed.hostname or "", port


def api_port(env: dict[str, str]) -> int:
    return int(env.get("TALLY_API_PORT", ApiSettings.model_fields["api_port"].default))


def built_listens(argv: list[str], env: dict[str, str]) -> set[int]:
    """Ports a `tally` process of the built image serves to other containers."""
    if argv[:2] == ["tally", "api"]:
        return {api_port(env)}
    port = env.get("TALLY_METRICS_PORT")
    host = env.get("TALLY_METRICS_HOST", WorkerSettings.model_fields["metrics_host"].default)
    if argv[:2] in (["tally", "worker"], ["tally", "sink"]) and port and host not in LOOPBACK:
        return {int(port)}  # processors/metrics.py serve_metrics
    return set()


# --------------------------------------------------------------------- compose


def load_compose(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def interpolated(value: str) -> str:
    """A compose value as the container sees it: defaults filled, required ones 'x'."""

    def one(match: re.Match[str]) -> str:
        _, sep, rest = match.group(1).partition(":")
        return rest[1:] if sep and rest.startswith("-") else "x"

    return re.sub(r"(?<!\$)\$\{([^}]*)\}", one, value)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolated(str(v)) for k, v in env.items()}


def compose_argv(service: dict[str, Any]) -> list[str]:
    entrypoint = argv_of(service.get("entrypoint")) if "entrypoint" in service else None
    command = argv_of(service.get("command")) if "command" in service else None
    if entrypoint is None:
        entrypoint = BUILT_DEFAULT_ARGV[:1]
        # Docker: a new entrypoint drops the image's CMD; otherwise CMD is the default.
        return entrypoint + (command if command is not None else BUILT_DEFAULT_ARGV[1:])
    return entrypoint + (command or [])


def compose_listens(service: dict[str, Any]) -> set[int]:
    image = str(service.get("image", ""))
    env = compose_env(service)
    if is_built(image):
        return built_listens(compose_argv(service), env)
    name, _ = split_image(image)
    defaults = ALLOWED_IMAGES.get(name, ("", set()))[1]
    if defaults is not None:
        return set(defaults)
    # apache/kafka: the ports of KAFKA_LISTENERS (PLAINTEXT://:9092,CONTROLLER://:9093).
    return {port for _, port in addresses(env.get("KAFKA_LISTENERS", "").replace("://:", "://x:"))}


def healthcheck_argv(service: dict[str, Any]) -> list[str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    if test is None:
        return None
    argv = argv_of(test)
    if argv[:1] == ["CMD"]:
        return argv[1:]
    if argv[:1] == ["CMD-SHELL"]:
        return shlex.split(" ".join(argv[1:]))
    return argv


def compose_image_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name, service in doc["services"].items():
        where = f"compose service {name}"
        if "build" in service:
            build = service["build"]
            dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
            if dockerfile != DEPLOY / "Dockerfile":
                problems.append(f"{where}: builds {dockerfile}, not deploy/Dockerfile")
            if not is_built(str(service.get("image", ""))):
                problems.append(f"{where}: a built image must be named {BUILT_IMAGE}")
        if "image" not in service:
            problems.append(f"{where}: no image")
            continue
        problems += check_image(where, str(service["image"]))
    return problems


def compose_env_problems(text: str, doc: dict[str, Any], env_example: set[str]) -> list[str]:
    settings = known_settings()
    problems = []
    for var in re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text):
        if var not in settings and var not in env_example:
            problems.append(f"compose: ${{{var}}} is neither a setting nor in .env.example")
    for name, service in doc["services"].items():
        for var in compose_env(service):
            if var.startswith("TALLY_") and var not in settings:
                problems.append(f"compose service {name}: {var} is not a Tally setting")
    return problems


def compose_port_problems(doc: dict[str, Any]) -> list[str]:
    services: dict[str, Any] = doc["services"]
    problems = []

    def target(where: str, source: str, host: str, port: int) -> None:
        name = source if host in LOOPBACK else host
        if name not in services:
            problems.append(f"{where}: {host}:{port} is no service of the compose file")
        elif port not in compose_listens(services[name]):
            problems.append(f"{where}: {name} does not listen on {port}")

    for name, service in services.items():
        argv = healthcheck_argv(service)
        if service.get("restart") != "no" and argv is None:
            problems.append(f"compose service {name}: long-running but no healthcheck")
        for host, port in addresses(" ".join(argv or [])):
            target(f"compose service {name} healthcheck", name, host, port)
        for var, host, port in address_values(compose_env(service)):
            target(f"compose service {name} {var}", name, host, port)
        for mapping in service.get("ports") or []:
            container = int(str(mapping).rsplit(":", 1)[-1].split("/")[0])
            if container not in compose_listens(service):
                problems.append(f"compose service {name}: publishes {container}, not listened on")
        for exposed in service.get("expose") or []:
            if int(str(exposed).split("/")[0]) not in compose_listens(service):
                problems.append(f"compose service {name}: exposes {exposed}, not listened on")
    return problems


def compose_command_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name, service in doc["services"].items():
        if not is_built(str(service.get("image", ""))):
            continue
        problems += check_command(f"compose service {name}", compose_argv(service))
        argv = healthcheck_argv(service)
        if argv:
            problems += check_command(f"compose service {name} healthcheck", argv)
    return problems


# ------------------------------------------------------------------ kubernetes


def k8s_docs(files: list[Path]) -> list[dict[str, Any]]:
    return [
        doc
        for path in files
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and "kind" in doc and doc["kind"] != "Kustomization"
    ]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, pod labels, pod spec) of every workload."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            template = doc["spec"]["template"]
            labels = template.get("metadata", {}).get("labels", {})
            yield f"{doc['kind']} {doc['metadata']['name']}", labels, template["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def k8s_env(
    container: dict[str, Any], docs: list[dict[str, Any]], secret_keys: set[str]
) -> dict[str, str]:
    """The container's environment as far as the manifests say (secrets: '')."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update({k: str(v) for k, v in maps[source["configMapRef"]["name"]].items()})
        if "secretRef" in source:
            env.update(dict.fromkeys(secret_keys, ""))
    for item in container.get("env", []):
        env[item["name"]] = str(item.get("value", ""))
    return env


def k8s_argv(container: dict[str, Any]) -> list[str]:
    if "command" in container:
        return argv_of(container["command"]) + argv_of(container.get("args"))
    return BUILT_DEFAULT_ARGV[:1] + (argv_of(container.get("args")) or BUILT_DEFAULT_ARGV[1:])


def k8s_listens(container: dict[str, Any], env: dict[str, str]) -> set[int]:
    if is_built(container["image"]):
        return built_listens(k8s_argv(container), env)
    return set()


def k8s_image_problems(docs: list[dict[str, Any]], kustomization: dict[str, Any]) -> list[str]:
    problems = []
    for name, _, spec in pod_specs(docs):
        for container in containers(spec):
            problems += check_image(f"{name}/{container['name']}", container["image"])
    for item in kustomization.get("images", []):
        image = f"{item.get('newName', item['name'])}:{item.get('newTag', '')}"
        problems += check_image(f"kustomization image {item['name']}", image)
    return problems


def k8s_env_problems(docs: list[dict[str, Any]], secret_keys: set[str]) -> list[str]:
    settings = known_settings()
    problems = []
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            for var in doc.get("data", {}):
                if var.startswith("TALLY_") and var not in settings:
                    problems.append(f"ConfigMap {doc['metadata']['name']}: {var} is not a setting")
    for var in secret_keys:
        if var.startswith("TALLY_") and var not in settings:
            problems.append(f"secrets.env.example: {var} is not a setting")
    for name, _, spec in pod_specs(docs):
        for container in containers(spec):
            for item in container.get("env", []):
                if item["name"].startswith("TALLY_") and item["name"] not in settings:
                    problems.append(f"{name}: {item['name']} is not a setting")
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in secret_keys:
                    problems.append(f"{name}: secret key {ref['key']} is not in secrets.env")
    return problems


def k8s_port_problems(docs: list[dict[str, Any]], secret_keys: set[str]) -> list[str]:
    problems = []
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    pods = list(pod_specs(docs))
    for name, _, spec in pods:
        for container in containers(spec):
            env = k8s_env(container, docs, secret_keys)
            listens = k8s_listens(container, env)
            named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            where = f"{name}/{container['name']}"
            for port in named.values():
                if port not in listens:
                    problems.append(f"{where}: containerPort {port} is not listened on")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                http = container.get(probe, {}).get("httpGet")
                if http is None:
                    continue
                port = named.get(http["port"], http["port"])
                if port not in listens:
                    problems.append(f"{where}: {probe} port {http['port']} is not listened on")
            for var, host, port in address_values(env):
                if port < 0:
                    problems.append(f"{where}: {var} has an address without a port")
                elif host.split(".")[0] in services:
                    ports = {p["port"] for p in services[host.split(".")[0]]["spec"]["ports"]}
                    if port not in ports:
                        problems.append(f"{where}: {var} port {port} is not a Service port")
    for service_name, service in services.items():
        selector = service["spec"]["selector"]
        chosen = [s for _, labels, s in pods if selector.items() <= labels.items()]
        if not chosen:
            problems.append(f"Service {service_name}: selects no pods")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for spec in chosen:
                found = False
                for container in containers(spec):
                    env = k8s_env(container, docs, secret_keys)
                    for p in container.get("ports", []):
                        if target in (p.get("name"), p["containerPort"]):
                            found = p["containerPort"] in k8s_listens(container, env)
                if not found:
                    problems.append(f"Service {service_name}: targetPort {target} not listened on")
    return problems


def k8s_command_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for name, _, spec in pod_specs(docs):
        for container in containers(spec):
            if is_built(container["image"]):
                problems += check_command(f"{name}/{container['name']}", k8s_argv(container))
    return problems


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
