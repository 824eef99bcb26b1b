"""deploy/*.yaml against their schemas, offline.

- Core Kubernetes kinds: the JSON schemas that the `kubernetes-validate` wheel ships (strict: no
  unknown fields), checked with jsonschema.
- The KEDA ScaledObject: the CRD's openAPIV3Schema vendored in deploy/schemas/, checked with
  jsonschema, made strict the way `kubectl apply` (server-side field validation) treats a CRD.
- deploy/bentocloud.yaml: BentoML's own deployment-config classes, structured and checked the way
  `bentoml deploy -f` / `bentoml deployment create -f` does before it calls BentoCloud.

Each validator also gets a broken copy that must fail, so none of these can pass vacuously.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bench.server import K8S, deployed_containers, deployed_serve_args
from model_store.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BENTOCLOUD = ROOT / "deploy" / "bentocloud.yaml"
KEDA_SCHEMA = ROOT / "deploy" / "schemas" / "keda.sh_scaledobjects.v1alpha1.yaml"
SERVICE_PY = ROOT / "service.py"

K8S_VERSION = "1.37"  # newest schema set in kubernetes-validate 1.37.0
IN_FLIGHT_METRIC = "bentoml_service_request_in_progress"
# deploy/k8s.yaml's Deployment, Service and ScaledObject of each service
NAMES = {"ImageSearch": "estate-image-search", "Embedder": "estate-image-search-embedder"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Validation must never reach a network: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("test_deploy tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------
# helpers

def k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def k8s_doc(kind: str, service: str = "ImageSearch") -> dict:
    """The one `kind` of `service` (named as NAMES says) in deploy/k8s.yaml."""
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == NAMES[service]]
    assert len(found) == 1, f"expected one {kind} named {NAMES[service]} in {K8S.name}, found {len(found)}"
    return found[0]


def container(service: str) -> dict:
    (found,) = k8s_doc("Deployment", service)["spec"]["template"]["spec"]["containers"]
    return found


def validate_core(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _strict(schema):
    """additionalProperties: false on every object schema that lists properties and says nothing
    about extra keys: the API server rejects unknown CRD fields under strict field validation."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def keda_validator() -> jsonschema.protocols.Validator:
    schema = _strict(yaml.safe_load(KEDA_SCHEMA.read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_scaledobject(doc: dict) -> None:
    keda_validator().validate(doc)
    # The CRD's CEL rule (x-kubernetes-validations), which jsonschema does not run.
    spec = doc["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), \
        "minReplicaCount must be less than or equal to maxReplicaCount"


def validate_bentocloud(cfg: dict):
    """What `bentoml deployment create -f` does with the file before any network call:
    structure it into CreateDeploymentSchema (v2) and fix/validate the scaling bounds.
    `cluster` is popped by the CLI, not part of the schema. Unknown keys are dropped silently by
    BentoML's converter, so a round trip must give the file back unchanged."""
    from bentoml._internal.cloud.deployment import DeploymentAPI
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    cfg = {k: v for k, v in cfg.items() if k != "cluster"}
    struct = bentoml_cattr.structure(cfg, CreateDeploymentSchema)
    assert bentoml_cattr.unstructure(struct) == cfg, "keys BentoML does not know were dropped"
    DeploymentAPI._fix_and_validate_schema(struct)
    return struct


def service_decorators() -> dict[str, str]:
    """{class name: text of its @bentoml.service(...) decorator} from service.py, not imported."""
    src = SERVICE_PY.read_text()
    found = {m.group(2): m.group(1) for m in re.finditer(
        r"^(@bentoml\.service\b.*?)^class\s+(\w+)", src, re.S | re.M)}
    assert found, "no @bentoml.service class found in service.py"
    return found


def service_names() -> set[str]:
    names = set()
    for cls, deco in service_decorators().items():
        m = re.search(r"\bname\s*=\s*[\"']([^\"']+)[\"']", deco)  # @bentoml.service(name=...)
        names.add(m.group(1) if m else cls)
    return names


# ---------------------------------------------------------------------------------------------
# Kubernetes core kinds

def test_k8s_schemas_are_bundled_offline():
    assert kubernetes_validate.latest_version().startswith(K8S_VERSION)


def test_k8s_manifest_kinds():
    """A Deployment, a Service and a ScaledObject for each service, as BentoCloud deploys them: the CPU HPA is gone."""
    found = sorted((d["kind"], d["metadata"]["name"]) for d in k8s_docs())
    kinds = ("Deployment", "ScaledObject", "Service")
    fenced = [("NetworkPolicy", NAMES["Embedder"])]  # only the entry reaches the Embedder
    assert found == sorted([(kind, name) for kind in kinds for name in NAMES.values()] + fenced)
    assert set(deployed_containers()) == set(NAMES) == service_names()  # each Deployment runs its service


@pytest.mark.parametrize("service", NAMES)
@pytest.mark.parametrize("kind", ["Deployment", "Service"])
def test_k8s_core_kinds_validate(kind, service):
    validate_core(k8s_doc(kind, service))


def test_k8s_network_policy_validates():
    validate_core(k8s_doc("NetworkPolicy", "Embedder"))


def test_k8s_only_the_entry_and_prometheus_reach_the_embedder():
    """The Embedder's pods take connections on their port from the entry's pods and from the namespace of the
    Prometheus the ScaledObjects ask (its scrapes), and from nothing else."""
    policy = k8s_doc("NetworkPolicy", "Embedder")["spec"]
    pod_labels = {service: k8s_doc("Deployment", service)["spec"]["template"]["metadata"]["labels"]
                  for service in NAMES}
    assert policy["podSelector"] == {"matchLabels": pod_labels["Embedder"]}
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": port["targetPort"], "protocol": "TCP"}
                             for port in k8s_doc("Service", "Embedder")["spec"]["ports"]]
    prometheus = {urlparse(so["spec"]["triggers"][0]["metadata"]["serverAddress"]).hostname.split(".")[1]
                  for so in (k8s_doc("ScaledObject", service) for service in NAMES)}
    assert rule["from"] == [{"podSelector": {"matchLabels": pod_labels["ImageSearch"]}}] + [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}} for namespace in prometheus]


