"""The Helm chart: `helm lint --strict`, then every ci/ values file rendered and the
manifests validated against the Kubernetes JSON schemas with kubeconform (offline: the
schemas come from the `kubernetes-validate` package), plus what the schemas cannot say."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraloop.core.settings import Settings, default_of
from loraloop.service.auth import parse_api_keys
from tests.ops_tools import INSTALL_HINT, find_tool, kubernetes_schemas

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "loraloop"
MODEL_VALUES = Path(__file__).with_name("helm_model_values.yaml")
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = "1.33.0"
KUBE = ("--kube-version", KUBE_VERSION)
# What the server spends after SIGTERM, in turn: the pod's grace period must cover them.
SHUTDOWN_SETTINGS = ("drain_seconds", "grace_seconds", "event_drain_seconds")
CRDS = {"ServiceMonitor"}  # not in the core schemas: checked by hand below


@pytest.fixture(scope="module")
def helm() -> str:
    path = find_tool("helm")
    if path is None:
        pytest.skip(f"helm is not installed: {INSTALL_HINT}")
    return path


def render(helm: str, values: Path) -> tuple[str, list[dict[str, Any]]]:
    result = subprocess.run(
        [
            helm,
            "template",
            "demo",
            str(CHART),
            "-f",
            str(MODEL_VALUES),
            "-f",
            str(values),
            "--namespace",
            "loraloop",
            "--kube-version",
            KUBE_VERSION,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return result.stdout, docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_every_values_key_is_commented() -> None:
    """Each key has a comment right above it; a section (e.g. `server:`) is documented by
    its keys' comments, and the keys inside a commented value (e.g. `resources:`) by it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    keys = []  # (line number, indent, commented)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped:
            above = lines[i - 1].strip() if i else ""
            keys.append((i, len(line) - len(line.lstrip()), above.startswith("#")))
    for n, (i, indent, commented) in enumerate(keys):
        if commented:
            continue
        ancestors, level = [], indent
        for k in reversed(keys[:n]):
            if k[1] < level:
                ancestors.append(k)
                level = k[1]
        is_section = n + 1 < len(keys) and keys[n + 1][1] > indent  # its keys are checked
        inside_documented = any(k[2] for k in ancestors)
        assert is_section or inside_documented, f"values.yaml line {i + 1}: {lines[i]!r}"


def test_config_keys_are_settings() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    fields = set(Settings.model_fields)
    for values_file in [CHART / "values.yaml", *CI_VALUES]:
        data = yaml.safe_load(values_file.read_text()) or {}
        for section in ("config", "extraConfig"):
            unknown = set(data.get(section) or {}) - fields
            assert not unknown, f"{values_file.name}: {section} keys not in Settings: {unknown}"
    stopping = sum(values["config"].get(k, default_of(k)) for k in SHUTDOWN_SETTINGS)
    assert stopping < values["server"]["terminationGracePeriodSeconds"]


def test_helm_lint_strict(helm: str) -> None:
    for extra in [[], *(["-f", str(v)] for v in CI_VALUES)]:
        result = subprocess.run(
            [helm, "lint", "--strict", str(CHART), *extra], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=[v.stem for v in CI_VALUES])
def test_rendered_manifests_are_valid(helm: str, values: Path, tmp_path: Path) -> None:
    text, docs = render(helm, values)
    kubeconform = find_tool("kubeconform")
    schemas = kubernetes_schemas(KUBE_VERSION)
    if kubeconform is None or schemas is None:
        pytest.skip(
            f"kubeconform or the kubernetes-validate schemas are not installed: {INSTALL_HINT}"
        )
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(text)
    location = f"{schemas}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}"
    location += "/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    result = subprocess.run(
        [
            kubeconform,
            "-strict",
            "-summary",
            "-kubernetes-version",
            KUBE_VERSION,
            "-schema-location",
            location,
            "-skip",
            ",".join(sorted(CRDS)),
            str(manifest),
        ],
        capture_output=True,
        text=True,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Invalid: 0, Errors: 0" in result.stdout
    checked = len([d for d in docs if d["kind"] not in CRDS])
    assert f"Valid: {checked}," in result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=[v.stem for v in CI_VALUES])
