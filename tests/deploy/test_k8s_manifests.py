"""deploy/k8s/: the manifests validate offline against Kubernetes 1.29's schemas (strict: unknown
fields are errors) with kubernetes-validate's bundled schemas, pass yamllint, and agree with each
other, with the image (user, paths, port, health check) and with qednbd's config parser."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploykit import DEPLOY, IMAGE_UID, tool

from qednbd import config as qconfig

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.29.0"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]


def one(name: str, kind: str) -> dict[str, Any]:
    docs = [d for d in load(name) if d["kind"] == kind]
    assert len(docs) == 1, f"{name}: {len(docs)} {kind}s"
    return docs[0]


def test_the_manifests_are_all_there() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in load(path.name)}
    assert kinds == {"StatefulSet", "Service", "ConfigMap", "Secret", "NetworkPolicy"}


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_validates_strictly(path: Path) -> None:
    r = kubernetes_validate(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed" in r.stdout, r.stdout


def test_the_validator_rejects_an_unknown_field(tmp_path: Path) -> None:
    """Strict validation has teeth: a misspelt field in the pod template fails it."""
    text = (K8S / "statefulset.yaml").read_text()
    broken = tmp_path / "statefulset.yaml"
    broken.write_text(text.replace("terminationGracePeriodSeconds:", "terminationGracePeriod:", 1))
    r = kubernetes_validate(broken)
    assert r.returncode != 0, r.stdout
    assert "terminationGracePeriod" in r.stdout + r.stderr


def test_yamllint() -> None:
    cmd = [tool("yamllint"), "--strict", "-c", str(DEPLOY / "yamllint.yaml"), str(DEPLOY)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_statefulset_keeps_images_on_claims_and_runs_the_image_user() -> None:
    sts = one("statefulset.yaml", "StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    assert spec["serviceName"] == one("service.yaml", "Service")["metadata"]["name"]
    claim = spec["volumeClaimTemplates"][0]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == IMAGE_UID
    for container in pod["initContainers"] + pod["containers"]:
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/var/lib/qednbd"]["name"] == claim["metadata"]["name"], container["name"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert set(limits) == set(requests) == {"cpu", "memory"}, container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_probes_use_the_nbd_port_and_the_image_health_check() -> None:
    pod = one("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["ports"] == [{"name": "nbd", "containerPort": 10809, "protocol": "TCP"}]
    assert server["livenessProbe"]["tcpSocket"]["port"] == "nbd"
    assert server["startupProbe"]["tcpSocket"]["port"] == "nbd"
    command = server["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["/usr/bin/python3", "/usr/local/bin/qednbd-healthcheck"]
    # The image puts the health check exactly there.
    containerfile = (DEPLOY / "Containerfile").read_text()
    assert "COPY deploy/healthcheck.py /usr/local/bin/qednbd-healthcheck" in containerfile
    timeout = float(command[command.index("--timeout") + 1])
    assert timeout < server["readinessProbe"]["timeoutSeconds"]


def test_config_and_tls_secret_are_mounted_where_the_config_says() -> None:
    pod = one("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = one("configmap.yaml", "ConfigMap")
    secret = one("secret.yaml", "Secret")

    assert mounts["config"]["mountPath"] == "/etc/qednbd/qednbd.toml"  # the image's --config
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert mounts["config"]["subPath"] in config_map["data"]
    settings = tomllib.loads(config_map["data"][mounts["config"]["subPath"]])
    assert settings["tls-creds"] == mounts["tls"]["mountPath"]
    assert settings["tls"] == "require"
    assert settings["port"] == server["ports"][0]["containerPort"]
    assert settings["exports"]["disk"]["file"].startswith("/var/lib/qednbd/")

    tls = volumes["tls"]["secret"]
    assert tls["secretName"] == secret["metadata"]["name"]
    assert {item["path"] for item in tls["items"]} == {"ca-cert.pem", "server-cert.pem", "server-key.pem"}
    assert {item["key"] for item in tls["items"]} == set(secret["stringData"])
    assert tls["defaultMode"] == 0o440


def test_init_container_creates_the_exported_image() -> None:
    pod = one("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    script = init["command"][-1]
    settings = tomllib.loads(one("configmap.yaml", "ConfigMap")["data"]["qednbd.toml"])
    image = settings["exports"]["disk"]["file"]
    assert f"test -e {image} ||" in script
    assert f"qednbd create -f qed {image}" in script


def test_service_and_network_policy_select_the_pods() -> None:
    labels = one("statefulset.yaml", "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    service = one("service.yaml", "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: one stable name per replica
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "nbd"
    policy = one("networkpolicy.yaml", "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["egress"] == []
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 10809}]


@pytest.mark.parametrize("where", ["configmap", "image"])
def test_server_accepts_the_shipped_configs(where: str, tmp_path: Path) -> None:
    """qednbd's own parser takes both configs (the image's default and the ConfigMap's)."""
    if where == "configmap":
        text = one("configmap.yaml", "ConfigMap")["data"]["qednbd.toml"]
    else:
        text = (DEPLOY / "qednbd.toml").read_text()
    path = tmp_path / "qednbd.toml"
    path.write_text(text)
    conf = qconfig.build(qconfig.CommandLine(config_file=str(path)))
    assert (conf.bind, conf.port) == ("0.0.0.0", 10809)
    assert [e.path for e in conf.exports] == ["/var/lib/qednbd/disk.qed"]
    assert conf.default_export == "disk"
    if where == "configmap":
        assert (conf.tls, conf.tls_creds) == ("require", "/etc/qednbd/tls")


def test_image_reference_is_the_same_everywhere() -> None:
    pod = one("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]
    images = {c["image"] for c in pod["initContainers"] + pod["containers"]}
    assert len(images) == 1
    assert re.fullmatch(r"[\w.\-/:]+:[\w.\-]+", images.pop())
