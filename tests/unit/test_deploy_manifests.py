"""Offline checks of the container images and deployment manifests under docker/.

Every Kubernetes document under docker/k8s (except the CRD folders istio/, optional/ and
gateway/, and the kustomization files) is validated against the Kubernetes JSON schemas
shipped inside the kubernetes-validate package, in strict mode (unknown fields fail), and
so is the spare-GPU variant (docker/k8s-spare-gpu) once rendered. On top of schema
validity, the behaviours the service relies on are asserted: gRPC probes on the serving
port (readiness on the whole server, liveness on its own "liveness" service), a termination
grace longer than preStop + drain, a GPU node, the allocator setting, h2c on the Service,
HPA/PDB wired to the Deployment on metrics the server exports, the ready-replica
arithmetic of both rollout choices, the API key file mounted where the server reads it,
header-hash affinity in Istio and in the Gateway, non-root images that do not bake in
models, and a compose file that mounts the model it points the cloud at.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

kv = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
SPARE_GPU = DOCKER / "k8s-spare-gpu"  # a kustomize overlay of K8S
CRD_DIRS = ("istio", "optional", "gateway")
DOCKERFILES = {
    "cloud": DOCKER / "cloud.Dockerfile",
    "cloud-cpu": DOCKER / "cloud-cpu.Dockerfile",
    "edge": DOCKER / "edge.Dockerfile",
}
DRAIN_DEFAULT_S = 30  # specthink-cloud serve --drain-grace-s default
MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx")


# --------------------------------------------------------------------------- loading


def _yaml_files(base: Path, *, core_only: bool) -> list[Path]:
    files = sorted([*base.rglob("*.yaml"), *base.rglob("*.yml")])
    if core_only:
        files = [f for f in files if f.relative_to(base).parts[0] not in CRD_DIRS]
    return files


def _load_docs(files: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for f in files:
        for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
            if doc is None or doc.get("kind") == "Kustomization":  # not an API object
                continue
            docs.append((f"{f.relative_to(ROOT)}#{i}", doc))
    return docs


CORE_DOCS = _load_docs(_yaml_files(K8S, core_only=True))
CRD_DOCS = _load_docs(
    [f for d in CRD_DIRS if (K8S / d).is_dir() for f in _yaml_files(K8S / d, core_only=False)]
)


def _one(kind: str, docs: list[tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    found = [d for _, d in (CORE_DOCS if docs is None else docs) if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def _schema_version() -> str:
    return kv.latest_version()


# --------------------------------------------------------------------------- helpers


def _pod_spec(deploy: dict[str, Any]) -> dict[str, Any]:
    return deploy["spec"]["template"]["spec"]


def _cloud_container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = _pod_spec(deploy)["containers"]
    assert len(containers) == 1, "the cloud pod runs exactly one container"
    return containers[0]


def _flag(args: list[str], name: str) -> str | None:
    """Value of `--name V` or `--name=V` in an argv list, or None."""
    for i, a in enumerate(args):
        if a == name:
            assert i + 1 < len(args), f"{name} has no value"
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _grpc_port(container: dict[str, Any]) -> int:
    port = _flag([str(a) for a in container.get("args", [])], "--port")
    assert port is not None, "cloud args must set --port"
    named = [p for p in container["ports"] if p.get("name") == "grpc"]
    assert len(named) == 1 and named[0]["containerPort"] == int(port), (
        "container port 'grpc' must equal --port"
    )
    return int(port)


def _prestop_seconds(container: dict[str, Any]) -> int:
    pre = container.get("lifecycle", {}).get("preStop")
    assert pre, "the cloud container needs a preStop hook so endpoints update before SIGTERM"
    if "sleep" in pre:  # native sleep action (k8s >= 1.30)
        return int(pre["sleep"]["seconds"])
    cmd = [str(c) for c in pre["exec"]["command"]]
    joined = " ".join(cmd)
    m = re.search(r"\bsleep\s+(\d+)\b", joined)
    assert m, f"preStop should sleep, got {cmd}"
    return int(m.group(1))


def check_shutdown_timing(deploy: dict[str, Any]) -> None:
    container = _cloud_container(deploy)
    args = [str(a) for a in container.get("args", [])]
    drain_flag = _flag(args, "--drain-grace-s")
    drain = float(drain_flag) if drain_flag is not None else DRAIN_DEFAULT_S
    prestop = _prestop_seconds(container)
    assert 0 < prestop <= 30, "a short preStop sleep"
    grace = _pod_spec(deploy).get("terminationGracePeriodSeconds", 30)
    # The grace period starts before preStop runs; SIGTERM is sent after it returns.
    assert grace > prestop + drain, (
        f"terminationGracePeriodSeconds={grace} must exceed preStop {prestop}s + drain {drain}s"
    )


def check_grpc_probes(deploy: dict[str, Any]) -> None:
    container = _cloud_container(deploy)
    port = _grpc_port(container)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        assert spec is not None, f"{probe} missing"
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (
            f"{probe} must be a native gRPC probe"
        )
        assert spec["grpc"]["port"] == port, f"{probe} must probe the gRPC port {port}"
        # Empty service name = overall server health (readiness): NOT_SERVING until warm,
        # while the engine fails and while draining. Liveness asks its own service, which
        # stays SERVING through loading and draining and fails only on a stuck engine.
        want = "liveness" if probe == "livenessProbe" else ""
        assert spec["grpc"].get("service", "") == want, f"{probe} must ask service {want!r}"
    startup = container["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 300, "model loading needs a startup budget of minutes, not seconds"


def _docker_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _docker_instructions(path):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    assert stages, f"{path.name} has no FROM"
    return stages


def _resolve_from(path: Path, image: str) -> str:
    args = {}
    for word, rest in _docker_instructions(path):
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k.strip(), v.strip().strip('"'))
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def check_dockerfile(path: Path) -> None:
    stages = _stages(path)
    final = stages[-1]
    users = [rest.split()[0] for word, rest in final if word == "USER"]
    assert users, f"{path.name}: the final stage needs a USER line"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"{path.name}: runs as root"
    for stage in stages:
        for word, rest in stage:
            if word not in {"COPY", "ADD"}:
                continue
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources = parts[:-1]
            for src in sources:
                s = src.rstrip("/")
                assert s not in {".", "./", "*"}, (
                    f"{path.name}: `{word} {rest}` copies the whole build context "
                    "(and with it any models/ folder)"
                )
                assert not re.search(r"(^|/)models?(/|$)", s), f"{path.name}: copies models"
                assert not s.lower().endswith(MODEL_SUFFIXES), f"{path.name}: copies weights"


# --------------------------------------------------------------------------- schema


def test_manifests_exist() -> None:
    kinds = sorted(d["kind"] for _, d in CORE_DOCS)
    for kind in (
        "Deployment",
        "Service",
        "Secret",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ):
        assert kind in kinds, f"no {kind} under docker/k8s ({kinds})"
    assert not [d for _, d in CORE_DOCS if "namespace" in d.get("metadata", {})], (
        "manifests are namespace-less: they go to kubectl's current namespace"
    )


@pytest.mark.parametrize(("where", "doc"), CORE_DOCS, ids=[w for w, _ in CORE_DOCS])
def test_manifest_matches_kubernetes_schema(where: str, doc: dict[str, Any]) -> None:
    assert "apiVersion" in doc and "kind" in doc, where
    kv.validate(doc, _schema_version(), strict=True)


def test_strict_schema_validation_rejects_bad_documents() -> None:
    deploy = copy.deepcopy(_one("Deployment"))
    _cloud_container(deploy)["startupProbe"]["grpc"]["prot"] = 50051  # typo'd field
    with pytest.raises(kv.ValidationError):
        kv.validate(deploy, _schema_version(), strict=True)
    svc = copy.deepcopy(_one("Service"))
    svc["spec"]["ports"][0]["port"] = "fifty"
    with pytest.raises(kv.ValidationError):
        kv.validate(svc, _schema_version(), strict=True)


# --------------------------------------------------------------------------- Deployment


def test_probes_are_grpc_on_the_service_port() -> None:
    deploy = _one("Deployment")
    check_grpc_probes(deploy)
    port = _grpc_port(_cloud_container(deploy))
    svc_ports = _one("Service")["spec"]["ports"]
    assert any(p.get("targetPort") in (port, "grpc") for p in svc_ports)


def test_probe_check_catches_an_http_probe() -> None:
    deploy = copy.deepcopy(_one("Deployment"))
    _cloud_container(deploy)["livenessProbe"] = {"httpGet": {"path": "/", "port": 9400}}
    with pytest.raises(AssertionError):
        check_grpc_probes(deploy)


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    check_shutdown_timing(_one("Deployment"))


def test_timing_check_catches_a_short_grace() -> None:
    deploy = copy.deepcopy(_one("Deployment"))
    _pod_spec(deploy)["terminationGracePeriodSeconds"] = 30
    with pytest.raises(AssertionError):
        check_shutdown_timing(deploy)


def test_gpu_is_requested() -> None:
    resources = _cloud_container(_one("Deployment"))["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    # Extended resources: a request, if given, must equal the limit.
    if "nvidia.com/gpu" in resources.get("requests", {}):
        assert int(resources["requests"]["nvidia.com/gpu"]) == int(
            resources["limits"]["nvidia.com/gpu"]
        )
    assert "memory" in resources["limits"] and "memory" in resources["requests"]
    args = [str(a) for a in _cloud_container(_one("Deployment"))["args"]]
    assert _flag(args, "--device") in {"cuda", "auto"}


def test_security_context() -> None:
    deploy = _one("Deployment")
    pod_sc = _pod_spec(deploy).get("securityContext", {})
    container = _cloud_container(deploy)
    sc = container["securityContext"]
    assert pod_sc.get("runAsNonRoot") or sc.get("runAsNonRoot")
    assert pod_sc.get("runAsUser", sc.get("runAsUser", 0)) != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    # With a read-only root, every directory the server writes to must be a writable volume.
    volumes = {v["name"]: v for v in _pod_spec(deploy)["volumes"]}
    writable = [
        m["mountPath"]
        for m in container["volumeMounts"]
        if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]
    ]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    for var in ("SPECTHINK_CACHE_DIR", "HF_HOME"):
        assert var in env, f"{var} must point into a writable volume"
        assert any(env[var] == w or env[var].startswith(w.rstrip("/") + "/") for w in writable)
    assert "/tmp" in writable


def test_model_comes_read_only_from_the_pvc() -> None:
    deploy = _one("Deployment")
    container = _cloud_container(deploy)
    model = _flag([str(a) for a in container["args"]], "--model")
    assert model is not None
    volumes = {v["name"]: v for v in _pod_spec(deploy)["volumes"]}
    claim = _one("PersistentVolumeClaim")["metadata"]["name"]
    mounts = [
        m
        for m in container["volumeMounts"]
        if model.startswith(m["mountPath"].rstrip("/") + "/")
        and volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim
    ]
    assert mounts, f"--model {model} is not under the models PVC mount"
    assert all(m.get("readOnly") is True for m in mounts)
    assert mounts[0]["mountPath"] == "/models"


def test_api_key_secret_is_mounted_where_the_server_reads_it() -> None:
    deploy = _one("Deployment")
    container = _cloud_container(deploy)
    key_file = _flag([str(a) for a in container["args"]], "--api-key-file")
    assert key_file, "the cloud must be started with --api-key-file"
    secret = _one("Secret")
    volumes = {v["name"]: v for v in _pod_spec(deploy)["volumes"]}
    hits = []
    for m in container["volumeMounts"]:
        src = volumes[m["name"]].get("secret")
        prefix = m["mountPath"].rstrip("/") + "/"
        if not src or not key_file.startswith(prefix):
            continue
        assert src["secretName"] == secret["metadata"]["name"]
        rel = key_file[len(prefix) :]
        items = src.get("items") or [{"key": rel, "path": rel}]
        keys = [it["key"] for it in items if it["path"] == rel]
        assert len(keys) == 1, f"{key_file} is not a file of the secret volume"
        data = {**secret.get("data", {}), **secret.get("stringData", {})}
        assert keys[0] in data, f"Secret has no key {keys[0]!r}"
        assert m.get("readOnly") is True
        hits.append(m)
    assert len(hits) == 1, f"no secret volume mounted at {key_file}"


def test_secret_value_is_a_marked_placeholder() -> None:
    secret = _one("Secret")
    values = list(secret.get("stringData", {}).values())
    assert values and all("CHANGE-ME" in v for v in values), "placeholder must say so"
    assert "kubectl create secret" in (K8S / "secret.yaml").read_text()


# --------------------------------------------------------------------------- Service, HPA, PDB


def test_service_speaks_h2c_and_selects_the_pods() -> None:
    svc = _one("Service")
    deploy = _one("Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    grpc_port = _grpc_port(_cloud_container(deploy))
    grpc = [p for p in svc["spec"]["ports"] if p.get("targetPort") in (grpc_port, "grpc")]
    assert len(grpc) == 1
    assert grpc[0]["appProtocol"] == "kubernetes.io/h2c"
    metrics_port = _flag([str(a) for a in _cloud_container(deploy)["args"]], "--metrics-port")
    assert metrics_port is not None
    container_ports = {p["name"]: p["containerPort"] for p in _cloud_container(deploy)["ports"]}
    targets = [container_ports.get(p["targetPort"], p["targetPort"]) for p in svc["spec"]["ports"]]
    assert int(metrics_port) in targets, "the Service must expose the metrics port"


def test_deployment_selector_matches_its_pods() -> None:
    deploy = _one("Deployment")
    sel = deploy["spec"]["selector"]["matchLabels"]
    assert sel.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


def test_hpa_targets_the_deployment_on_queue_length() -> None:
    hpa = _one("HorizontalPodAutoscaler")
    deploy = _one("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "Deployment",
        deploy["metadata"]["name"],
    )
    assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    names = [p["metric"]["name"] for p in pods]
    # the early signal (batch fill, before anything waits) and the queue as a backstop
    assert names == ["specthink_batch_demand_perc", "specthink_num_requests_waiting"]
    demand = pods[0]["target"]
    assert demand["type"] == "AverageValue" and _quantity(demand["averageValue"]) < 1.0, (
        "scale out before the batch is full (1.0 = full, above = requests wait)"
    )
    for m in hpa["spec"]["metrics"]:
        for body in m.values():
            if isinstance(body, dict) and "metric" in body:
                assert ":" not in body["metric"]["name"], "':' is invalid in k8s metric names"
    # the adapter renames specthink:X to specthink_X: each X is a metric the server exports
    exported = _exported_metric_names()
    for name in names:
        assert "specthink:" + name.removeprefix("specthink_") in exported, name
    text = (K8S / "hpa.yaml").read_text()
    assert "prometheus-adapter" in text and '"specthink_${1}"' in text


def _quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _exported_metric_names() -> set[str]:
    pytest.importorskip("prometheus_client")
    from cloud.metrics import Metrics

    return {family.name for family in Metrics().registry.collect()}


def test_pdb_selects_the_deployment_pods() -> None:
    pdb = _one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    sel = pdb["spec"]["selector"]
    assert sel.get("matchLabels") and sel["matchLabels"].items() <= pod_labels.items()
    assert "matchExpressions" not in sel
    # minAvailable == replicas would block every drain; a lone replica needs maxUnavailable.
    assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])


# --------------------------------------------------------------------------- CRDs


def test_istio_destination_rule_hashes_on_session_header() -> None:
    dr = _one("DestinationRule", CRD_DOCS)
    assert dr["apiVersion"] in {"networking.istio.io/v1", "networking.istio.io/v1beta1"}
    assert set(dr) <= {"apiVersion", "kind", "metadata", "spec"}
    assert dr["metadata"]["name"]
    svc = _one("Service")["metadata"]["name"]
    host = dr["spec"]["host"]
    assert host == svc or host.startswith(svc + "."), f"host {host} is not Service {svc}"
    assert set(dr["spec"]) <= {"host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"}
    lb = dr["spec"]["trafficPolicy"]["loadBalancer"]
    assert set(lb) <= {"simple", "consistentHash", "localityLbSetting", "warmupDurationSecs"}
    assert "simple" not in lb, "simple and consistentHash are mutually exclusive"
    ch = lb["consistentHash"]
    hash_keys = {"httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"}
    assert len(set(ch) & hash_keys) == 1
    assert ch["httpHeaderName"].lower() == "x-session-id"


def test_optional_keda_scaledobject_targets_the_deployment() -> None:
    objs = [d for _, d in CRD_DOCS if d.get("kind") == "ScaledObject"]
    if not objs:
        pytest.skip("no KEDA ScaledObject provided")
    deploy = _one("Deployment")["metadata"]["name"]
    for obj in objs:
        assert obj["apiVersion"].startswith("keda.sh/")
        assert obj["spec"]["scaleTargetRef"]["name"] == deploy
        assert any("num_requests_waiting" in str(t) for t in obj["spec"]["triggers"])


def test_no_crd_in_the_core_folder() -> None:
    # kubectl apply -f docker/k8s/ must work on a cluster without Istio or KEDA.
    for where, doc in CORE_DOCS:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        assert not group.endswith(("istio.io", "keda.sh", "coreos.com")), where


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_runs_non_root_and_bakes_in_no_model(name: str) -> None:
    check_dockerfile(DOCKERFILES[name])


def test_dockerfile_check_catches_root_and_model_copies(tmp_path: Path) -> None:
    bad_user = tmp_path / "a.Dockerfile"
    bad_user.write_text("FROM python:3.11-slim\nUSER app\nRUN true\nUSER root\n")
    with pytest.raises(AssertionError):
        check_dockerfile(bad_user)
    bad_copy = tmp_path / "b.Dockerfile"
    bad_copy.write_text("FROM python:3.11-slim\nCOPY models/qwen.gguf /models/\nUSER 10001\n")
    with pytest.raises(AssertionError):
        check_dockerfile(bad_copy)
    whole = tmp_path / "c.Dockerfile"
    whole.write_text("FROM python:3.11-slim\nCOPY --chown=1:1 . /src\nUSER 10001\n")
    with pytest.raises(AssertionError):
        check_dockerfile(whole)


@pytest.mark.parametrize("name", ["cloud", "cloud-cpu"])
def test_cloud_images(name: str) -> None:
    path = DOCKERFILES[name]
    final = _stages(path)[-1]
    d: dict[str, list[str]] = {}
    for word, rest in final:
        d.setdefault(word, []).append(rest)
    assert d["ENTRYPOINT"][-1].replace(" ", "") == '["specthink-cloud","serve"]'
    assert d["STOPSIGNAL"] == ["SIGTERM"]
    exposed = {p.split("/")[0] for e in d["EXPOSE"] for p in e.split()}
    assert {"50051", "9400"} <= exposed
    text = path.read_text()
    # torch and transformers: exactly constraints.txt's pins (the versions the tests run)
    copies = [r for w, r in final if w == "COPY" and "constraints.txt" in r.split()[:-1]]
    assert copies, f"{path.name}: constraints.txt is not copied into the build"
    installs = [r for w, r in final if w == "RUN" and "pip install" in r]
    assert any("[cloud]" in r for r in installs), f"{path.name}: never installs [cloud]"
    for run in installs:
        for command in re.split(r"&&|;", run):
            if "pip install" in command and ("torch" in command or "[cloud]" in command):
                assert "-c constraints.txt" in command, f"{path.name}: unconstrained: {command}"
    assert not re.search(r"(torch|transformers)\s*==\s*\d", text), "no version outside constraints"
    assert "TORCH_VERSION" not in text, "versions come from constraints.txt, not build args"
    assert re.search(r"got == pins", text), f"{path.name}: the build must check what it got"
    base = _resolve_from(path, final[0][1].split()[0])
    if name == "cloud":
        env = " ".join(d["ENV"])
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in env
        assert "torch.version.cuda" in text, "the CUDA image must check torch is a CUDA build"
        assert base.startswith(("python:", "nvidia/cuda:")), base
    else:
        assert "download.pytorch.org/whl/cpu" in text


def test_edge_image_builds_llama_cpp_in_a_builder_stage() -> None:
    stages = _stages(DOCKERFILES["edge"])
    assert len(stages) >= 2, "llama-cpp-python is compiled in a separate builder stage"
    builder = stages[0]
    name = builder[0][1].split()[-1]
    assert builder[0][1].lower().split()[-2] == "as"
    assert any(w == "RUN" and "llama-cpp-python" in r for w, r in builder)
    assert any(w == "RUN" and "cmake" in r for w, r in builder)
    final = stages[-1]
    assert any(w == "COPY" and f"--from={name}" in r for w, r in final)
    assert not any(w == "RUN" and "build-essential" in r for w, r in final), "no compilers"
    assert any(w == "ENTRYPOINT" and "specthink-edge" in r for w, r in final)


# --------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _interp(value: str) -> str:
    """Apply compose's ${VAR:-default} / ${VAR-default} defaults (the variables unset)."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