def test_rendered_manifests_do_what_the_values_say(helm: str, values: Path) -> None:
    chosen = yaml.safe_load(values.read_text()) or {}
    _, docs = render(helm, values)
    for doc in docs:
        labels = doc["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (doc["kind"], labels)

    (server,) = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-server")
    ]
    container = server["spec"]["template"]["spec"]["containers"][0]
    port = container["ports"][0]["containerPort"]
    tls = chosen.get("tls", {})
    http = chosen.get("server", {}).get("http", {}).get("enabled", True)
    check_http_api(http, tls, container, docs)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if http and not tls.get("clientAuth"):  # the HTTP API's /health (HTTPS unverified)
            get = container[probe]["httpGet"]
            assert (get["port"], get["scheme"]) == (
                "http",
                "HTTPS" if tls.get("enabled") else "HTTP",
            )
            assert get["path"].startswith("/health"), probe
        elif tls.get("enabled"):  # the kubelet's gRPC probes speak plaintext only
            assert "grpc" not in container[probe], probe
            assert container[probe]["tcpSocket"]["port"] == port, probe
        else:
            assert container[probe]["grpc"]["port"] == port, probe
    assert container["readinessProbe"].get("grpc", {}).get("service", "loraloop.v1.LoraLoop") == (
        "loraloop.v1.LoraLoop"
    )
    if "httpGet" in container["readinessProbe"]:
        assert container["readinessProbe"]["httpGet"]["path"] == (
            "/health?service=loraloop.v1.LoraLoop"
        )
    check_tls(tls, server)
    gpu = chosen.get("server", {}).get("gpu", {}).get("enabled", False)
    assert ("nvidia.com/gpu" in container["resources"].get("limits", {})) == gpu
    if node_selector := chosen.get("server", {}).get("nodeSelector"):
        assert server["spec"]["template"]["spec"]["nodeSelector"] == node_selector

    # The spill journal lives on a pod volume named by LORALOOP_SPILL_DIR.
    pod = server["spec"]["template"]["spec"]
    (spill,) = [v for v in pod["volumes"] if v["name"] == "event-spill"]
    assert "emptyDir" in spill
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (config_map,) = [
        c for c in by_kind(docs, "ConfigMap") if not c["metadata"]["name"].endswith("-dashboard")
    ]
    assert config_map["data"]["LORALOOP_SPILL_DIR"] == mounts["event-spill"]

    autoscaling = chosen.get("server", {}).get("autoscaling", {}).get("enabled", False)
    assert bool(by_kind(docs, "HorizontalPodAutoscaler")) == autoscaling
    assert ("replicas" not in server["spec"]) == autoscaling

    learners = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-learner")
    ]
    assert len(learners) == int(chosen.get("learner", {}).get("enabled", True))
    for learner in learners:
        check_learner_probes(learner, chosen.get("learner", {}).get("probes", {}))

    (config,) = [
        c for c in by_kind(docs, "ConfigMap") if not c["metadata"]["name"].endswith("-dashboard")
    ]
    env = config["data"]
    assert all(k.startswith(("LORALOOP_", "AWS_")) for k in env)
    assert all(isinstance(v, str) for v in env.values())
    fields = {f.upper() for f in Settings.model_fields}
    settings_keys = {k.removeprefix("LORALOOP_") for k in env if k.startswith("LORALOOP_")}
    assert settings_keys <= fields, settings_keys - fields
    check_adapter_store(chosen.get("adapterStore", {}), docs)

    dashboards = [
        c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")
    ]
    (dashboard,) = dashboards
    label = chosen.get("grafana", {}).get("dashboard", {}).get("sidecarLabelValue", "1")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == label
    shipped = json.loads(dashboard["data"]["loraloop-dashboard.json"])
    assert shipped == json.loads((ROOT / "ops/grafana/loraloop-dashboard.json").read_text())

    monitors = by_kind(docs, "ServiceMonitor")
    wanted = chosen.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    assert len(monitors) == int(wanted)
    for monitor in monitors:  # by hand: the prometheus-operator CRD is not in the schemas
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        assert set(spec) == {"selector", "endpoints"}
        assert spec["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "demo"
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval"} and endpoint["port"] == "metrics"
        services = by_kind(docs, "Service")
        assert services and all(
            any(p["name"] == "metrics" for p in s["spec"]["ports"]) for s in services
        )


def pod_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it from the rendered manifests:
    its ConfigMaps' data (envFrom), then its own env values."""
    maps = {c["metadata"]["name"]: c["data"] for c in by_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Deployments by component (server, learner)."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in by_kind(docs, "Deployment")
    }


def check_adapter_store(chosen: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """pvc: every pod mounts the claim at mountPath, named by LORALOOP_ADAPTER_STORE. s3:
    no claim anywhere; every pod gets LORALOOP_ADAPTER_STORE_URI, its own emptyDir cache at
    mountPath (LORALOOP_ADAPTER_CACHE_DIR), AWS_ENDPOINT_URL / AWS_REGION when given, and
    the credentials Secret through envFrom when one is named."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["adapterStore"]
    store = {**defaults, **chosen}
    pvc, s3 = {**defaults["pvc"], **store["pvc"]}, {**defaults["s3"], **store["s3"]}
    path = store["mountPath"]
    claims = by_kind(docs, "PersistentVolumeClaim")
    pods = deployments(docs)
    assert pods and pods.keys() <= {"server", "learner"}
    for component, deployment in pods.items():
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = pod_env(container, docs)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        secrets = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
        if store["type"] == "pvc":
            assert env["LORALOOP_ADAPTER_STORE"] == mounts["adapters"] == path, component
            claim = pvc["existingClaim"] or "demo-loraloop-adapters"
            assert volumes["adapters"]["persistentVolumeClaim"]["claimName"] == claim
            assert not {"LORALOOP_ADAPTER_STORE_URI", "LORALOOP_ADAPTER_CACHE_DIR"} & set(env)
            assert not any(k.startswith("AWS_") for k in env), component
            assert len(secrets) == 1, component  # the application's own Secret only
            continue
        assert store["type"] == "s3"
        assert "LORALOOP_ADAPTER_STORE" not in env, component
        prefix = s3["prefix"].strip("/")
        wanted = f"s3://{s3['bucket']}/{prefix}" if prefix else f"s3://{s3['bucket']}"
        assert env["LORALOOP_ADAPTER_STORE_URI"] == wanted, component
        assert env["LORALOOP_ADAPTER_CACHE_DIR"] == mounts["adapter-cache"] == path, component
        assert volumes["adapter-cache"]["emptyDir"] == {"sizeLimit": s3["cacheSizeLimit"]}
        assert not any("persistentVolumeClaim" in v for v in volumes.values()), component
        assert env.get("AWS_ENDPOINT_URL") == (s3["endpoint"] or None), component
        assert env.get("AWS_REGION") == (s3["region"] or None), component
        assert secrets[1:] == ([s3["existingSecret"]] if s3["existingSecret"] else [])
    if store["type"] == "pvc":
        assert len(claims) == (0 if pvc["existingClaim"] else 1)
        for claim in claims:
            assert claim["spec"]["accessModes"] == pvc["accessModes"]
    else:
        assert not claims


def check_learner_probes(learner: dict[str, Any], chosen: dict[str, Any]) -> None:
    """A startup probe on the learner's /metrics (open once the model is loaded), sized by
    the values and generous, so a slow model load is not killed by the liveness probe."""
    (container,) = learner["spec"]["template"]["spec"]["containers"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["learner"]["probes"]
    probes = {**defaults, **chosen}
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    assert startup["httpGet"] == liveness["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert startup["initialDelaySeconds"] == probes["startupInitialDelaySeconds"]
    assert startup["failureThreshold"] == probes["startupFailureThreshold"]
    budget = startup["initialDelaySeconds"] + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 300, f"the learner gets only {budget} s to load its model"
    assert "initialDelaySeconds" not in liveness  # it starts after the startup probe


def check_http_api(
    enabled: bool, tls: dict[str, Any], container: dict[str, Any], docs: list[dict[str, Any]]
) -> None:
    """server.http on: LORALOOP_HTTP_PORT set, the port on the container and the Service
    (appProtocol https with TLS); off: -1 and no port."""
    (config,) = [
        c for c in by_kind(docs, "ConfigMap") if not c["metadata"]["name"].endswith("-dashboard")
    ]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-server")]
    served = {p["name"]: p for p in service["spec"]["ports"]}
    if not enabled:
        assert config["data"]["LORALOOP_HTTP_PORT"] == "-1"
        assert "http" not in ports and "http" not in served
        return
    assert config["data"]["LORALOOP_HTTP_PORT"] == str(ports["http"])
    assert served["http"]["targetPort"] == "http"
    assert served["http"]["appProtocol"] == ("https" if tls.get("enabled") else "http")


def check_tls(tls: dict[str, Any], server: dict[str, Any]) -> None:
    """TLS on: the Secret mounted read-only and LORALOOP_TLS_* naming its files (the client
    CA only for clientAuth); off: neither."""
    pod = server["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    if not tls.get("enabled"):
        assert not any(k.startswith("LORALOOP_TLS_") for k in env)
        assert "tls" not in mounts and "tls" not in volumes
        return
    mount = mounts["tls"]
    assert mount["readOnly"] is True
    assert volumes["tls"]["secret"]["secretName"] == tls["secretName"]
    base = mount["mountPath"]
    wanted = {
        "LORALOOP_TLS_CERT_FILE": f"{base}/tls.crt",
        "LORALOOP_TLS_KEY_FILE": f"{base}/tls.key",
    }
    if tls.get("clientAuth"):
        wanted["LORALOOP_TLS_CLIENT_CA_FILE"] = f"{base}/ca.crt"
    assert {k: v for k, v in env.items() if k.startswith("LORALOOP_TLS_")} == wanted
    assert {k.removeprefix("LORALOOP_").lower() for k in wanted} <= set(Settings.model_fields)


def render_error(helm: str, values: dict[str, Any], tmp_path: Path) -> str:
    """helm template's stderr for values that must not render (asserting it fails)."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = subprocess.run(
        [helm, "template", "demo", str(CHART), "-f", str(MODEL_VALUES), "-f", str(path), *KUBE],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0, f"rendered although it must not: {values}"
    return result.stderr


KEYS_SET = {"secrets": {"apiKeys": "ci-placeholder-0123456789abcdef=*"}}


REAL_SECRETS = {"secrets": {**KEYS_SET["secrets"], "requestIdSecret": "a-real-one-0123"}}


def render_values(helm: str, values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return render(helm, path)[1]


def test_an_s3_store_reaches_both_pods_with_a_cache_and_no_claim(helm: str, tmp_path: Path) -> None:
    """type s3: the URI, endpoint, region and the credentials Secret in server and learner
    alike, each pod's own emptyDir cache, no PersistentVolumeClaim; and, without a shared
    volume, several server replicas and learners render (as with autoscaling)."""
    s3 = {
        "bucket": "team-adapters",
        "prefix": "/prod/adapters/",
        "endpoint": "http://minio.storage.svc:9000",
        "region": "eu-west-3",
        "existingSecret": "minio-keys",
        "cacheSizeLimit": "3Gi",
    }
    store = {"type": "s3", "mountPath": "/cache/adapters", "s3": s3}
    values = {
        **REAL_SECRETS,
        "adapterStore": store,
        "server": {"replicas": 3},
        "learner": {"replicas": 2},
    }
    docs = render_values(helm, values, tmp_path)
    check_adapter_store(store, docs)
    pods = deployments(docs)
    assert set(pods) == {"server", "learner"}
    assert pods["server"]["spec"]["replicas"] == 3 and pods["learner"]["spec"]["replicas"] == 2
    for component, deployment in pods.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = pod_env(container, docs)
        assert env["LORALOOP_ADAPTER_STORE_URI"] == "s3://team-adapters/prod/adapters"
        assert env["LORALOOP_ADAPTER_CACHE_DIR"] == "/cache/adapters"
        assert env["AWS_ENDPOINT_URL"] == "http://minio.storage.svc:9000"
        assert env["AWS_REGION"] == "eu-west-3"
        assert {"secretRef": {"name": "minio-keys"}} in container["envFrom"], component
    assert not by_kind(docs, "PersistentVolumeClaim")
    fields = set(Settings.model_fields)
    assert {"adapter_store_uri", "adapter_cache_dir"} <= fields, "settings the chart sets"


def test_an_s3_store_without_keys_uses_the_pod_identity(helm: str, tmp_path: Path) -> None:
    """No Secret, endpoint or region: AWS S3 with the pod's own identity (IRSA through the
    ServiceAccount's annotations), under the default prefix."""
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/loraloop"}
    store = {"type": "s3", "s3": {"bucket": "team-adapters"}}
    values = {**REAL_SECRETS, "adapterStore": store, "serviceAccount": {"annotations": role}}
    docs = render_values(helm, values, tmp_path)
    check_adapter_store(store, docs)
    (account,) = by_kind(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == role
    for component, deployment in deployments(docs).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"], component
        (container,) = pod["containers"]
        env = pod_env(container, docs)
        assert env["LORALOOP_ADAPTER_STORE_URI"] == "s3://team-adapters/adapters"
        assert not any(k.startswith("AWS_") for k in env), component
        assert [s for s in container["envFrom"] if "secretRef" in s] == [
            {"secretRef": {"name": "demo-loraloop"}}
        ]


def test_an_s3_store_needs_a_bucket_name(helm: str, tmp_path: Path) -> None:
    for bucket in ("", "  "):
        values = {**REAL_SECRETS, "adapterStore": {"type": "s3", "s3": {"bucket": bucket}}}
        assert "adapterStore.s3.bucket is empty" in render_error(helm, values, tmp_path)
    for bucket in ("s3://team-adapters", "team-adapters/prod"):
        values = {**REAL_SECRETS, "adapterStore": {"type": "s3", "s3": {"bucket": bucket}}}
        error = render_error(helm, values, tmp_path)
        assert "adapterStore.s3.bucket must be a bucket name only" in error
    values = {**REAL_SECRETS, "adapterStore": {"type": "nfs"}}
    assert "adapterStore.type must be pvc or s3" in render_error(helm, values, tmp_path)


def test_the_gpu_example_serves_with_vllm_and_learns_on_the_gpu(helm: str) -> None:
    """ci/gpu-hpa-values.yaml, the production example: vLLM servers and learners each
    with a GPU (device cuda, bfloat16), autoscaled servers and several learners sharing an
    S3 store, so no claim ties them to one node."""
    values = CHART / "ci" / "gpu-hpa-values.yaml"
    chosen = yaml.safe_load(values.read_text())
    _, docs = render(helm, values)
    pods = deployments(docs)
    containers = {c: d["spec"]["template"]["spec"]["containers"][0] for c, d in pods.items()}
    server, learner = containers["server"], containers["learner"]
    server_env, learner_env = pod_env(server, docs), pod_env(learner, docs)

    assert server_env["LORALOOP_ENGINE"] == "vllm"
    assert server["args"] == ["serve"] and learner["args"] == ["learn"]
    for env in (server_env, learner_env):
        assert env["LORALOOP_DEVICE"] == "cuda"
        assert env["LORALOOP_DTYPE"] == "bfloat16"
    for container in (server, learner):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", container["name"]
    for deployment in pods.values():
        pod = deployment["spec"]["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])  # GPU taint
        assert "cloud.google.com/gke-accelerator" in pod["nodeSelector"]

    # The S3 store: what lets the HPA and the learners spread over nodes.
    assert chosen["adapterStore"]["type"] == "s3"
    check_adapter_store(chosen["adapterStore"], docs)
    for env in (server_env, learner_env):
        assert env["LORALOOP_ADAPTER_STORE_URI"].startswith("s3://")
        assert env["LORALOOP_ADAPTER_CACHE_DIR"]
    assert not by_kind(docs, "PersistentVolumeClaim")
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"] > 1
    assert "replicas" not in pods["server"]["spec"]
    assert pods["learner"]["spec"]["replicas"] > 1


def test_a_base_model_is_required(helm: str, tmp_path: Path) -> None:
    """No default model: a pod must never build or download one at start-up."""
    for model in ("", "  "):
        values = {**KEYS_SET, "config": {"model": model}}
        values["secrets"] = {**KEYS_SET["secrets"], "requestIdSecret": "a-real-one-0123"}
        assert "config.model is empty" in render_error(helm, values, tmp_path)


def test_auth_with_the_default_request_id_secret_does_not_render(helm: str, tmp_path: Path) -> None:
    for secret in ("change-me", "", "  change-me "):
        values = {"secrets": {**KEYS_SET["secrets"], "requestIdSecret": secret}}
        assert "secrets.requestIdSecret" in render_error(helm, values, tmp_path)
    assert "secrets.requestIdSecret" in render_error(helm, KEYS_SET, tmp_path)  # the default
    # a demo without auth, and an existing Secret, still render with it
    for values in (
        {"auth": {"required": False}},
        {"secrets": {"create": False, "existingSecret": "mine"}},
    ):
        path = tmp_path / "ok.yaml"
        path.write_text(yaml.safe_dump(values))
        _, docs = render(helm, path)
        assert by_kind(docs, "Deployment")


def test_tls_needs_a_secret_and_can_probe_with_a_command(helm: str, tmp_path: Path) -> None:
    base = {"secrets": {**KEYS_SET["secrets"], "requestIdSecret": "a-real-one-0123"}}
    error = render_error(helm, {**base, "tls": {"enabled": True}}, tmp_path)
    assert "tls.secretName is empty" in error
    command = ["grpc_health_probe", "-addr=:50051", "-tls", "-tls-no-verify"]
    path = tmp_path / "exec.yaml"
    tls = {"enabled": True, "secretName": "srv-tls", "probeCommand": command}
    path.write_text(yaml.safe_dump({**base, "tls": tls}))
    _, docs = render(helm, path)
    (server,) = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-server")
    ]
    (container,) = server["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == command, probe
    check_tls(tls, server)


def test_api_keys_are_required_unless_turned_off(helm: str, tmp_path: Path) -> None:
    """auth.required (on by default) renders LORALOOP_AUTH_REQUIRED, a Secret whose keys the
    server accepts, and no chart at all when the keys are missing."""
    assert "secrets.apiKeys is empty" in render_error(helm, {}, tmp_path)
    for values in CI_VALUES:
        chosen = yaml.safe_load(values.read_text()) or {}
        required = chosen.get("auth", {}).get("required", True)
        _, docs = render(helm, values)
        (config,) = [
            c
            for c in by_kind(docs, "ConfigMap")
            if not c["metadata"]["name"].endswith("-dashboard")
        ]
        assert config["data"]["LORALOOP_AUTH_REQUIRED"] == str(required).lower(), values.name
        secrets = by_kind(docs, "Secret")
        if chosen.get("secrets", {}).get("create", True):
            (secret,) = secrets
            keys = parse_api_keys(secret["stringData"]["LORALOOP_API_KEYS"])
            assert bool(keys) or not required, values.name
        else:  # an existing Secret: the server itself refuses to start without keys
            assert not secrets


def test_the_pod_grace_period_covers_the_server_shutdown(helm: str, tmp_path: Path) -> None:
    """After SIGTERM the server keeps answering with health NOT_SERVING (drain_seconds), lets
    calls finish (grace_seconds), then delivers events (event_drain_seconds): the pod's
    terminationGracePeriodSeconds covers the three, the drain outlasts the readiness probe's
    failures, and a grace period too short for them does not render."""
    _, docs = render(helm, CHART / "ci" / "default-values.yaml")
    (server,) = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-server")
    ]
    (config,) = [
        c for c in by_kind(docs, "ConfigMap") if not c["metadata"]["name"].endswith("-dashboard")
    ]
    env = config["data"]
    pod = server["spec"]["template"]["spec"]
    stopping = sum(
        float(env.get(f"LORALOOP_{k.upper()}", default_of(k))) for k in SHUTDOWN_SETTINGS
    )
    assert stopping < pod["terminationGracePeriodSeconds"]
    readiness = pod["containers"][0]["readinessProbe"]
    drain = float(env["LORALOOP_DRAIN_SECONDS"])
    assert drain >= readiness["periodSeconds"] * readiness["failureThreshold"]

    secrets = {**KEYS_SET["secrets"], "requestIdSecret": "a-real-one-0123"}
    short = {"secrets": secrets, "server": {"terminationGracePeriodSeconds": 30}}
    short["config"] = {"drain_seconds": 10, "grace_seconds": 15}  # + event_drain_seconds 10
    error = render_error(helm, short, tmp_path)
    assert "server.terminationGracePeriodSeconds (30) is shorter" in error
    assert "= 35 s" in error
    # settings config leaves out count with Settings' defaults (null deletes a chart value)
    unset = {"secrets": secrets, "server": {"terminationGracePeriodSeconds": 1}}
    unset["config"] = {"drain_seconds": None, "grace_seconds": None}
    defaults = sum(default_of(k) for k in SHUTDOWN_SETTINGS)
    assert f"= {defaults:g} s" in render_error(helm, unset, tmp_path)
    unset["server"] = {"terminationGracePeriodSeconds": int(defaults)}
    path = tmp_path / "exact.yaml"
    path.write_text(yaml.safe_dump(unset))
    assert render(helm, path)[1]
