"""deploy/ checked as an operator would, with real validators, plus what they cannot see.

- deploy/k8s: built by the real kustomize (tests/unit/deploy/kustomize.py) and
  every object validated strictly against the Kubernetes schemas that
  kubernetes-validate ships (unknown fields are errors).
- deploy/compose.yaml: `check-jsonschema --builtin-schema vendor.compose-spec`,
  and the same schema over the file as compose interpolates it.
- Secrets: each process receives only the secrets it reads.
- Metrics: every process whose metrics the Grafana dashboard reads is scraped.
- The Docker build context (deploy/Dockerfile.dockerignore) holds no secret.
- No immutable one-shot: topics and migrate run in init containers, not Jobs.

Each check returns a list of problems and is also fed a broken input.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import jsonschema
import kubernetes_validate
import pytest
import yaml
from docker.utils.build import exclude_paths
from prometheus_client import CollectorRegistry

from processors.metrics import PipelineCollector
from processors.sink import SinkStats
from processors.stats import WorkerStats
from query_api.metrics import REQUEST_SECONDS
from tests.unit.deploy.kustomize import K8S, kustomize_build
from tests.unit.deploy.manifest_checks import (
    DEPLOY,
    compose_argv,
    compose_listens,
    containers,
    env_file_keys,
    interpolated,
    is_built,
    k8s_argv,
    k8s_env,
    k8s_listens,
    pod_specs,
)

REPO = DEPLOY.parent
COMPOSE = DEPLOY / "compose.yaml"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"

# The secrets there are, by what they open, and which process reads which.
K8S_SECRET_KIND = {
    "TALLY_CLICKHOUSE_URL": "store",
    "SINK_CLICKHOUSE_URL": "store",
    "TALLY_ADMIN_KEY": "admin",
    "TALLY_WEBHOOK_SECRET_KEY": "webhooks",
}
COMPOSE_SECRET_KIND = {
    "CLICKHOUSE_PASSWORD": "store",
    "TALLY_ADMIN_KEY": "admin",
    "TALLY_WEBHOOK_SECRET_KEY": "webhooks",
}
# The API encrypts webhook signing secrets, the sink (which delivers) decrypts them.
READS = {
    "api": {"store", "admin", "webhooks"},
    "sink": {"store", "webhooks"},
    "migrate": {"store"},
    "worker": set(),
    "topics": set(),
}


def role(argv: list[str]) -> str:
    """`tally sink` -> sink; `python -m deploy.topics` -> topics."""
    if argv[:2] == ["python", "-m"]:
        return argv[2].rsplit(".", 1)[-1]
    return argv[1] if len(argv) > 1 else "?"


@functools.cache
def _built() -> str:
    return kustomize_build()


def rendered() -> list[dict[str, Any]]:
    """A fresh parse each time: the can-fail tests break their copy."""
    return [d for d in yaml.safe_load_all(_built()) if isinstance(d, dict)]


# ------------------------------------------------------------------ validators


def k8s_schema_problems(docs: list[dict[str, Any]]) -> list[str]:
    version = kubernetes_validate.latest_version()
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            problems.append(f"{name}: {exc.message} at {'.'.join(map(str, exc.path))}")
    return problems


def compose_schema() -> dict[str, Any]:
    files = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(files.joinpath("compose-spec.json").read_text("utf-8"))
    return schema


def interpolate_all(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: interpolate_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_all(v) for v in value]
    return interpolated(value) if isinstance(value, str) else value


def compose_schema_problems(path: Path) -> list[str]:
    """The compose-spec schema over the file as written and as compose interpolates it."""
    problems = []
    cli = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if cli.returncode != 0:
        problems.append(f"check-jsonschema: {cli.stdout.strip()} {cli.stderr.strip()}")
    doc = interpolate_all(yaml.safe_load(path.read_text(encoding="utf-8")))
    validator = jsonschema.Draft7Validator(compose_schema())
    problems += [f"interpolated: {e.message}" for e in validator.iter_errors(doc)]
    return problems


def test_kustomize_output_validates_strictly() -> None:
    docs = rendered()
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    ]
    assert all(d["metadata"].get("namespace") == "tally" for d in docs if d["kind"] != "Namespace")
    assert k8s_schema_problems(docs) == []


def test_the_k8s_validators_can_fail(tmp_path: Path) -> None:
    deployment = next(d for d in rendered() if d["kind"] == "Deployment")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["replica"] = typo["spec"].pop("replicas")  # unknown field: strict refuses it
    bad_port = json.loads(json.dumps(deployment))
    bad_port["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]
    assert len(k8s_schema_problems([typo, bad_port])) == 2
    # kustomize itself refuses a kustomization naming a file that is not there
    broken = tmp_path / "k8s"
    shutil.copytree(K8S, broken, ignore=shutil.ignore_patterns("secrets.env"))
    (broken / "worker.yaml").unlink()
    with pytest.raises(RuntimeError, match=r"worker\.yaml"):
        kustomize_build(broken)


def test_compose_matches_the_compose_spec_schema() -> None:
    assert compose_schema_problems(COMPOSE) == []


def test_the_compose_schema_check_can_fail(tmp_path: Path) -> None:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    doc["services"]["worker"]["restrat"] = "always"  # no such service attribute
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(doc), encoding="utf-8")
    problems = compose_schema_problems(broken)
    assert any(p.startswith("check-jsonschema") for p in problems)
    assert any("restrat" in p for p in problems if p.startswith("interpolated"))


# --------------------------------------------------------------------- secrets


def k8s_secret_problems(docs: list[dict[str, Any]], secret_keys: set[str]) -> list[str]:
    problems = []
    for name, _, spec in pod_specs(docs):
        for container in containers(spec):
            reads: set[str] = set()
            if any("secretRef" in source for source in container.get("envFrom", [])):
                reads |= secret_keys  # the whole Secret
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    reads.add(ref["key"])
            problems += _excess(
                f"{name}/{container['name']}", k8s_argv(container), reads, K8S_SECRET_KIND
            )
    return problems


def compose_secret_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name, service in doc["services"].items():
        if not is_built(str(service.get("image", ""))):
            continue  # ClickHouse takes its own password; Kafka and Prometheus none
        text = json.dumps(service.get("environment") or {})
        reads = {var for var in COMPOSE_SECRET_KIND if "${" + var in text}
        problems += _excess(
            f"compose service {name}", compose_argv(service), reads, COMPOSE_SECRET_KIND
        )
    return problems


def _excess(where: str, argv: list[str], reads: set[str], kinds: dict[str, str]) -> list[str]:
    unknown = reads - kinds.keys()
    if unknown:
        return [f"{where}: say what the secrets {sorted(unknown)} open (K8S_SECRET_KIND)"]
    allowed = READS.get(role(argv))
    if allowed is None:
        return [f"{where}: {argv} is a process READS does not know"]
    extra = sorted(key for key in reads if kinds[key] not in allowed)
    return [f"{where}: receives {extra}, which {role(argv)} never reads"] if extra else []


def test_each_process_receives_only_the_secrets_it_reads() -> None:
    secret_keys = env_file_keys(K8S / "secrets.env.example")
    assert secret_keys == K8S_SECRET_KIND.keys()
    docs = rendered()
    assert k8s_secret_problems(docs, secret_keys) == []
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert compose_secret_problems(compose) == []
    # and those that read them still get them
    api = next(s for n, _, s in pod_specs(docs) if n == "Deployment tally-api")
    keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in api["containers"][0]["env"]}
    assert keys == {"TALLY_CLICKHOUSE_URL", "TALLY_ADMIN_KEY", "TALLY_WEBHOOK_SECRET_KEY"}
    assert "${TALLY_ADMIN_KEY" in json.dumps(compose["services"]["api"]["environment"])
    assert "${CLICKHOUSE_PASSWORD" in json.dumps(compose["services"]["sink"]["environment"])


def test_the_secret_check_can_fail() -> None:
    secret_keys = set(K8S_SECRET_KIND)
    docs = rendered()
    worker = next(s for n, _, s in pod_specs(docs) if n == "Deployment tally-worker")
    worker["containers"][0]["envFrom"].append({"secretRef": {"name": "tally-secrets"}})
    (problem,) = k8s_secret_problems(docs, secret_keys)
    assert "tally-worker/worker" in problem
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    compose["services"]["worker"]["environment"]["TALLY_CLICKHOUSE_URL"] = "${CLICKHOUSE_PASSWORD}"
    compose["services"]["sink"]["environment"]["TALLY_ADMIN_KEY"] = "${TALLY_ADMIN_KEY}"
    assert len(compose_secret_problems(compose)) == 2


# --------------------------------------------------------------------- metrics


def exported_by_role() -> dict[str, set[str]]:
    """Metric names (with suffixes) each process exports at its /metrics."""
    sink = SimpleNamespace(stats=SinkStats())
    sink.stats.reflected_ms[0] = int(time.time() * 1000)
    worker = SimpleNamespace(
        stats=WorkerStats(), pipeline=SimpleNamespace(dedup_keys=lambda: 0), lag=lambda: {0: 0}
    )
    collectors = {
        "worker": PipelineCollector(cast(Any, worker), None),
        "sink": PipelineCollector(None, cast(Any, sink)),
        "api": REQUEST_SECONDS,
    }
    found = {}
    for name, collector in collectors.items():
        registry = CollectorRegistry()
        registry.register(collector)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        names = set()
        for family in registry.collect():
            names |= {sample.name for sample in family.samples}
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        found[name] = names
    return found


def dashboard_roles() -> set[str]:
    doc = json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    used = {
        m
        for panel in doc["panels"]
        for target in panel["targets"]
        for m in re.findall(r"\b(tally_[a-z0-9_]+)\b", target["expr"])
    }
    exported = exported_by_role()
    return {r for r, names in exported.items() if used & names}


def prometheus_targets(config: dict[str, Any]) -> set[tuple[str, int]]:
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            targets |= {(name, int(dns["port"])) for name in dns["names"]}
    return targets


def compose_metrics_problems(doc: dict[str, Any], config: dict[str, Any]) -> list[str]:
    targets = prometheus_targets(config)
    problems = []
    for wanted in sorted(dashboard_roles()):
        services = [
            (n, s)
            for n, s in doc["services"].items()
            if is_built(str(s.get("image", ""))) and role(compose_argv(s)) == wanted
        ]
        if not services:
            problems.append(f"compose: no service runs the {wanted}")
        for name, service in services:
            scraped = {port for host, port in targets if host == name}
            if not scraped & compose_listens(service):
                problems.append(f"compose: prometheus.yml scrapes no port {name} serves")
    return problems


def k8s_metrics_problems(docs: list[dict[str, Any]], secret_keys: set[str]) -> list[str]:
    problems = []
    wanted = dashboard_roles()
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        template = doc["spec"]["template"]
        (container,) = template["spec"]["containers"]
        if role(k8s_argv(container)) not in wanted:
            continue
        where = f"Deployment {doc['metadata']['name']}"
        notes = template["metadata"].get("annotations", {})
        port = int(notes.get("prometheus.io/port", "0"))
        if (
            notes.get("prometheus.io/scrape") != "true"
            or notes.get("prometheus.io/path") != "/metrics"
        ):
            problems.append(f"{where}: pods not annotated for scraping at /metrics")
        if port not in k8s_listens(container, k8s_env(container, docs, secret_keys)):
            problems.append(f"{where}: prometheus.io/port {port} is not listened on")
        wanted = wanted - {role(k8s_argv(container))}
    problems += [f"k8s: no Deployment runs the {r}" for r in sorted(wanted)]
    return problems


def test_every_process_the_dashboard_reads_is_scraped() -> None:
    assert dashboard_roles() == {"worker", "sink", "api"}
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    assert compose_metrics_problems(compose, config) == []
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert k8s_metrics_problems(rendered(), set(K8S_SECRET_KIND)) == []


def test_the_metrics_check_can_fail() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    del compose["services"]["worker"]["environment"]["TALLY_METRICS_PORT"]
    config["scrape_configs"] = [
        j for j in config["scrape_configs"] if j["job_name"] != "tally-sink"
    ]
    assert len(compose_metrics_problems(compose, config)) == 2
    docs = rendered()
    sink = next(d for d in docs if d["metadata"]["name"] == "tally-sink")
    sink["spec"]["template"]["spec"]["containers"][0]["env"] = [
        e
        for e in sink["spec"]["template"]["spec"]["containers"][0]["env"]
        if "METRICS" not in e["name"]
    ]
    api = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "tally-api"
    )
    del api["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"]
    assert len(k8s_metrics_problems(docs, set(K8S_SECRET_KIND))) == 2


# ------------------------------------------------------- build context, one-shots


def context_problems(patterns: list[str], root: Path) -> list[str]:
    """Files of a checkout `docker build` would send that it must not, or miss that it needs."""
    sent = exclude_paths(str(root), patterns)
    problems = []
    ignored = (DEPLOY / ".gitignore").read_text(encoding="utf-8").splitlines()
    secrets = ["deploy/" + line for line in ignored if line and not line.startswith("#")]
    problems += [f"{path} (a secret) is sent" for path in secrets if path in sent]
    needed = ["pyproject.toml", "README.md", "deploy/cli.py", "producers/__init__.py", "native"]
    problems += [
        f"{path} (copied by the Dockerfile) is not sent" for path in needed if path not in sent
    ]
    return problems


def checkout(tmp_path: Path) -> Path:
    """A checkout as an operator has it: the code and the filled-in secrets."""
    for path in (
        "deploy/.env",
        "deploy/k8s/secrets.env",
        "deploy/cli.py",
        "producers/__init__.py",
        "native/Cargo.toml",
        "pyproject.toml",
        "README.md",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x", encoding="utf-8")
    return tmp_path


def dockerignore() -> list[str]:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_build_context_holds_no_secrets(tmp_path: Path) -> None:
    assert context_problems(dockerignore(), checkout(tmp_path)) == []


def test_the_context_check_can_fail(tmp_path: Path) -> None:
    without_secrets = [p for p in dockerignore() if "env" not in p and p != "deploy/k8s"]
    assert len(context_problems(without_secrets, checkout(tmp_path))) == 2
    assert context_problems([*dockerignore(), "native"], checkout(tmp_path))


def one_shot_problems(docs: list[dict[str, Any]]) -> list[str]:
    """A Job's pod template is immutable: re-applying a changed one fails until it is gone."""
    problems = [
        f"Job {d['metadata']['name']}: cannot be re-applied" for d in docs if d["kind"] == "Job"
    ]
    first = {}
    for name, _, spec in pod_specs(docs):
        first[name] = [role(k8s_argv(c)) for c in containers(spec)]
    for name, order in {
        "Deployment tally-worker": ["topics", "worker"],
        "Deployment tally-sink": ["migrate", "sink"],
    }.items():
        if first.get(name) != order:
            problems.append(f"{name}: runs {first.get(name)}, not {order}")
    return problems


def test_topics_and_migrate_run_again_with_every_rollout() -> None:
    assert one_shot_problems(rendered()) == []


def test_the_one_shot_check_can_fail() -> None:
    docs = rendered()
    sink = next(d for d in docs if d["metadata"]["name"] == "tally-sink")
    job = {"kind": "Job", "metadata": {"name": "tally-migrate"}, "spec": sink["spec"]}
    del sink["spec"]["template"]["spec"]["initContainers"]
    assert len(one_shot_problems([*docs, job])) == 2
