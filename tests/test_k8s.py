"""docker/k8s manifests: schema-valid for Kubernetes (kubernetes-validate, offline schemas, when installed)
and consistent with each other and with the server (probes, ports, GPU request, HPA metric)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "docker" / "k8s"
KUBERNETES_VERSION = "1.30.0"


def documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_manifests_match_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for name, doc in documents().items():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises with the bad field


def test_deployment_service_and_hpa_fit_together():
    docs = documents()
    deployment = docs["Deployment/smart-diffusion"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--model-control-mode=explicit" in " ".join(container["args"])
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])  # Python-backend stubs
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    service = docs["Service/smart-diffusion"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)

    hpa = docs["HorizontalPodAutoscaler/smart-diffusion"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "smart-diffusion"}
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load(docs["ConfigMap/prometheus-adapter-smart-diffusion"]["data"]["config.yaml"])
    exposed = {rule["name"]["as"] for rule in adapter["rules"]}
    assert metric["pods"]["metric"]["name"] in exposed
    for rule in adapter["rules"]:  # the admission queues and Triton's (ensemble path) both count
        assert "smart_diffusion_requests_waiting" in rule["seriesQuery"]
        assert {"smart_diffusion_requests_waiting", "nv_inference_pending_request_count"} <= set(
            re.findall(r"\w+(?=\{)", rule["metricsQuery"])
        )


def test_network_policy_admits_inference_and_metrics_to_the_pods_ports():
    docs = documents()
    policy = docs["NetworkPolicy/smart-diffusion"]["spec"]
    labels = docs["Deployment/smart-diffusion"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]  # everything else inbound is denied
    ports = [{p["port"] for p in rule["ports"]} for rule in policy["ingress"]]
    assert ports == [{8000, 8001}, {8002}]
