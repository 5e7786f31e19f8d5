"""No Docker engine or Kubernetes cluster runs here, so check what can be checked: the Dockerfiles copy paths that
exist, run as a non-root user, and probe a real route; every Kubernetes manifest validates against the Kubernetes
schemas, and its probes, ports, grace period and autoscaling metric match what the server has."""

import re

import kubernetes_validate
import pytest
import yaml

from server.api.routes import router
from server.config import Settings
from server.engine.client import EngineConfig
from server.families import FAMILY_CHOICES
from tests.conftest import ROOT

ROUTES = {route.path for route in router.routes}
K8S = ROOT / "docker" / "k8s"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile(name):
    text = (ROOT / "docker" / name).read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "runs as root"
    probe = re.search(r"HEALTHCHECK .*?urlopen\('http://127\.0\.0\.1:8000(/\w+)'\)", text, re.S)
    assert probe and probe.group(1) in ROUTES
    assert re.search(r'^ENTRYPOINT \["python", "-m", "server", "--host", "0\.0\.0\.0", "--port", "8000"\]', text, re.M)
    assert "VOLUME" in text and "EXPOSE 8000" in text
    # where to say the family of a model mounted at /models/model, whose name says nothing
    family = re.search(r"^ENV POLYGLOT_MODEL_FAMILY=(\S+)$", text, re.M)
    assert family and family.group(1) in FAMILY_CHOICES and "--model-family polylm-chat" in text


def test_cpu_image_bakes_the_default_model_with_real_code():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "from server.engine.loader import default_gguf, gguf_to_hf_dir" in text
    from server.engine.loader import default_gguf, gguf_to_hf_dir  # noqa: F401


def manifests() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())]


def test_every_manifest_is_valid_kubernetes():
    docs = manifests()
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_deployment_matches_the_server():
    docs = {d["kind"]: d for d in manifests()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in ROUTES
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["ports"][0]["containerPort"] == Settings().port
    args = container["args"]
    shutdown = int(args[args.index("--shutdown-timeout") + 1])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > shutdown + pre_stop
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    cache = next(e["value"] for e in container["env"] if e["name"] == "XDG_CACHE_HOME")
    assert cache in writable and "/tmp" in writable
    for env in container["env"]:
        assert env["name"].removeprefix("POLYGLOT_").lower() in {f for f in Settings.__dataclass_fields__} or \
            not env["name"].startswith("POLYGLOT_")
    family = next(e["value"] for e in container["env"] if e["name"] == "POLYGLOT_MODEL_FAMILY")
    assert family in FAMILY_CHOICES and args[args.index("--model") + 1] == "/models/model"
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_autoscaler_uses_a_metric_the_server_exports():
    from server.api.metrics import Metrics

    class Idle:
        num_running = num_waiting = 0
        config = EngineConfig(max_model_len=2048)

        def cache_usage(self):
            return 0, 0, 0

        def prefix_cache_stats(self):
            return None

    exported = Metrics(Idle()).render().decode()
    hpa = next(d for d in manifests() if d["kind"] == "HorizontalPodAutoscaler")
    for metric in hpa["spec"]["metrics"]:
        assert f"\n{metric['pods']['metric']['name']} " in exported