def test_k8s_both_services_get_the_embedder_token_from_one_secret():
    """The entry sends the token the Embedder asks for (query/embedder_token.py; tests/test_bento.py runs them)."""
    sources = [[e["valueFrom"] for e in container(service)["env"] if e["name"] == "IMAGESEARCH_EMBEDDER_TOKEN"]
               for service in NAMES]
    assert sources[0] == sources[1] and len(sources[0]) == 1 and "secretKeyRef" in sources[0][0], sources


def _typo_in_probe(doc):
    c = doc["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")


def _port_as_word(doc):
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "three-thousand"


def _no_selector(doc):
    del doc["spec"]["selector"]


@pytest.mark.parametrize("breakage", [_typo_in_probe, _port_as_word, _no_selector])
def test_k8s_broken_deployment_fails(breakage):
    doc = copy.deepcopy(k8s_doc("Deployment"))
    breakage(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(doc)


@pytest.mark.parametrize("service", NAMES)
def test_k8s_deployment_probes_and_scrape_annotations(service):
    dep = k8s_doc("Deployment", service)
    pod = dep["spec"]["template"]
    c = container(service)
    assert c["args"][:3] == ["start-http-server", "--service-name", service]  # what the image runs for one service
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 3000}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 3000}
    assert "replicas" not in dep["spec"], "the ScaledObject owns the replica count"
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == "3000"
    assert ann["prometheus.io/path"] == "/metrics"
    svc = k8s_doc("Service", service)["spec"]
    assert svc["selector"] == pod["metadata"]["labels"] == dep["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in svc["ports"]] == [p["containerPort"] for p in c["ports"]] == [3000]


def start_options(args: list[str]) -> dict:
    """`start-http-server`'s options (the command BentoML's image runs for args that begin with it), as its own
    command line parser reads them (it raises on an unknown one)."""
    from bentoml_cli._internal.start import start_command

    command, *options = args
    return start_command.commands[command].make_context(command, [*options, "/home/bentoml/bento"]).params


@pytest.mark.parametrize("service", NAMES)
def test_k8s_containers_args_are_start_http_servers_own(service):
    assert start_options(container(service)["args"])["service_name"] == service
    broken = [*container(service)["args"], "--timeout-keep-alives", "620"]
    with pytest.raises(Exception, match="No such option"):
        start_options(broken)


def test_k8s_entry_reaches_the_embedder_at_its_service():
    """The entry's --depends names the Embedder's Service at its port (tests/test_bento.py runs the pair)."""
    depends = start_options(container("ImageSearch")["args"])["depends"]
    (only,) = depends
    name, url = only.split("=", 1)
    embedder = k8s_doc("Service", "Embedder")
    (port,) = embedder["spec"]["ports"]
    assert (name, url) == ("Embedder", f"http://{embedder['metadata']['name']}:{port['port']}")


def test_k8s_readiness_probe_waits_for_the_embedders_answer():
    """/readyz asks the embedder: one deadline and one retry while it starts. A probe that gives up sooner
    reads a timeout instead of the reason."""
    probe = container("ImageSearch")["readinessProbe"]
    assert probe["timeoutSeconds"] > 2 * Settings.model_fields["embed_deadline_s"].default  # not set in the pod


def serve_options(args: list[str]) -> dict:
    """`bentoml serve`'s options as its own command line parser reads them (it raises on an unknown one)."""
    from bentoml_cli.cli import cli

    return cli.commands["serve"].make_context("serve", ["service:ImageSearch", *args]).params


def test_k8s_entry_keeps_idle_connections_longer_than_load_balancers():
    """Longer than AWS ALB's and ingress-nginx's 60 s and Google's load balancers' 600 s: the server closing an
    idle connection first can fail a request sent on it (tests/test_service.py serves with these options)."""
    assert start_options(container("ImageSearch")["args"])["timeout_keep_alive"] > 600
    assert serve_options(deployed_serve_args())["timeout_keep_alive"] > 600  # as the tests serve it
    with pytest.raises(Exception, match="No such option"):
        serve_options(["--timeout-keep-alives", "620"])


# ---------------------------------------------------------------------------------------------
# KEDA ScaledObject

def test_keda_schema_is_vendored_with_its_source():
    head = KEDA_SCHEMA.read_text().split("\ndescription:", 1)[0]
    for needle in ("kedacore/keda", "keda.sh_scaledobjects.yaml", "v2.20.2", "Apache-2.0"):
        assert needle in head


@pytest.mark.parametrize("service", NAMES)
def test_scaledobject_validates(service):
    validate_scaledobject(k8s_doc("ScaledObject", service))


def _threshold_as_int(doc):
    doc["spec"]["triggers"][0]["metadata"]["threshold"] = 16  # metadata values must be strings


def _typo_in_spec(doc):
    doc["spec"]["maxReplicas"] = doc["spec"].pop("maxReplicaCount")


def _no_triggers(doc):
    doc["spec"]["triggers"] = []


def _min_above_max(doc):
    doc["spec"]["minReplicaCount"] = 11


@pytest.mark.parametrize("breakage", [_threshold_as_int, _typo_in_spec, _no_triggers, _min_above_max])
def test_scaledobject_broken_copy_fails(breakage):
    doc = copy.deepcopy(k8s_doc("ScaledObject"))
    breakage(doc)
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        validate_scaledobject(doc)


@pytest.mark.parametrize("service", NAMES)
def test_scaledobject_scales_its_deployment_on_its_requests_in_flight(service):
    """Each service's pods scale on that service's requests in flight, between the bounds BentoCloud gives it."""
    so = k8s_doc("ScaledObject", service)
    spec = so["spec"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert spec["scaleTargetRef"]["name"] == k8s_doc("Deployment", service)["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    scaling = yaml.safe_load(BENTOCLOUD.read_text())["services"][service]["scaling"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (scaling["min_replicas"], scaling["max_replicas"])
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    # In a built Bento service_name is the Bento's name; the service class is runner_name (the series each server
    # exports: tests/test_bento.py).
    assert trigger["metadata"]["query"] == f'sum({IN_FLIGHT_METRIC}{{runner_name="{service}"}})'


@pytest.mark.parametrize("service, setting", [("ImageSearch", "search_concurrency"),
                                              ("Embedder", "embedder_concurrency")])
def test_scaledobject_threshold_matches_service_concurrency(service, setting):
    """The autoscaler's target per pod is the concurrency the service declares to BentoML (BentoCloud's)."""
    deco = service_decorators()[service]
    assert re.search(rf"[\"']concurrency[\"']\s*:\s*settings\.{setting}\b", deco), deco
    threshold = float(k8s_doc("ScaledObject", service)["spec"]["triggers"][0]["metadata"]["threshold"])
    assert threshold == getattr(Settings(), setting) == 16


# ---------------------------------------------------------------------------------------------
# BentoCloud

def test_bentocloud_config_validates():
    struct = validate_bentocloud(yaml.safe_load(BENTOCLOUD.read_text()))
    assert struct.bento == "estate-image-search:latest"
    search = struct.services["ImageSearch"].scaling
    assert (search.min_replicas, search.max_replicas) == (2, 10)


def test_bentocloud_services_match_service_py():
    cfg = yaml.safe_load(BENTOCLOUD.read_text())
    assert set(cfg["services"]) == service_names() == {"ImageSearch", "Embedder"}


def _typo_in_scaling(cfg):
    svc = cfg["services"]["ImageSearch"]
    svc["scalling"] = svc.pop("scaling")


def _replicas_as_word(cfg):
    cfg["services"]["Embedder"]["scaling"]["min_replicas"] = "one"


def _min_above_max_bc(cfg):
    cfg["services"]["Embedder"]["scaling"]["min_replicas"] = 5


@pytest.mark.parametrize("breakage, error", [
    (_typo_in_scaling, "AssertionError"),              # dropped by the converter: round trip
    (_replicas_as_word, "ClassValidationError"),       # cattrs cannot make an int of it
    (_min_above_max_bc, "BentoMLException"),           # DeploymentAPI._fix_scaling
])
def test_bentocloud_broken_copy_fails(breakage, error):
    cfg = yaml.safe_load(BENTOCLOUD.read_text())
    breakage(cfg)
    with pytest.raises(Exception) as info:
        validate_bentocloud(cfg)
    assert type(info.value).__name__ == error, repr(info.value)


def test_every_setting_the_deployments_give_exists_and_is_valid():
    """Settings ignore variables they do not know (extra="ignore"), so a misspelt name in a manifest would leave
    the pod on the default without a word: each IMAGESEARCH_ variable must be a setting, and its value valid."""
    given = [(e["name"], e["value"]) for service in NAMES for e in container(service)["env"] if "value" in e]
    given += [(e["name"], e["value"]) for e in yaml.safe_load(BENTOCLOUD.read_text())["envs"]]
    known = {f"IMAGESEARCH_{name.upper()}" for name in Settings.model_fields}
    ours = {name: value for name, value in given if name.startswith("IMAGESEARCH_")}
    assert ours and set(ours) <= known, set(ours) - known
    settings = Settings(**{name.removeprefix("IMAGESEARCH_").lower(): value for name, value in ours.items()})
    assert settings.client_photos_per_s == 2 and settings.forwarded_hops == 1  # each client's share, behind an ingress