def _argv(service: dict[str, Any], key: str = "command") -> list[str]:
    cmd = service.get(key, [])
    return [_interp(str(c)) for c in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def _mount_targets(service: dict[str, Any]) -> list[tuple[str, bool]]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append((v["target"], bool(v.get("read_only"))))
    return out


def test_compose_runs_cloud_on_a_mounted_model() -> None:
    compose = _compose()
    cloud = compose["services"]["cloud"]
    assert cloud["build"]["dockerfile"] == "docker/cloud-cpu.Dockerfile"
    args = _argv(cloud)
    model = _flag(args, "--model")
    assert model, "compose cloud command needs --model"
    assert _flag(args, "--device") == "cpu"
    under = [(t, ro) for t, ro in _mount_targets(cloud) if model.startswith(t.rstrip("/") + "/")]
    assert under, f"--model {model} is not under a mounted volume"
    assert all(ro for _, ro in under), "mount the models read-only"
    drain = float(_flag(args, "--drain-grace-s") or DRAIN_DEFAULT_S)
    grace = re.fullmatch(r"(\d+)s", cloud["stop_grace_period"])
    assert grace and int(grace.group(1)) > drain


def test_compose_api_key_comes_from_a_secret_file() -> None:
    compose = _compose()
    cloud, edge = compose["services"]["cloud"], compose["services"]["edge"]
    key_file = _flag(_argv(cloud), "--api-key-file")
    assert key_file and key_file.startswith("/run/secrets/")
    name = key_file.removeprefix("/run/secrets/")
    assert "file" in compose["secrets"][name]
    for svc in (cloud, edge):
        used = [s if isinstance(s, str) else s["source"] for s in svc.get("secrets", [])]
        assert name in used
    assert "SPECTHINK_API_KEY" not in (edge.get("environment") or {}), "no key in plain env"
    assert f"/run/secrets/{name}" in " ".join(_argv(edge, "entrypoint"))


def test_compose_edge_asks_the_cloud_once() -> None:
    compose = _compose()
    cloud, edge = compose["services"]["cloud"], compose["services"]["edge"]
    assert edge["build"]["dockerfile"] == "docker/edge.Dockerfile"
    args = _argv(edge)
    assert args[0] == "ask"
    port = _flag(_argv(cloud), "--port")
    assert _flag(args, "--cloud") == f"cloud:{port}"
    edge_model = _flag(args, "--model")
    assert edge_model and any(
        edge_model.startswith(t.rstrip("/") + "/") for t, _ in _mount_targets(edge)
    )
    assert edge["depends_on"]["cloud"]["condition"] == "service_healthy"
    assert "grpc_health" in " ".join(map(str, cloud["healthcheck"]["test"]))
    assert edge.get("restart", "no") == "no"


def test_optional_tensor_parallel_deployment_launches_one_rank_per_gpu() -> None:
    """docker/k8s/optional/tensor-parallel.yaml (docs/tensor-parallel.md): a valid Deployment
    whose torchrun starts as many ranks as --tensor-parallel and as the pod has GPUs, and
    whose drain ends before torchrun's fixed 30 s between SIGTERM and SIGKILL."""
    (deploy,) = [d for w, d in CRD_DOCS if w.endswith(".yaml#0") and "tensor-parallel" in w]
    kv.validate(deploy, _schema_version(), strict=True)
    container = _cloud_container(deploy)
    assert container["command"] == ["torchrun"]
    args = [str(a) for a in container["args"]]
    ranks = int(_flag(args, "--nproc-per-node") or 0)
    assert ranks >= 2 and int(_flag(args, "--tensor-parallel") or 0) == ranks
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == ranks
    assert args[args.index("--no-python") + 1 : args.index("--no-python") + 3] == [
        "specthink-cloud",
        "serve",
    ]
    check_shutdown_timing(deploy)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == _grpc_port(container)
    assert float(_flag(args, "--drain-grace-s") or DRAIN_DEFAULT_S) < 30


# --------------------------------------------------------------------------- the cloud's flags


def _serve_options() -> set[str]:
    typer = pytest.importorskip("typer")
    from cloud.cli import app

    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {opt for param in command.params for opt in param.opts}


def test_every_flag_the_deployment_passes_exists() -> None:
    args = [str(a) for a in _cloud_container(_one("Deployment"))["args"]]
    flags = {a.split("=")[0] for a in args if a.startswith("--")}
    assert flags <= _serve_options(), flags - _serve_options()
    for flag in ("--engine-stall-s", "--max-connection-age-s", "--max-connection-age-grace-s"):
        assert flag in flags, f"the Deployment should state {flag}"


def test_liveness_restarts_a_stuck_engine_within_a_bounded_time() -> None:
    container = _cloud_container(_one("Deployment"))
    args = [str(a) for a in container["args"]]
    stall = float(_flag(args, "--engine-stall-s") or 60)
    live = container["livenessProbe"]
    window = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
    # the server reports a stuck engine after `stall`; the kubelet restarts `window` later
    assert stall + window <= 180, f"a hung engine would hold the pod for {stall + window} s"
    assert live.get("timeoutSeconds", 1) < live.get("periodSeconds", 10)


def test_connections_age_so_new_replicas_get_work() -> None:
    args = [str(a) for a in _cloud_container(_one("Deployment"))["args"]]
    age = float(_flag(args, "--max-connection-age-s") or 0)
    grace = float(_flag(args, "--max-connection-age-grace-s") or 0)
    assert 60 <= age <= 1800, "reconnect often enough to rebalance, rarely enough to keep caches"
    assert grace >= 30, "calls in flight on an aged connection need time to finish"


def test_gpu_nodes_are_selected_and_tolerated() -> None:
    pod = _pod_spec(_one("Deployment"))
    selected = pod.get("nodeSelector", {})
    affinity = pod.get("affinity", {}).get("nodeAffinity", {})
    assert any("gpu" in k for k in selected) or affinity, "schedule onto GPU nodes only"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    env = {e["name"]: e.get("value") for e in _cloud_container(_one("Deployment"))["env"]}
    assert env.get("PYTORCH_CUDA_ALLOC_CONF") == "expandable_segments:True"


# --------------------------------------------------------------------------- rollouts


def _min_ready(deploy: dict[str, Any], replicas: int) -> int:
    """Ready pods at the worst moment of a rollout (the Deployment controller's rule)."""
    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    unavailable = rolling.get("maxUnavailable", "25%")
    assert isinstance(unavailable, int), "state maxUnavailable as a number of pods"
    return replicas - unavailable


def _min_ready_in_drain(pdb: dict[str, Any], replicas: int) -> int:
    """Ready pods at the worst moment of a node drain that the PDB allows."""
    spec = pdb["spec"]
    if "minAvailable" in spec:
        return int(spec["minAvailable"])
    return replicas - int(spec["maxUnavailable"])


def _merge(base: Any, patch: Any) -> Any:
    """A strategic-merge patch of maps (what the variant's patches use); null deletes."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _render_spare_gpu() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((SPARE_GPU / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../k8s"]
    docs = [copy.deepcopy(d) for _, d in CORE_DOCS if d["kind"] != "Secret"]
    for entry in kustomization["patches"]:
        patch = yaml.safe_load((SPARE_GPU / entry["path"]).read_text())
        targets = [
            i
            for i, d in enumerate(docs)
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        assert len(targets) == 1, f"{entry['path']} patches nothing"
        docs[targets[0]] = _merge(docs[targets[0]], patch)
    return docs


def test_kustomization_holds_every_core_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.yaml"}
    assert listed == on_disk


def test_default_rollout_is_spare_less_and_says_what_it_costs() -> None:
    deploy, hpa = _one("Deployment"), _one("HorizontalPodAutoscaler")
    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0, "the default asks for no extra GPU"
    replicas = hpa["spec"].get("minReplicas", 1)
    # the stated cost: with one replica, a rollout or a drain has 0 ready pods for a load
    assert _min_ready(deploy, replicas) == 0
    assert _min_ready_in_drain(_one("PodDisruptionBudget"), replicas) == 0
    readme = (DOCKER / "README.md").read_text()
    assert "k8s-spare-gpu" in readme and "0 ready" in readme


def test_spare_gpu_variant_never_has_zero_ready_pods() -> None:
    docs = _render_spare_gpu()
    for doc in docs:
        kv.validate(doc, _schema_version(), strict=True)
    deploy = _one("Deployment", [("", d) for d in docs])
    pdb = _one("PodDisruptionBudget", [("", d) for d in docs])
    hpa = _one("HorizontalPodAutoscaler", [("", d) for d in docs])
    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0)
    replicas = hpa["spec"]["minReplicas"]
    assert replicas >= 2
    for n in range(replicas, hpa["spec"]["maxReplicas"] + 1):
        assert _min_ready(deploy, n) >= 1, f"a rollout at {n} replicas reaches 0 ready"
        assert _min_ready_in_drain(pdb, n) >= 1, f"a drain at {n} replicas reaches 0 ready"
        assert int(pdb["spec"]["minAvailable"]) < n, "the PDB must still allow a drain"
    assert "maxUnavailable" not in pdb["spec"]
    # the rest is the default's: probes, grace, drain
    check_grpc_probes(deploy)
    check_shutdown_timing(deploy)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_spare_gpu_variant_renders_the_same_with_kustomize() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(SPARE_GPU)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout)}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in _render_spare_gpu()}
    assert rendered == ours


# --------------------------------------------------------------------------- Gateway API


def test_gateway_terminates_tls_and_hashes_on_the_session_header() -> None:
    gateway = _one("Gateway", CRD_DOCS)
    route = _one("GRPCRoute", CRD_DOCS)
    policy = _one("BackendTrafficPolicy", CRD_DOCS)
    assert gateway["apiVersion"] == route["apiVersion"] == "gateway.networking.k8s.io/v1"
    [listener] = gateway["spec"]["listeners"]
    assert listener["protocol"] == "HTTPS" and listener["tls"]["mode"] == "Terminate"
    assert listener["tls"]["certificateRefs"][0]["name"]
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    svc = _one("Service")
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"name": svc["metadata"]["name"], "port": grpc_port}]
    services = {m["method"]["service"] for r in route["spec"]["rules"] for m in r["matches"]}
    assert "specthink.v1.SpecThink" in services
    assert policy["spec"]["targetRefs"][0]["name"] == route["metadata"]["name"]
    hashing = policy["spec"]["loadBalancer"]
    assert hashing["type"] == "ConsistentHash"
    assert hashing["consistentHash"]["type"] == "Header"
    assert hashing["consistentHash"]["header"]["name"].lower() == "x-session-id"
