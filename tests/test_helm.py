"""The Helm chart (`helm/`), checked offline: strict lint, rendering with several value sets,
`values.schema.json`, every manifest against Kubernetes' own schemas, and the config it
mounts read by fdp's own loader."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from policies.loader import load_settings

CHART = Path(__file__).resolve().parent.parent / "helm"
KUBERNETES = "1.33.0"
#: custom resources whose schemas Kubernetes does not publish
CUSTOM = ("monitoring.coreos.com/",)

PROVIDERS = """\
earth_search:
  search: {type: StacSearch, api_endpoint: "https://earth-search.aws.element84.com/v1/search"}
  products: {GENERIC_COLLECTION: {_collection: "{collection}"}}
"""
FULL = {
    "config": {
        "server": {"public_url": "https://data.example"},
        "auth": {"oidc_issuer": "https://idp.example/realms/eo"},
        "datasets": {
            "s2": {
                "upstream": {"eodag": {"provider": "earth_search", "collection": "s2-l2a"}},
                "access": {"groups": ["eo-users"]},
            },
            "open": {"upstream": {"http": {"base_url": "https://data.example.org/pub/"}}},
        },
    },
    "eodagProviders": PROVIDERS,
    "secretEnv": {"FDP_DATASETS__S2__UPSTREAM__S3__SECRET_ACCESS_KEY": "not-a-real-key"},
    "redis": {"mode": "external", "url": "rediss://redis.example:6380/0"},
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "host": "data.example",
        "tls": [{"secretName": "data-tls", "hosts": ["data.example"]}],
    },
    "serviceMonitor": {"enabled": True},
    "proxy": {"autoscaling": {"enabled": True, "maxReplicas": 6}, "processes": 2},
}
SECRETS = {
    "existingSecret": "fdp-credentials",
    "redis": {"mode": "external", "existingSecret": "redis-credentials"},
    "proxy": {"replicas": 1, "podDisruptionBudget": {"enabled": False}},
    "worker": {"replicas": 0},
}
VALUE_SETS = {"defaults": {}, "full": FULL, "existing-secrets": SECRETS}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name="fdp", namespace="eo")
    return [doc for text in files.values() for doc in yaml.safe_load_all(text) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_is_clean_and_every_manifest_is_valid_kubernetes(name):
    values = VALUE_SETS[name]
    report = helm.lint(CHART, values, strict=True, kube_version=KUBERNETES)
    assert report["errors"] == [], report
    assert all(m["severity"] <= 1 for m in report["messages"]), report  # info only
    docs = render(values)
    assert {"ConfigMap", "Deployment", "Service"} <= {d["kind"] for d in docs}
    for doc in docs:
        if doc["apiVersion"].startswith(CUSTOM):
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises when invalid


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_run_hardened_with_probes(name):
    docs = render(VALUE_SETS[name])
    [proxy] = of_kind(docs, "Deployment", "-proxy")
    [worker] = of_kind(docs, "Deployment", "-worker")
    for deployment in (proxy, worker):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["automountServiceAccountToken"] is False
        assert pod["topologySpreadConstraints"]
        [container] = pod["containers"]
        assert container["image"] == "ghcr.io/fdp/fdp:0.1.0"
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/etc/fdp", "/tmp", "/var/cache/fdp"} <= mounts  # writable where fdp writes
    container = proxy["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"][0] == "serve"
    env = _env(proxy)
    drain, grace = (float(env[f"FDP_SERVER__{k}_SECONDS"]["value"]) for k in ("DRAIN", "GRACE"))
    assert drain + grace < proxy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker"]
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 300  # time for a retrieval to finish...
    handed_back = float(_env(worker)["FDP_QUEUE__WORKER_GRACE_SECONDS"]["value"])
    assert 0 < handed_back < grace  # ... or to be handed back before the pod is killed


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def test_redis_bundled_or_external():
    docs = render({})
    [redis] = of_kind(docs, "StatefulSet", "-redis")
    image = redis["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("redis:") and "bitnami" not in image  # the official image
    for deployment in of_kind(docs, "Deployment"):
        assert _env(deployment)["FDP_QUEUE__REDIS_URL"]["value"] == "redis://fdp-redis:6379/0"
    docs = render(FULL)
    assert not of_kind(docs, "StatefulSet")
    for deployment in of_kind(docs, "Deployment"):
        assert _env(deployment)["FDP_QUEUE__REDIS_URL"]["value"] == FULL["redis"]["url"]
    docs = render(SECRETS)
    for deployment in of_kind(docs, "Deployment"):
        ref = _env(deployment)["FDP_QUEUE__REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "redis-credentials", "key": "redis-url"}
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "fdp-credentials"}}]
    assert not of_kind(docs, "Secret") and not of_kind(docs, "PodDisruptionBudget")


def test_optional_parts_appear_when_asked():
    docs = render({})
    assert not of_kind(docs, "Ingress") and not of_kind(docs, "HorizontalPodAutoscaler")
    assert not of_kind(docs, "ServiceMonitor") and of_kind(docs, "PodDisruptionBudget")
    docs = render(FULL)
    [ingress] = of_kind(docs, "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "data.example"
    [hpa] = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == 6
    [proxy] = of_kind(docs, "Deployment", "-proxy")
    assert "replicas" not in proxy["spec"]  # the autoscaler owns it
    [monitor] = of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    [secret] = of_kind(docs, "Secret")
    assert set(secret["stringData"]) == set(FULL["secretEnv"])
    configmap = next(d for d in of_kind(docs, "ConfigMap"))
    assert "not-a-real-key" not in yaml.safe_dump(configmap)  # credentials stay in the Secret


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_mounted_config_is_one_fdp_accepts(name, tmp_path):
    [configmap] = of_kind(render(VALUE_SETS[name]), "ConfigMap")
    for file, text in configmap["data"].items():
        (tmp_path / file).write_text(text)
    settings = load_settings(tmp_path / "config.yaml", environ={})
    assert settings.server.host == "0.0.0.0" and settings.server.port == 8080
    assert settings.cache.store == "/var/cache/fdp"
    assert set(settings.datasets) == set(VALUE_SETS[name].get("config", {}).get("datasets", {}))


def test_a_shared_s3_cache_keeps_its_local_tier_in_the_pod_volume(tmp_path):
    shared = {"store": "s3://fdp-cache/eo", "s3": {"endpoint_url": "https://s3.example"}}
    [configmap] = of_kind(render({"config": {"cache": shared}}), "ConfigMap")
    (tmp_path / "config.yaml").write_text(configmap["data"]["config.yaml"])
    settings = load_settings(tmp_path / "config.yaml", environ={})
    assert settings.cache.shared == ("fdp-cache", "eo")
    assert settings.cache.folder == "/var/cache/fdp"  # the emptyDir, not the read-only root


@pytest.mark.parametrize(
    "bad",
    [
        {"proxy": {"replicas": 0}},
        {"redis": {"mode": "external"}},  # neither url nor existingSecret
        {"redis": {"mode": "sideways"}},
        {"redis": {"mode": "external", "url": "http://not-redis"}},
        {"surprise": True},
        {"secretEnv": {"lower-case": "x"}},
        {"config": {"server": {"public_url": "ftp://data.example"}}},
        {"image": {"repository": ""}},
        {"proxy": {"cacheSize": "lots"}},
        {"service": {"port": 70000}},
    ],
)
def test_the_values_schema_refuses_bad_values(bad):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})  # the defaults pass
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)


def test_the_dockerfile_builds_the_image_the_chart_runs():
    text = (CHART.parent / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert len(stages) >= 2  # multi-stage: the build tools stay behind
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER\s+10001", final, re.MULTILINE)  # non-root, as the chart expects
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f'org.opencontainers.image.ref.name="{values["image"]["repository"]}"' in text
    for folder in ("proxy", "upstreams", "cache", "workers", "policies"):
        assert f"COPY {folder} {folder}" in text
