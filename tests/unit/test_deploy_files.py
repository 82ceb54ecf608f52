"""The Kubernetes files wire the probes to the right ops endpoints and a valid config."""

from __future__ import annotations

from pathlib import Path

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
